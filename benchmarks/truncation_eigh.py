"""The low-rank truncation's eigendecompositions, LAPACK against Jacobi rotations (passes/small_eigh.py),
in one training iteration: the same learner built twice in one process, once with every Gram matrix sent
to `jnp.linalg.eigh` (`small_eigh.LARGEST = 0` while it compiles) and once as shipped, their training
iterations alternated on the same batches (medians of `--rounds`).

`--against stand-in` builds the other learner with a stand-in for the eigendecompositions instead: the
identity times the sign of each Gram matrix's first diagonal entry (orthogonal, as cheap as an
element-wise op, and read from the data, so XLA cannot fold the rotations that follow). Its iteration
learns nothing useful; its time is the iteration's without the eigendecompositions' own cost. (The
constant identity would also drop the rotations of the factors that follow: docs/results.md.)

    python benchmarks/truncation_eigh.py --task evidence --rank 4 --rank-metric spike --credit-depth 1
    python benchmarks/truncation_eigh.py --task evidence --rank 4 \
        --network benchmarks.peer_networks:gif_evidence_network
    python benchmarks/truncation_eigh.py --task dms --rank 2 --against stand-in --rounds 11 \
        --network benchmarks.peer_networks:two_state_gif_dms_network

Prints seconds per iteration; nothing is written to the results.
"""

import argparse
import sys

import common
import jax
import jax.numpy as jnp
import numpy as np
from learning import RUN_SIZES, _run_fields

from fusetrace.cli import RunConfig, build
from fusetrace.passes import small_eigh

sys.path.insert(0, str(common.ROOT))  # `--network benchmarks.peer_networks:...`


def _stand_in(matrices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Not an eigendecomposition: the identity times the sign of the first diagonal entry (module docstring)."""
    sign = jnp.where(matrices[..., :1, :1] < 0, -1.0, 1.0).astype(matrices.dtype)
    return jnp.diagonal(matrices, axis1=-2, axis2=-1), jnp.eye(matrices.shape[-1], dtype=matrices.dtype) * sign


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="evidence", choices=sorted(RUN_SIZES))
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rank-metric", default="plain")
    parser.add_argument("--credit-depth", type=int, default=None)
    parser.add_argument("--network", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", choices=("lapack", "stand-in"), default="lapack")
    args = parser.parse_args(argv)
    options = {"algorithm": "es_d_rtrl", "factorisation": "low_rank", "rank": args.rank}
    options["rank_metric"] = args.rank_metric
    if args.credit_depth is not None:
        options["credit_depth"] = args.credit_depth
    fields = {**_run_fields(args.task, RUN_SIZES[args.task][0], iterations=100, seed=0), "network": args.network}
    other = ("LAPACK", {"LARGEST": 0}) if args.against == "lapack" else ("stand-in", {"eigh": _stand_in})
    trainers = {}
    for name, values in (other, ("Jacobi", {})):
        with common.patched(small_eigh, **values):  # read while the iteration compiles (its first call)
            trainers[name] = common.first_iteration(build(RunConfig(**{**fields, **options}))[2])
    times = common.interleaved_iterations(trainers, args.rounds, reverse_odd_rounds=False)
    for name, t in times.items():
        print(f"{name}: {np.median(t):.3f} s per iteration ({', '.join(f'{x:.3f}' for x in t)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
