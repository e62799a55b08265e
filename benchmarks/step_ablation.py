"""Where the low-rank trace's training iteration spends its time: the same learner compiled under
ablations, in one process, their iterations alternated on the same batches (medians and 25th
percentiles of `--rounds`). An ablation changes what is computed; its iterations learn something else
(or nothing useful). Only the time is read.

    python benchmarks/step_ablation.py --task dms --rank 2 --rounds 11 \
        --network benchmarks.peer_networks:two_state_gif_dms_network

Variants (`--variants`, all by default):
  shipped            the learner as compiled by `fusetrace train` (the learning runs' recipe)
  stand-in           the eigendecompositions replaced by `truncation_eigh._stand_in` (orthogonal, read from
                     the data: their own cost, without XLA folding the rotations that follow)
  keep-rank          no truncation: the right factor moved and extended by `p Fᵀ`, the basis kept
                     (the projection `p = Lᵀu` only; no Gram matrix, eigendecomposition or rotation)
  keep-rank-bare     as keep-rank without the projection: the right factor only moved by `D`
  pair               es_d_rtrl's default factorisation (one filtered pair), at the task's decay
  steps              the weight products step by step (`chunk=0`; the CLI defers them since 49f1e9e, and
                     before it chose step by step when under half the steps formed a gradient)
  every-step         a gradient formed at every step (products step by step)
  every-step-deferred  the same, deferred
Prints seconds per iteration; nothing is written to the results (docs/results.md cites the runs).
"""

import argparse
import sys

import common
import jax
import jax.numpy as jnp
import numpy as np
from learning import RUN_SIZES, _run_fields
from truncation_eigh import _stand_in

from fusetrace.cli import RunConfig, build
from fusetrace.passes import components, small_eigh

sys.path.insert(0, str(common.ROOT))  # `--network benchmarks.peer_networks:...`


def _keep_rank(blocks, right, u, f, weigh=None, project=True):
    """The rank kept, the basis unchanged: `(L, R + p Fᵀ, I)` (with `project`) or `(L, R, I)`."""
    del weigh
    k = blocks.shape[1]
    if project:
        right = right + components._project(blocks, u)[:, :, None] * f[:, None, :]
    return blocks, right, jnp.broadcast_to(jnp.eye(k + 1, k, dtype=blocks.dtype), (blocks.shape[0], k + 1, k))


def _every_step(batch) -> np.ndarray:
    return np.ones(jax.tree.leaves(batch.inputs)[0].shape[0], bool)


PATCHES = {
    "stand-in": (small_eigh, {"eigh": _stand_in}),
    "keep-rank": (components, {"_extend_and_truncate": _keep_rank}),
    "keep-rank-bare": (components, {"_extend_and_truncate": lambda *a, **k: _keep_rank(*a, **k, project=False)}),
}
VARIANTS = ("shipped", *PATCHES, "pair", "steps", "every-step", "every-step-deferred")


def _trainer(name: str, fields: dict, options: dict, decay: float):
    if name == "pair":
        options = {"algorithm": "es_d_rtrl", "decay": decay}
    module, values = PATCHES.get(name, (None, {}))
    with common.patched(module, **values):  # read while the iteration compiles (its first call)
        _, _, trainer, _ = build(RunConfig(**{**fields, **options}))
        if name.startswith("every-step"):
            trainer.step_mask = _every_step
        if name in ("steps", "every-step"):
            trainer.chunk = 0  # step by step (the other variants keep the CLI's default: deferred)
        return common.first_iteration(trainer)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dms", choices=sorted(RUN_SIZES))
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--network", default=None)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    batch, decay = RUN_SIZES[args.task]
    fields = {**_run_fields(args.task, batch, iterations=100, seed=0), "network": args.network}
    options = {"algorithm": "es_d_rtrl", "factorisation": "low_rank", "rank": args.rank}
    held = {name: _trainer(name, fields, options, decay) for name in args.variants}
    common.print_medians(common.interleaved_iterations(held, args.rounds, reverse_odd_rounds=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
