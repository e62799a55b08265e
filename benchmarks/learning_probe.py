"""Where online learning goes wrong: train a reference network with one online algorithm and, at chosen
iterations, compare every method's whole-trial gradient with BPTT's on one fixed batch.

    python benchmarks/learning_probe.py [--task dms] [--own-loop-hops 1] [--seed 0] [--iterations 230]
                                        [--probes 0 25 50 ...] [--out DIR]

The run is the CLI's (`fusetrace train`) full-size recipe for the task: batch 32, Adam lr 2e-3 with a
cosine decay over 300 iterations, clipping 1, rate penalty 0.02 toward 10 Hz; it trains with es_d_rtrl
(default factorisation) and `--own-loop-hops`. At each probe the current weights are held fixed and the
summed per-step gradient of a fixed batch of fresh trials is formed by: the training learner, es_d_rtrl
without the rounds, d_rtrl, and BPTT (`jax.grad` of the whole trial's loss); per weight, the cosine and
norm ratio of each against BPTT. Writes benchmarks/results/learning_probe_<task>.json (or under --out).
"""

import argparse
import json

import common
import es_diagnosis

from fusetrace.cli import RunConfig, build

PROBES = (*range(0, 150, 25), *range(150, 231, 10))
PROBE_SEED = 10**8  # the fixed batch: far from every training seed


def _config(task: str, seed: int, algorithm: str, **options) -> RunConfig:
    return RunConfig(
        task=task,
        algorithm=algorithm,
        iterations=300,
        batch=32,
        learning_rate=2e-3,
        update_every=0,
        seed=seed,
        checkpoint_every=300,
        clip_norm=1.0,
        rate_reg=0.02,
        target_rate_hz=10.0,
        schedule="cosine",
        **options,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="dms")
    parser.add_argument("--own-loop-hops", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=230)
    parser.add_argument("--probes", type=int, nargs="+", default=list(PROBES))
    parser.add_argument("--out", default=None, help="write results/ under this folder")
    args = parser.parse_args(argv)
    training = f"es_d_rtrl own_loop_hops={args.own_loop_hops}"
    _, learner, trainer, _ = build(_config(args.task, args.seed, "es_d_rtrl", own_loop_hops=args.own_loop_hops))
    others = {
        "es_d_rtrl": build(_config(args.task, args.seed, "es_d_rtrl"))[1],
        "d_rtrl": build(_config(args.task, args.seed, "d_rtrl"))[1],
    }
    bptt = build(_config(args.task, args.seed, "bptt"))[2]
    batch = trainer.sample(PROBE_SEED)
    methods = {training: common.summing(learner)} | {name: common.summing(other) for name, other in others.items()}
    weights = list(learner.params)
    state, rows = trainer.init(), []
    for iteration in range(args.iterations + 1):
        if iteration in args.probes:
            params = state["params"]
            reference = es_diagnosis._bptt_total(bptt, params, batch)
            row = {"iteration": iteration, "methods": {}}
            for name, method in methods.items():
                got = es_diagnosis._mantissas(method(params, batch.inputs, batch.targets))
                row["methods"][name] = {
                    w: {"cosine": float(es_diagnosis._cos(a, b)), "norm_ratio": float(es_diagnosis._ratio(a, b))}
                    for w, a, b in zip(weights, got, reference, strict=True)
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
        if iteration < args.iterations:
            state, result = trainer.iteration(state)
            rows.append({"iteration": iteration + 1, "training": {k: float(v) for k, v in result.metrics.items()}})
            if iteration % 10 == 9:
                print(json.dumps(rows[-1]), flush=True)
    payload = {"task": args.task, "seed": args.seed, "training": training, "weights": weights, "rows": rows}
    json_path, _ = common.output_paths(args.out, f"learning_probe_{args.task}")
    common.write_json(json_path, payload)
    return payload


if __name__ == "__main__":
    main()
