"""Gated rate cells against BPTT: cosine and norm ratio, per weight, of the online gradient summed over a
sequence, for fusetrace (d_rtrl, e_prop, es_d_rtrl) and braintrace (D_RTRL, pp_prop) on the same cells,
weights, initial states and sequences (issue 18, item 4).

    python benchmarks/gated.py [--steps 100] [--batch 8] [--seeds 3] [--out DIR] [--quick]

Models (float64): one `brainstate.nn` cell — `GRUCell`, `LSTMCell`, `MGUCell`, and the ungated
`ValinaRNNCell` for comparison — of 32 units with its default initialisation, reading 10 Gaussian inputs
per step, and a `Linear` readout of 4; squared error against random targets every step. braintrace runs
its own cells (`braintrace.nn.GRUCell`, ...: one `Linear` per gate where brainstate's cells have one for
all gates) with the same weights, column by column, through `etrace_grad(..., reduction="sum")`; its
gradients are put back in brainstate's layout. The online estimate is Σ_t of each step's gradient with
the weights held fixed; BPTT is `brainstate.transform.grad` of Σ_t loss. The table gives the mean over
seeds (weights, inputs and targets drawn from the seed) and the worst seed.

Writes benchmarks/results/gated.json (or under --out); `benchmarks/tables.py` renders its table.
"""

import argparse
import functools
import json
import pathlib
import time

import brainstate
import brainunit as u
import common
import jax
import jax.numpy as jnp
import numpy as np
import tables

import fusetrace

N_IN, N, N_OUT = 10, 32, 4
CELLS = {
    "gru": ("GRUCell", {"Wrz": ("Wr", "Wz"), "Wh": ("Wh",)}),
    "lstm": ("LSTMCell", {"W": ("Wi", "Wg", "Wf", "Wo")}),
    "mgu": ("MGUCell", {"Wf": ("Wf",), "Wh": ("Wh",)}),
    "vanilla_rnn": ("ValinaRNNCell", {"W": ("W",)}),
}
FUSETRACE = [("d_rtrl", {}), ("e_prop", {}), ("es_d_rtrl", {"decay": 0.9})]
FUSETRACE += [("d_rtrl", {"own_loop_hops": k}) for k in (1, 2)]  # credit round the cell's own recurrence
PEER = [("D_RTRL", "d_rtrl", {}), ("pp_prop", "pp_prop", {"decay_or_rank": 0.9})]
TINY = 1e-300


class Net(brainstate.nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.out = brainstate.nn.Linear(N, N_OUT)

    def update(self, x):
        return self.out(self.cell(x))


def build(kind: str, seed: int, batch: int, library=brainstate.nn) -> Net:
    """The network with seed `seed`'s weights and zero states for `batch`."""
    brainstate.random.seed(seed)
    model = Net(getattr(library, CELLS[kind][0])(N_IN, N))
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


def data(seed: int, steps: int, batch: int):
    kx, ky = jax.random.split(jax.random.PRNGKey(1000 + seed))
    xs = jax.random.normal(kx, (steps, batch, N_IN))
    return xs, 0.5 * jax.random.normal(ky, (steps, batch, N_OUT))


def loss(output, target):
    return jnp.sum((u.get_mantissa(output) - target) ** 2)


def _flat_params(model) -> dict:
    """{("cell", "Wrz", "weight"): array, ...} of the brainstate model's parameters."""
    out = {}
    for path, state in model.states(brainstate.ParamState).items():
        for key, value in state.value.items():
            out[(*path[:-1], key)] = value
    return out


def bptt(model, xs, ys) -> dict:
    weights = model.states(brainstate.ParamState)

    def total():
        return jnp.sum(brainstate.transform.for_loop(lambda x, y: loss(model.update(x), y), xs, ys))

    grads = brainstate.transform.grad(total, weights)()
    return {(*path[:-1], key): value for path, g in grads.items() for key, value in g.items()}


def fusetrace_grads(model, xs, ys, batch, algorithm, **options) -> dict:
    learner = fusetrace.compile(model, xs[0], loss=loss, algorithm=algorithm, batch_size=batch, **options)
    grads = common.summed_grads(learner, xs, ys)
    return {(*path.split(".")[:-1], key): value for path, g in grads.items() for key, value in g.items()}


def peer_grads(model, kind, xs, ys, batch, algorithm, **options) -> dict:
    """braintrace on its own cell with `model`'s weights, gradients in brainstate's layout."""
    braintrace = common.peer()
    other = build(kind, 0, batch, braintrace.nn)
    learner = braintrace.compile(other, algorithm, xs[0], batch_size=batch, **options)
    mine = _flat_params(model)
    for path, state in other.states(brainstate.ParamState).items():
        name = path[1] if path[0] == "cell" else None
        value = {}
        for key in state.value:
            if name is None:
                value[key] = mine[(*path[:-1], key)]
                continue
            ours, pieces = next((o, p) for o, p in CELLS[kind][1].items() if name in p)
            k = pieces.index(name)
            value[key] = mine[("cell", ours, key)][..., k * N : (k + 1) * N]
        state.value = value
    for state in other.states(brainstate.HiddenState).values():
        state.value = jnp.zeros_like(state.value)

    @brainstate.transform.jit
    def run(xs, ys):
        return learner.etrace_grad(xs, ys, step_fn=lambda x, y: loss(learner(x), y), reduction="sum")

    grads = run(xs, ys)
    out = {}
    for ours, pieces in CELLS[kind][1].items():
        for key in ("weight", "bias"):
            parts = [grads[("cell", p, "weight")][key] for p in pieces]
            out[("cell", ours, key)] = jnp.concatenate(parts, axis=-1)
    for path, g in grads.items():
        if path[0] == "out":
            for key, value in g.items():
                out[(*path[:-1], key)] = value
    return out


def compare(got: dict, want: dict) -> dict:
    out = {}
    for path, w in want.items():
        w, g = np.ravel(np.asarray(w)), np.ravel(np.asarray(got[path]))
        cosine = float(np.vdot(g, w) / (np.linalg.norm(g) * np.linalg.norm(w) + TINY))
        out[".".join(path)] = {"cosine": cosine, "norm_ratio": float(np.linalg.norm(g) / (np.linalg.norm(w) + TINY))}
    return out


def methods(quick: bool):
    out = []
    for algorithm, options in FUSETRACE if not quick else FUSETRACE[:1]:
        label = algorithm + "".join(f"({v})" if k == "decay" else f"({k}={v})" for k, v in options.items())
        out.append(("fusetrace", label, functools.partial(fusetrace_grads, algorithm=algorithm, **options), False))
    if common.peer() is not None:
        for name, algorithm, options in PEER if not quick else PEER[:1]:
            out.append(("braintrace", name, functools.partial(peer_grads, algorithm=algorithm, **options), True))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    brainstate.environ.set(precision=64)
    kinds = list(CELLS) if not args.quick else ["gru"]
    seeds = range(args.seeds if not args.quick else 1)
    rows = []
    for kind in kinds:
        for seed in seeds:
            xs, ys = data(seed, args.steps, args.batch)
            reference = bptt(build(kind, seed, args.batch), xs, ys)
            for library, label, run, needs_kind in methods(args.quick):
                model = build(kind, seed, args.batch)
                start = time.perf_counter()
                got = run(model, kind, xs, ys, args.batch) if needs_kind else run(model, xs, ys, args.batch)
                seconds = time.perf_counter() - start
                for weight, numbers in compare(got, reference).items():
                    row = {"cell": kind, "seed": seed, "library": library, "algorithm": label, "weight": weight}
                    rows.append({**row, **numbers, "seconds": seconds})
                print(f"{kind} seed {seed} {library} {label}: {seconds:.1f} s", flush=True)
    result = {
        "config": {"steps": args.steps, "batch": args.batch, "seeds": len(seeds), "n_in": N_IN, "n": N, "n_out": N_OUT},
        "peer": common.peer_version(),
        "rows": rows,
        "summary": summarize(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gated.json").write_text(json.dumps(result, indent=1))
    print(tables.gated(result))
    return result


def summarize(rows: list[dict]) -> list[dict]:
    """Per (cell, library, algorithm, weight): mean cosine and norm ratio over seeds, and the worst seed's."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["cell"], row["library"], row["algorithm"], row["weight"]), []).append(row)
    out = []
    for (cell, library, algorithm, weight), found in groups.items():
        cosines = [r["cosine"] for r in found]
        ratios = [r["norm_ratio"] for r in found]
        worst_ratio = max(ratios, key=lambda r: abs(np.log(max(r, TINY))))
        out.append(
            {
                "cell": cell,
                "library": library,
                "algorithm": algorithm,
                "weight": weight,
                "cosine": float(np.mean(cosines)),
                "worst_cosine": float(min(cosines)),
                "norm_ratio": float(np.mean(ratios)),
                "worst_ratio": float(worst_ratio),
                "bar": bool(min(cosines) >= 0.95 and all(0.5 <= r <= 2 for r in ratios)),
            }
        )
    return out


if __name__ == "__main__":
    main()
