"""Gradient fidelity against BPTT: cosine similarity and norm ratio, per weight, of the online gradient
summed over a sequence, for fusetrace (d_rtrl, e_prop, es_d_rtrl) and braintrace (D_RTRL, pp_prop, each in
its single-step and multi-step modes) on the same models, weights, initial states and sequences.

    python benchmarks/fidelity.py [--steps 100] [--batch 8] [--out DIR] [--quick]

Models (float64, dt 1 ms, 20 Poisson inputs at 100 Hz, 32 LIF neurons per layer, LeakyRateReadout of 4
with τ 20 ms, squared error against random targets every step):
  feedforward          — one LIF layer (Expon synapse) + readout: the exact regime of d_rtrl / e_prop;
  recurrent            — the same layer with a recurrent projection (its own synapse, τ 8 ms);
  two_layer            — two feed-forward LIF layers + readout;
  three_layer          — three feed-forward LIF layers + readout (hidden weights scaled so that the
                         deeper layers fire: 15, 5 and 0.7 Hz);
  three_layer_silent   — the same at the two-layer model's scale: the third layer is silent and the
                         second fires at 0.5 Hz (the readout's weight gets no gradient at all);
  two_layer_recurrent  — two recurrent LIF layers + readout.
The online estimate is Σ_t of each step's gradient with the weights held fixed; BPTT is
brainstate.transform.grad of Σ_t loss. braintrace runs through `etrace_grad(..., reduction="sum")`,
step by step (multi-step mode with one-step windows: a whole-sequence window would be plain BPTT).
Writes benchmarks/results/fidelity.json and docs/images/bench-fidelity.png (or under --out).
"""

import argparse
import functools
import time

import brainstate
import brainunit as u
import common
import jax
import jax.numpy as jnp
import numpy as np

BASE = common.Spec(n_in=20, n=32, n_out=4, in_scale=3.0, rec_scale=1.0, hidden_scale=3.0, rec_tau_ms=8.0, input_p=0.1)
MODELS = {
    "feedforward": {"layers": 1, "recurrent": False},
    "recurrent": {"layers": 1, "recurrent": True},
    "two_layer": {"layers": 2, "recurrent": False},
    "three_layer": {"layers": 3, "recurrent": False, "hidden_scale": 10.0},  # deeper layers fire (15, 5, 0.7 Hz)
    "three_layer_silent": {"layers": 3, "recurrent": False},  # third layer silent, second at 0.5 Hz
    "two_layer_recurrent": {"layers": 2, "recurrent": True},
}
FUSETRACE = [("d_rtrl", {}), ("e_prop", {})] + [("es_d_rtrl", {"decay": d}) for d in (0.5, 0.9, 0.99)]
FUSETRACE += [("es_d_rtrl", {"decay": 0.9, "factorisation": f}) for f in ("matched", "low_rank")]  # rank 4
FUSETRACE += [("d_rtrl", {"own_loop_hops": 1}), ("es_d_rtrl", {"decay": 0.9, "own_loop_hops": 1})]  # own recurrence
PEER = [
    ("D_RTRL", "d_rtrl", {"vjp_method": "single-step"}),
    ("D_RTRL", "d_rtrl", {"vjp_method": "multi-step"}),
    ("pp_prop", "pp_prop", {"vjp_method": "single-step", "decay_or_rank": common.DECAY}),
    ("pp_prop", "pp_prop", {"vjp_method": "multi-step", "decay_or_rank": common.DECAY}),
]
NORM_TARGET = (0.8, 1.25)  # fusetrace's norm ratio on the recurrent single-layer model (hidden weights)
RATIO_FLOOR = 1e-3  # plotted in place of a zero norm ratio (log axis)
TINY = 1e-300  # keeps a zero gradient's cosine and ratio at 0 instead of nan


def _flat(tree):
    leaves = jax.tree.leaves(tree, is_leaf=u.math.is_quantity)
    return np.concatenate([np.ravel(np.asarray(u.get_mantissa(x))) for x in leaves])


def _paths(grads: dict) -> dict:
    """Gradients keyed by the plain model's weight path ("inp1.comm.weight", "out.weight")."""
    plain = {("out", common.PLAIN.readout_weight) if k == ("out", "W") else k: v for k, v in grads.items()}
    return {".".join(k) if isinstance(k, tuple) else k: v for k, v in plain.items()}


def bptt(model, xs, ys):
    weights = model.states(brainstate.ParamState)

    def total():
        return jnp.sum(brainstate.transform.for_loop(lambda x, y: common.loss(model.update(x), y), xs, ys))

    return _paths(brainstate.transform.grad(total, weights)())


def fusetrace_grads(model, xs, ys, batch, algorithm, **options):
    return common.summed_grads(common.fusetrace_learner(model, batch, algorithm, **options), xs, ys)


def peer_grads(model, xs, ys, batch, algorithm, **options):
    learner = common.twin(model, batch, algorithm, **options)

    @brainstate.transform.jit
    def run(xs, ys):
        step_loss = lambda x, y: common.loss(learner(x), y)
        return learner.etrace_grad(xs, ys, step_fn=step_loss, reduction="sum")

    return _paths(run(xs, ys))


def compare(got: dict, want: dict) -> dict:
    out = {}
    for path, value in want.items():
        w, g = _flat(value), _flat(got[path])
        cosine = float(np.vdot(g, w) / (np.linalg.norm(g) * np.linalg.norm(w) + TINY))
        out[path] = {"cosine": cosine, "norm_ratio": float(np.linalg.norm(g) / (np.linalg.norm(w) + TINY))}
    return out


def configs(quick: bool):
    """(library, algorithm label, runner) for every compared method."""
    fuse = FUSETRACE if not quick else [("d_rtrl", {}), ("es_d_rtrl", {"decay": common.DECAY})]
    out = []
    for algorithm, options in fuse:
        named = [str(v) if k in ("decay", "factorisation") else f"{k}={v}" for k, v in options.items()]
        label = algorithm + (f"({', '.join(named)})" if options else "")
        out.append(("fusetrace", label, functools.partial(fusetrace_grads, algorithm=algorithm, **options)))
    if common.peer() is not None:
        for name, algorithm, options in PEER if not quick else PEER[:1]:
            label = f"{name} {options['vjp_method']}"
            out.append(("braintrace", label, functools.partial(peer_grads, algorithm=algorithm, **options)))
    return out


def norm_targets(rows: list[dict]) -> dict:
    """fusetrace's hidden-weight norm ratios on the recurrent model against NORM_TARGET."""
    out = {}
    for row in rows:
        if row["model"] == "recurrent" and row["library"] == "fusetrace" and not row["weight"].startswith("out"):
            entry = out.setdefault(row["algorithm"], {"ratios": {}, "target": list(NORM_TARGET)})
            entry["ratios"][row["weight"]] = row["norm_ratio"]
    for entry in out.values():
        entry["met"] = all(NORM_TARGET[0] <= r <= NORM_TARGET[1] for r in entry["ratios"].values())
    return out


def _short(weight: str) -> str:
    return weight.replace(".comm.weight", "")


def plot(rows: list[dict], path) -> None:
    plt = common.pyplot()
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    figure, axes = plt.subplots(len(models), 2, figsize=(12, 2.6 * len(models) + 0.8), squeeze=False)
    labels = list(dict.fromkeys(f"{r['library']} {r['algorithm']}" for r in rows))
    width = 0.8 / len(labels)
    for (axis_ratio, axis_cos), model in zip(axes, models, strict=True):
        subset = [r for r in rows if r["model"] == model]
        weights = list(dict.fromkeys(r["weight"] for r in subset))
        for i, label in enumerate(labels):
            by_weight = {r["weight"]: r for r in subset if f"{r['library']} {r['algorithm']}" == label}
            shade = 0.35 + 0.6 * i / len(labels)
            color = plt.cm.Blues(shade) if label.startswith("fusetrace") else plt.cm.Oranges(shade)
            xs = np.arange(len(weights)) + i * width
            ratio = [max(by_weight[w]["norm_ratio"], RATIO_FLOOR) if w in by_weight else 0 for w in weights]
            axis_ratio.bar(xs, ratio, width, color=color, label=label)
            axis_cos.bar(xs, [by_weight[w]["cosine"] if w in by_weight else 0 for w in weights], width, color=color)
        for axis in (axis_ratio, axis_cos):
            axis.set_xticks(np.arange(len(weights)) + 0.4 - width / 2, [_short(w) for w in weights])
        axis_ratio.set_yscale("log")
        axis_ratio.set_ylim(RATIO_FLOOR, 3)
        axis_ratio.axhspan(*NORM_TARGET, color="green", alpha=0.15)
        axis_ratio.set_ylabel(f"{model}\nnorm ratio vs BPTT")
        axis_cos.set_ylabel("cosine vs BPTT")
        axis_cos.set_ylim(-0.2, 1.05)
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(
        handles, names, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.02 - 0.01 * len(labels))
    )
    title = (
        "Summed online gradient against BPTT (float64). Green band: norm-ratio target [0.8, 1.25]; "
        f"bars at {RATIO_FLOOR:g} are zero gradients"
    )
    common.save_figure(figure, path, title)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None, help="write results/ and images/ under this folder")
    parser.add_argument("--quick", action="store_true", help="few steps, the recurrent model only")
    args = parser.parse_args(argv)
    models = MODELS if not args.quick else {"recurrent": MODELS["recurrent"]}
    if args.quick:
        args.steps, args.batch = 20, 2
    common.configure(64)
    rng = np.random.default_rng(0)
    xs = jnp.asarray((rng.random((args.steps, args.batch, BASE.n_in)) < BASE.input_p).astype(np.float64))
    ys = jnp.asarray(rng.normal(size=(args.steps, args.batch, BASE.n_out)))
    rows = []
    start = time.perf_counter()
    for kind, shape in models.items():
        spec = common.Spec(**{**vars(BASE), **shape})
        reference = bptt(common.build(spec, args.batch), xs, ys)
        for library, label, runner in configs(args.quick):
            try:
                got = _paths(runner(common.build(spec, args.batch), xs, ys, args.batch))
                result = compare(got, reference)
            except Exception as error:  # a method that fails on a model is reported, not fatal
                print(f"{kind:20s} {library} {label}: {type(error).__name__}: {str(error)[:200]}")
                rows.append({"model": kind, "library": library, "algorithm": label, "error": str(error)[:300]})
                continue
            for path, value in result.items():
                rows.append({"model": kind, "library": library, "algorithm": label, "weight": path, **value})
                print(
                    f"{kind:20s} {library:10s} {label:22s} {path:18s} "
                    f"cosine {value['cosine']:+.4f}  norm ratio {value['norm_ratio']:.4f}"
                )
    ok_rows = [r for r in rows if "weight" in r]
    json_path, png_path = common.output_paths(args.out, "fidelity")
    common.write_json(
        json_path,
        {"steps": args.steps, "batch": args.batch, "norm_target": norm_targets(ok_rows), "rows": rows},
    )
    plot(ok_rows, png_path)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
