"""Why es_d_rtrl learns less than d_rtrl: its gradient against d_rtrl's and BPTT's during training (issue 16).

    python benchmarks/es_diagnosis.py checkpoints      # BPTT runs that give the weights (minutes per task)
    python benchmarks/es_diagnosis.py measure          # the comparison at every checkpoint -> results JSON
    python benchmarks/es_diagnosis.py figure           # the figure from the JSON

For each task (DMS, full-length evidence accumulation, temporal XOR) the reference network is trained with
BPTT (the task's settings of docs/results.md), keeping its weights at a few iterations (untrained, learning,
trained). At each of them one batch of fresh trials runs through d_rtrl and through es_d_rtrl's variants
(`VARIANTS`) side by side, with the same weights and inputs. Per step and per weight it records the cosine
and norm ratio of each variant's per-step gradient against d_rtrl's (the per-weight trace it
approximates), per trial and per state the cosine of the variant's trace (the outer product of its
factors, `factorised.dense_trace`) against d_rtrl's, and for the whole trial the cosine of the summed
gradients against d_rtrl's and against BPTT's over the same trial.

Float32 (as training), batch `BATCH`. Results: benchmarks/results/es_diagnosis.json,
docs/images/bench-es-diagnosis.png.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import brainunit as u
import common
import jax
import jax.numpy as jnp
import numpy as np

from fusetrace import checkpoint
from fusetrace.cli import RunConfig, build
from fusetrace.passes import factorised

RUNS = common.ROOT / "runs" / "diagnosis"
BATCH = 8  # trials per comparison batch
SEED = 0


@dataclasses.dataclass(frozen=True)
class Setting:
    """A task, how BPTT trains it (docs/results.md) and the iterations whose weights are compared."""

    task: str
    batch: int
    learning_rate: float
    iterations: int
    keep: tuple[int, ...]
    options: dict = dataclasses.field(default_factory=dict)
    network: str | None = None  # "MODULE:FACTORY" (None: the task's reference network)


SETTINGS = {
    "dms": Setting("dms", 32, 2e-3, 100, (0, 30, 100)),
    # e-prop's LIF/ALIF network, the reference network when these measurements were made (docs/tasks.md)
    "evidence": Setting("evidence", 64, 2e-3, 200, (0, 60, 200), network="fusetrace.tasks:ei_evidence_network"),
    "xor": Setting("xor", 32, 5e-3, 600, (0, 100, 600)),
}
DEFAULT_TASKS = ("dms", "evidence")

# es_d_rtrl variants compared with d_rtrl: (label, compile options)
VARIANTS = {
    "filtered 0.9": {"factorisation": "filtered", "decay": 0.9},
    "filtered 0.99": {"factorisation": "filtered", "decay": 0.99},
    "averaged 0.99": {"factorisation": "averaged", "decay": 0.99},
    "matched": {"factorisation": "matched"},
    "low_rank 2": {"factorisation": "low_rank", "rank": 2},
    "low_rank 8": {"factorisation": "low_rank", "rank": 8},
}


def _config(setting: Setting, algorithm: str, **options) -> RunConfig:
    return RunConfig(
        task=setting.task,
        algorithm=algorithm,
        iterations=setting.iterations,
        batch=setting.batch,
        learning_rate=setting.learning_rate,
        update_every=0,
        seed=SEED,
        checkpoint_every=setting.iterations,
        clip_norm=1.0,
        task_options=dict(setting.options),
        network=setting.network,
        **options,
    )


def train_checkpoints(setting: Setting) -> None:
    """Train the task's network with BPTT and save its weights at the iterations `setting.keep`."""
    _, _, trainer, _ = build(_config(setting, "bptt"))
    state = trainer.init()
    folder = RUNS / f"{setting.task}-bptt"
    start = time.perf_counter()
    for iteration in range(setting.iterations + 1):
        if iteration in setting.keep:
            checkpoint.save(folder / f"it{iteration}", iteration, state["params"], keep=1)
        if iteration < setting.iterations:
            state, result = trainer.iteration(state)
            print(f"{setting.task} iteration {iteration + 1}: {result.metrics}", flush=True)
    print(f"{setting.task}: {time.perf_counter() - start:.0f} s", flush=True)


def _mantissas(tree) -> list:
    return [u.get_mantissa(x) for x in jax.tree.leaves(tree, is_leaf=u.math.is_quantity)]


def _cos(a, b, axes=None):
    dot = jnp.sum(a * b, axis=axes)
    return dot / jnp.sqrt(jnp.sum(a * a, axis=axes) * jnp.sum(b * b, axis=axes) + 1e-30)


def _ratio(a, b, axes=None):
    return jnp.sqrt(jnp.sum(a * a, axis=axes) / (jnp.sum(b * b, axis=axes) + 1e-30))


def _learners(setting: Setting):
    """d_rtrl's learner, each variant's, and a BPTT trainer (for its whole-trial forward), on one network."""
    setting = dataclasses.replace(setting, batch=BATCH)
    reference = build(_config(setting, "d_rtrl", factorisation="filtered"))
    learners = {"d_rtrl": reference[1]}
    for label, options in VARIANTS.items():
        learners[label] = build(_config(setting, "es_d_rtrl", **options))[1]
    return learners, build(_config(setting, "bptt"))[2]


def _compared_traces(learner):
    """`[(name, d_rtrl trace key, relation index)]` of the hidden (non-readout) relations and the credit
    chains of es_d_rtrl's learner that have a d_rtrl counterpart."""
    analysis, plan = learner.analysis, learner.plan
    readout = {i for i, r in enumerate(analysis.relations) if analysis.group_named(r.group).lti}
    pairs = [(analysis.relations[i].weight, plan.key(i), i) for i in plan.traced if i not in readout]
    return pairs + [(f"chain {node.key}", node.key, node.owner) for node in plan.chains]


def measure_batch(setting: Setting, params: dict, seed: int) -> dict:
    """Run one batch of `BATCH` trials through d_rtrl and every variant; per-step and per-trial cosines."""
    learners, trainer = _learners(setting)
    batch = trainer.sample(seed)
    reference = learners["d_rtrl"]
    es = {k: v for k, v in learners.items() if k != "d_rtrl"}
    pairs = _compared_traces(next(iter(es.values())))
    names = list(reference.params)

    def body(carry, inputs):
        states, totals = carry
        x, target = inputs
        out = {}
        new_states, grads = {}, {}
        for label, learner in learners.items():
            new_states[label], res = learner.step(params, states[label], x, target)
            grads[label] = _mantissas(res.grads)
        for label in es:
            out[f"{label}/cos"] = jnp.stack([_cos(g, r) for g, r in zip(grads[label], grads["d_rtrl"], strict=True)])
            out[f"{label}/ratio"] = jnp.stack(
                [_ratio(g, r) for g, r in zip(grads[label], grads["d_rtrl"], strict=True)]
            )
            step = states[label]["step"]
            for name, key, index in pairs:
                exact = _reference_trace(reference, new_states["d_rtrl"]["traces"], key)
                approx = factorised.dense_trace(
                    learners[label].analysis, learners[label].plan, new_states[label]["traces"], key, index, step
                )
                axes = tuple(range(1, exact.ndim - 1))  # per trial and state
                out[f"{label}/trace {name}/cos"] = _cos(approx, exact, axes)
                out[f"{label}/trace {name}/ratio"] = _ratio(approx, exact, axes)
                every = tuple(range(1, exact.ndim))  # per trial, all states together
                out[f"d_rtrl/trace {name}/norm"] = jnp.sqrt(jnp.sum(exact * exact, axis=every))
                out[f"{label}/trace {name}/cos_all"] = _cos(approx, exact, every)
                out[f"{label}/trace {name}/ratio_all"] = _ratio(approx, exact, every)
        out["norm d_rtrl"] = jnp.stack([jnp.sqrt(jnp.sum(g * g)) for g in grads["d_rtrl"]])
        totals = {k: [a + g for a, g in zip(totals[k], grads[k], strict=True)] for k in totals}
        return (new_states, totals), out

    states = {label: learner.init() for label, learner in learners.items()}
    totals = {label: [jnp.zeros_like(g) for g in _mantissas(params)] for label in learners}
    run = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))
    (_, totals), per_step = run((states, totals), (batch.inputs, batch.targets))
    bptt = _bptt_total(trainer, params, batch)
    summary = {"weights": names}
    for label in learners:
        summary[f"{label}/trial cos vs bptt"] = [float(_cos(a, b)) for a, b in zip(totals[label], bptt, strict=True)]
        summary[f"{label}/trial ratio vs bptt"] = [
            float(_ratio(a, b)) for a, b in zip(totals[label], bptt, strict=True)
        ]
        summary[f"{label}/trial cos vs d_rtrl"] = [
            float(_cos(a, b)) for a, b in zip(totals[label], totals["d_rtrl"], strict=True)
        ]
        summary[f"{label}/trial ratio vs d_rtrl"] = [
            float(_ratio(a, b)) for a, b in zip(totals[label], totals["d_rtrl"], strict=True)
        ]
    per_step = {k: np.asarray(v) for k, v in per_step.items()}
    raw = RUNS / f"per-step-{setting.task}-{seed}.npz"  # every per-step number, to summarise again
    raw.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(raw, mask=np.asarray(batch.task.mask), **{k.replace("/", "|"): v for k, v in per_step.items()})
    spans = phases(setting.task, batch.task.info, np.asarray(batch.task.mask).shape[0])
    summary["phases"] = {name: [list(map(int, span)) for span in trial] for name, trial in spans.items()}
    summary["by_phase"] = by_phase(per_step, spans, np.asarray(batch.task.mask))
    summary["traces"] = [name for name, _, _ in pairs]
    summary["states"] = _state_names(next(iter(es.values())), pairs)
    return summary


def phases(task: str, info: dict, steps: int) -> dict[str, list[tuple[int, int]]]:
    """`{phase: [(start, stop) per trial]}` of a batch: DMS fixation / sample / delay / test (the
    definition's periods after the trial's own fixation), evidence cues / delay / recall."""
    if task == "dms":
        starts = np.asarray(info["fixation"])
        return {
            "fixation": [(0, f) for f in starts],
            "sample": [(f, f + 500) for f in starts],
            "delay": [(f + 500, f + 1500) for f in starts],
            "test": [(f + 1500, f + 2000) for f in starts],
        }
    recall = int(np.asarray(info["recall_start"]))
    batch = np.asarray(info["p_left"]).shape[0]
    cues_end = 50 + 150 * np.asarray(info["cue_left"]).shape[1]
    return {
        "cues": [(0, cues_end)] * batch,
        "delay": [(cues_end, recall)] * batch,
        "recall": [(recall, steps)] * batch,
    }


def by_phase(per_step: dict, spans: dict, mask: np.ndarray) -> dict:
    """Per phase of the trial, the per-trial trace measures where d_rtrl's trace is not zero (a cosine is
    undefined there): the mean cosine and the median norm ratio over the phase's steps and trials (per
    state when the measure has a state axis); and the per-step gradient's mean cosine and median norm
    ratio against d_rtrl's over the loss steps where d_rtrl's gradient is not zero (per weight)."""
    out = {}
    for key, value in per_step.items():
        if "/trace " in key and not key.startswith("d_rtrl/"):
            _, rest = key.split("/trace ", 1)
            name, measure = rest.rsplit("/", 1)
            norm = per_step[f"d_rtrl/trace {name}/norm"]
            for phase, trial_spans in spans.items():
                parts = [value[a:b, trial][norm[a:b, trial] > 0] for trial, (a, b) in enumerate(trial_spans) if b > a]
                found = np.concatenate(parts)
                statistic = np.median if measure.startswith("ratio") else np.mean
                out[f"{key}/{phase}"] = statistic(found, axis=0).tolist() if len(found) else None
        elif key.endswith(("/cos", "/ratio")):
            defined = mask.any(axis=1)[:, None] & (per_step["norm d_rtrl"] > 0)  # (T, weights)
            statistic = np.median if key.endswith("/ratio") else np.mean
            out[f"{key}/loss steps"] = [
                float(statistic(value[defined[:, w], w])) if defined[:, w].any() else None
                for w in range(value.shape[1])
            ]
    return out


def _state_names(learner, pairs) -> dict:
    """The state names of each compared trace's group, in trace order."""
    analysis, names = learner.analysis, {}
    for name, _, index in pairs:
        group = analysis.group_named(analysis.relations[index].group)
        names[name] = None if name.startswith("chain ") else list(group.states)
    return names


def _reference_trace(learner, traces: dict, key: str) -> jax.Array:
    """d_rtrl's trace under `key` as one array `(batch, pre..., post..., S)`."""
    value = traces[key]
    arrays = value["eps"] if isinstance(value, dict) else value
    return jnp.stack(list(arrays), axis=-1)


def _bptt_total(trainer, params, batch) -> list:
    """BPTT's gradient of the whole trial's loss (the same batch, from the initial state)."""

    def total(p):
        losses, _ = trainer._forward(p, batch.inputs, batch.targets, trainer.learner.constants)
        return jnp.sum(losses)

    return _mantissas(jax.jit(jax.grad(total))(params))


def measure(tasks: list[str], only: list[int] | None = None) -> dict:
    results = {}
    for name in tasks:
        setting = SETTINGS[name]
        for iteration in [i for i in setting.keep if only is None or i in only]:
            folder = checkpoint.latest(RUNS / f"{name}-bptt" / f"it{iteration}")
            if folder is None:
                raise SystemExit(f"no checkpoint for {name} iteration {iteration}: run `checkpoints` first")
            learner = _learners(setting)[0]["d_rtrl"]
            params, _ = checkpoint.restore(folder, learner.params)
            start = time.perf_counter()
            results[f"{name}/{iteration}"] = measure_batch(setting, params, seed=12345)
            print(f"{name} iteration {iteration}: {time.perf_counter() - start:.0f} s", flush=True)
            _print_summary(results[f"{name}/{iteration}"])
    return results


def _print_summary(result: dict) -> None:
    for key, values in result.items():
        if key.endswith(("vs bptt", "vs d_rtrl")):
            print(f"  {key}: " + ", ".join(f"{w}={v:.3f}" for w, v in zip(result["weights"], values, strict=True)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("checkpoints", "measure", "figure"))
    parser.add_argument("--tasks", nargs="*", default=list(DEFAULT_TASKS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="es_d_rtrl variants to compare")
    parser.add_argument("--checkpoints", nargs="*", type=int, default=None, help="only these iterations' weights")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for label in set(VARIANTS) - set(args.variants):
        del VARIANTS[label]
    results_path, image_path = common.output_paths(args.out, "es-diagnosis")
    if args.what == "checkpoints":
        for name in args.tasks:
            train_checkpoints(SETTINGS[name])
    elif args.what == "measure":
        results = measure(args.tasks, args.checkpoints)
        common.write_json(results_path, {"results": results, "variants": VARIANTS, "batch": BATCH})
    else:
        figure(json.loads(results_path.read_text()), image_path)
    return 0


def figure(payload: dict, path: pathlib.Path) -> None:
    """Per task (rows, the latest checkpoint measured): the trace cosine against d_rtrl's per phase of the
    trial for each hidden weight (all states together), and the whole-trial gradient's cosine against
    BPTT's per weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    latest = {}
    for key in results:
        task, iteration = key.split("/")
        if task not in latest or int(iteration) > int(latest[task].split("/")[1]):
            latest[task] = key
    labels = list(payload["variants"])
    colours = plt.get_cmap("tab10")(np.arange(len(labels) + 1))
    traces = {task: [t for t in results[key]["traces"] if not t.startswith("chain ")] for task, key in latest.items()}
    columns = 1 + max(len(t) for t in traces.values())
    figure_, axes = plt.subplots(len(latest), columns, figsize=(4.2 * columns, 3.2 * len(latest)), squeeze=False)
    for row, (task, key) in enumerate(sorted(latest.items())):
        result = results[key]
        phase_names = list(result["phases"])
        width = 0.8 / len(labels)
        for column, trace in enumerate(traces[task]):
            ax = axes[row, column]
            for v, label in enumerate(labels):
                values = [result["by_phase"][f"{label}/trace {trace}/cos_all/{p}"] for p in phase_names]
                ax.bar(np.arange(len(phase_names)) + v * width, values, width, color=colours[v], label=label)
            ax.set_xticks(np.arange(len(phase_names)) + 0.4 - width / 2, phase_names)
            ax.set_ylim(-0.1, 1.0)
            ax.set_title(f"{task} (BPTT it. {key.split('/')[1]}): trace cos vs d_rtrl\n{trace}", fontsize=8)
        for column in range(len(traces[task]), columns - 1):
            axes[row, column].axis("off")
        ax = axes[row, -1]
        weights = [w.replace(".weight", "").replace(".comm", "") for w in result["weights"]]
        width = 0.8 / (len(labels) + 1)
        for v, label in enumerate(["d_rtrl", *labels]):
            values = result[f"{label}/trial cos vs bptt"]
            ax.bar(np.arange(len(weights)) + v * width, values, width, color=colours[v - 1 if v else -1], label=label)
        ax.set_xticks(np.arange(len(weights)) + 0.4 - width / 2, weights, rotation=30, fontsize=7)
        ax.set_ylim(-0.2, 1.0)
        ax.set_title(f"{task}: whole-trial gradient cos vs BPTT", fontsize=8)
    axes[0, -1].legend(fontsize=6, loc="lower left")
    figure_.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure_.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
