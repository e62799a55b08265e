"""Whole-trial gradients of es_d_rtrl's factorisations and d_rtrl against BPTT's, at given weights.

    python benchmarks/gradient_probe.py [--task evidence] [--network MODULE:FUNCTION | --network ""]
                                        [--weights init RUN_DIR/checkpoints/step-N ...] [--seeds 101 102]
                                        [--out DIR] [--state-norms STEP ...] [--only LABEL ...]

`--network ""` probes the task's own reference network. For each set of weights (`init`: the network's
initial weights; or a checkpoint folder written by `fusetrace train`, whose run trained with the same task
and network) and each probe seed, one batch of `BATCH` fresh trials runs through d_rtrl and every
es_d_rtrl variant of `VARIANTS`, each summing its per-step gradients over the trial, and through BPTT
(`jax.grad` of the whole trial's loss). Per weight it records the cosine and norm ratio of each against
BPTT. `--state-norms` also records, at the initial weights, the norm of each state's block of d_rtrl's
exact trace after the given steps. Float32, as training. About 25 s per set of weights and seed on a
2-core CPU for the GIF evidence network. Writes benchmarks/results/gradient_probe_<task>.json
(`_reference` or `_<factory>` appended for another network than the default; or under --out).
"""

import argparse
import dataclasses
import json
import pathlib

import common
import es_diagnosis
import jax
import jax.numpy as jnp

from fusetrace import checkpoint
from fusetrace.cli import RunConfig, build

BATCH = 8
DEFAULT_NETWORK = "benchmarks.peer_networks:gif_evidence_network"
VARIANTS = {  # label: es_d_rtrl's compile options: es_diagnosis's, with rank 4 for its rank 8, and balanced
    **{label: options for label, options in es_diagnosis.VARIANTS.items() if label != "low_rank 8"},
    "low_rank 4": {"factorisation": "low_rank", "rank": 4},
    "low_rank 2 balanced": {"factorisation": "low_rank", "rank": 2, "rank_metric": "balanced"},
    "low_rank 4 balanced": {"factorisation": "low_rank", "rank": 4, "rank_metric": "balanced"},
    "low_rank 2 spike": {"factorisation": "low_rank", "rank": 2, "rank_metric": "spike"},
    "low_rank 4 spike": {"factorisation": "low_rank", "rank": 4, "rank_metric": "spike"},
}


def _config(task: str, network: str | None, algorithm: str, **options) -> RunConfig:
    return RunConfig(
        task=task,
        algorithm=algorithm,
        iterations=1,
        batch=BATCH,
        learning_rate=2e-3,
        update_every=0,
        seed=0,
        checkpoint_every=1,
        clip_norm=1.0,
        network=network,
        **options,
    )


def _weights(folder: str, task: str, network: str | None, like: dict) -> dict:
    """The parameters stored in a `fusetrace train` checkpoint folder (its trainer's state, any algorithm)."""
    run = json.loads((pathlib.Path(folder).parent.parent / "config.json").read_text())  # the run's own
    algorithm = "bptt" if run["algorithm"] == "bptt" else "es_d_rtrl"  # their trainers' states differ
    config = dataclasses.replace(_config(task, network, algorithm), schedule="cosine", iterations=2)
    state, _ = checkpoint.restore(folder, build(config)[2].init())
    return jax.tree.map(lambda a, b: jnp.asarray(b, jnp.asarray(a).dtype), like, state["params"])


def probe(task: str, network: str | None, weights: list[str], seeds: list[int], only=None) -> dict:
    """`only`: the labels of `VARIANTS` to probe (all by default); d_rtrl always."""
    learners = {"d_rtrl": build(_config(task, network, "d_rtrl"))[1]}
    for label, options in VARIANTS.items():
        if only is None or label in only:
            learners[label] = build(_config(task, network, "es_d_rtrl", **options))[1]
    trainer = build(_config(task, network, "bptt"))[2]
    names = list(learners["d_rtrl"].params)

    @jax.jit
    def totals(params, inputs, targets):
        def body(carry, step_inputs):
            states, sums = carry
            x, target = step_inputs
            new = {}
            for label, learner in learners.items():
                new[label], res = learner.step(params, states[label], x, target)
                sums[label] = [a + g for a, g in zip(sums[label], es_diagnosis._mantissas(res.grads), strict=True)]
            return (new, sums), None

        states = {label: learner.init() for label, learner in learners.items()}
        sums = {label: [jnp.zeros_like(g) for g in es_diagnosis._mantissas(params)] for label in learners}
        (_, sums), _ = jax.lax.scan(body, (states, sums), (inputs, targets))
        return sums

    results = {"weights": names, "probes": {}}
    for source in weights:
        params = learners["d_rtrl"].params
        if source != "init":
            params = _weights(source, task, network, params)
        for seed in seeds:
            batch = trainer.sample(seed)
            sums = totals(params, batch.inputs, batch.targets)
            bptt = es_diagnosis._bptt_total(trainer, params, batch)
            row = {
                label: {
                    "cos": [float(es_diagnosis._cos(a, b)) for a, b in zip(sums[label], bptt, strict=True)],
                    "ratio": [float(es_diagnosis._ratio(a, b)) for a, b in zip(sums[label], bptt, strict=True)],
                }
                for label in learners
            }
            results["probes"][f"{source} | seed {seed}"] = row
            print(f"{source}, seed {seed}", flush=True)
            for label, values in row.items():
                cells = " ".join(
                    f"{n}={c:+.3f}/{r:.2f}" for n, c, r in zip(names, values["cos"], values["ratio"], strict=True)
                )
                print(f"  {label:14s} cos/ratio vs BPTT: {cells}", flush=True)
    return results


def state_norms(task: str, network: str | None, seed: int, steps: list[int]) -> dict:
    """`d_rtrl`'s exact trace, per relation into a group of several states, as the Frobenius norm of each
    state's block (over the batch, the presynaptic and the postsynaptic axis) after each of `steps`, at
    the network's initial weights on one batch of fresh trials: which states the plain low-rank
    truncation's norm is made of."""
    learner = build(_config(task, network, "d_rtrl"))[1]
    trainer = build(_config(task, network, "bptt"))[2]
    batch = trainer.sample(seed)
    analysis, traces = learner.analysis, learner.init()["traces"]
    keys = {  # trace key -> relation index, for the relations into a group of several states
        learner.plan.key(i): i
        for i in range(len(analysis.relations))
        if len(traces.get(learner.plan.key(i), {}).get("eps", ())) > 1
    }

    @jax.jit
    def norms(params, inputs, targets):
        def body(state, step_inputs):
            state, _ = learner.step(params, state, *step_inputs)
            return state, {k: jnp.stack([jnp.linalg.norm(e) for e in state["traces"][k]["eps"]]) for k in keys}

        return jax.lax.scan(body, learner.init(), (inputs, targets))[1]

    per_step = norms(learner.params, batch.inputs, batch.targets)
    result = {}
    for k, i in keys.items():
        relation = analysis.relations[i]
        result[relation.weight] = {
            "states": [analysis.name_of(x) for x in analysis.group_named(relation.group).states],
            "norms": {t: [float(x) for x in per_step[k][t - 1]] for t in steps},
        }
    for weight, row in result.items():
        print(weight, row["states"], flush=True)
        for t, values in row["norms"].items():
            print(f"  after step {t}: " + ", ".join(f"{v:.3g}" for v in values), flush=True)
    return result


def _network_tag(network: str) -> str:
    """The results file's suffix: none for the default network, `_reference` for the task's own."""
    if network == DEFAULT_NETWORK:
        return ""
    return common.network_tag(network) if network else "_reference"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="evidence")
    parser.add_argument("--network", default=DEFAULT_NETWORK)
    parser.add_argument("--weights", nargs="*", default=["init"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[101])
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), default=None, help="these variants only")
    parser.add_argument(
        "--state-norms", nargs="*", type=int, default=None, help="also: d_rtrl's trace per state after these steps"
    )
    args = parser.parse_args(argv)
    result = probe(args.task, args.network or None, args.weights, args.seeds, args.only)
    result.update(task=args.task, network=args.network, batch=BATCH)
    if args.state_norms:
        result["state_norms"] = state_norms(args.task, args.network or None, args.seeds[0], args.state_norms)
    out = pathlib.Path(args.out) if args.out else common.RESULTS
    common.write_json(out / f"gradient_probe_{args.task}{_network_tag(args.network)}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
