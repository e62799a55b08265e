"""Seconds per training iteration of fusetrace's learners on any network `fusetrace train` takes, where
braintrace's `pp_prop` cannot run (`benchmarks/learning.py time` is the side-by-side one).

    python benchmarks/iteration_time.py [--task evidence] [--network MODULE:FUNCTION] [--batch 64]
                                        [--rounds 5] [--out DIR]

Each learner (`LEARNERS`: es_d_rtrl's default pair, its rank-2 and rank-4 traces, BPTT) gets its trainer
(`fusetrace.cli.build`, the learning runs' settings), two warm-up iterations, then `--rounds` rounds in
which every learner runs one iteration in turn; the median per learner is written to
benchmarks/results/iteration_time_<task>.json (or under --out).
"""

import argparse
import json
import pathlib
import statistics
import time

import common
import jax

from fusetrace.cli import RunConfig, build

LEARNERS = {  # label: (algorithm, compile options)
    "es_d_rtrl": ("es_d_rtrl", {}),
    "es_d_rtrl(low_rank 2)": ("es_d_rtrl", {"factorisation": "low_rank", "rank": 2}),
    "es_d_rtrl(low_rank 4)": ("es_d_rtrl", {"factorisation": "low_rank", "rank": 4}),
    "bptt": ("bptt", {}),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="evidence")
    parser.add_argument("--network", default="benchmarks.peer_networks:gif_evidence_network")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    running = {}
    for label, (algorithm, options) in LEARNERS.items():
        config = RunConfig(
            task=args.task,
            algorithm=algorithm,
            iterations=600,
            batch=args.batch,
            learning_rate=2e-3,
            update_every=0,
            seed=0,
            checkpoint_every=600,
            clip_norm=1.0,
            schedule="cosine",
            network=args.network or None,
            **options,
        )
        trainer = build(config)[2]
        state = trainer.init()
        for _ in range(2):
            state, _ = trainer.iteration(state)
        jax.block_until_ready(state)
        running[label] = (trainer, state)
    seconds = {label: [] for label in running}
    for _ in range(args.rounds):
        for label, (trainer, state) in running.items():
            start = time.perf_counter()
            state, _ = trainer.iteration(state)
            jax.block_until_ready(state)
            seconds[label].append(time.perf_counter() - start)
            running[label] = (trainer, state)
    result = {
        "task": args.task,
        "network": args.network,
        "batch": args.batch,
        "median_s": {label: statistics.median(values) for label, values in seconds.items()},
    }
    print(json.dumps(result, indent=1))
    out = pathlib.Path(args.out) if args.out else common.RESULTS
    common.write_json(out / f"iteration_time_{args.task}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
