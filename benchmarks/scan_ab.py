"""`Learner.scan` of another commit against this one's, in one training iteration: the same learner built
several times in one process, each while a given `scan` is in place (it is read when the iteration
compiles), their iterations alternated on the same batches (medians and 25th percentiles of `--rounds`).

Variants (`--variants`):
  against      `fusetrace/sequence.py` as of `--against REV` (read with `git show`), its weight products step
               by step (`chunk=0`, what `fusetrace train` chose before 49f1e9e for a loss read on under half
               of the steps)
  against-deferred  the same, with its default chunk (what it chose for a loss read on most steps)
  steps        this commit's `scan`, products step by step (`chunk=0`)
  deferred:N   this commit's `scan` with its default chunk, `sequence.MASKED_CHUNK` set to N while it compiles
               (`deferred` alone: the shipped value)

    python benchmarks/scan_ab.py --task dms --rank 2 --rounds 11 --against da04766 \
        --network benchmarks.peer_networks:two_state_gif_dms_network \
        --variants against steps deferred:32 deferred:64 deferred:128

`--every-step`: every step forms a gradient (no step mask), as with a loss read at every step.

Prints seconds per iteration; nothing is written to the results (docs/benchmarks.md, "Sequences", cites the
runs).
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile

import common
from learning import RUN_SIZES, _run_fields

from fusetrace import sequence
from fusetrace.cli import RunConfig, build

sys.path.insert(0, str(common.ROOT))  # `--network benchmarks.peer_networks:...`


def _sequence_at(revision: str):
    """`fusetrace.sequence` as of `revision`, loaded as a module of the installed package (its relative
    imports resolve to today's `fusetrace`)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/fusetrace/sequence.py"], cwd=common.ROOT, check=True, capture_output=True
    ).stdout
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(f"fusetrace.sequence_{revision}", file.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(variant: str, fields: dict, options: dict, against, every_step: bool):
    name, _, size = variant.partition(":")
    values = {"scan": against.scan} if name.startswith("against") else {}
    if size:
        values["MASKED_CHUNK"] = int(size)
    with common.patched(sequence, **values):  # read while the iteration compiles (its first call)
        _, _, trainer, _ = build(RunConfig(**{**fields, **options}))
        trainer.chunk = None if name.endswith("deferred") else 0
        if every_step:
            trainer.step_mask = None
        return common.first_iteration(trainer)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dms", choices=sorted(RUN_SIZES))
    parser.add_argument("--rank", type=int, default=2, help="the low-rank trace's rank; 0: the default pair")
    parser.add_argument("--network", default=None)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--against", default="da04766", help="the commit whose sequence.py `against` runs")
    parser.add_argument("--variants", nargs="+", default=["against", "steps", "deferred"])
    parser.add_argument("--every-step", action="store_true", help="every step forms a gradient (no step mask)")
    args = parser.parse_args(argv)
    batch, decay = RUN_SIZES[args.task]
    fields = {**_run_fields(args.task, batch, iterations=100, seed=0), "network": args.network}
    options = (
        {"algorithm": "es_d_rtrl", "factorisation": "low_rank", "rank": args.rank}
        if args.rank
        else {"algorithm": "es_d_rtrl", "decay": decay}
    )
    against = _sequence_at(args.against) if any(v.startswith("against") for v in args.variants) else None
    held = {variant: _trainer(variant, fields, options, against, args.every_step) for variant in args.variants}
    common.print_medians(common.interleaved_iterations(held, args.rounds, reverse_odd_rounds=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
