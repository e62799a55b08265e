"""Compile cost: how the size of each program, and the time of its first `jax.jit` call, grow with the model.

    python benchmarks/compile.py [--populations 2 4 8 16 32 64 128] [--states 2 3 4 5] [--states-at 8]
                                 [--batch 4] [--methods ...] [--timeout 900] [--out DIR] [--quick]

The model is a ring of K populations of 32 LIF neurons: population k receives population k−1's spikes
through a dense projection and the input (20 Poisson channels) through its own, and one LeakyRateReadout
(4 outputs) reads every population's spikes. Its states per neuron are set by the synapses
(`SYNAPSES`): 2 (one Expon shared by both projections, V and g), 3 (an Expon each, different time
constants), 4 (a DualExpon for the input, an Expon for the ring), 5 (a DualExpon each).

For each method and size, in a fresh process: the equations of the program's jaxpr, nested sub-jaxprs
counted (`count_equations`); the time of the first `jax.jit` call (trace, lower, XLA compile and one run:
the median of `FIRST_CALLS`, jax's caches cleared before each); the median run time per step over a few
calls. For the fused steps also the live equations (what jit lowers after dropping dead code) and one
first call split into its phases (trace, lower, XLA compile). Methods:
`forward` (the model's own step, through brainstate's jit), `bptt` (the gradient of a 10-step summed loss)
and fusetrace's fused `es_d_rtrl`, `d_rtrl` and `e_prop` steps — for those also `fusetrace.compile`'s
time and the fused step's equations by part (`passes.fuse.SCOPES`, read from each equation's name stack).
`forward` also reports the equations of the captured step fusetrace derives from (simplified).

A size that does not finish within `--timeout` is recorded as an error and larger sizes of that method
are skipped. float32, batch 4. Writes benchmarks/results/compile.json and docs/images/bench-compile.png
(or under --out); the plot also shows `compile_before.json` beside it, when there is one, dashed (the
same sweep on the commit before issue 19's changes).
"""

import argparse
import json
import pathlib
import statistics
import time

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import common
import jax
import jax.numpy as jnp

import fusetrace
from fusetrace._compat import dce
from fusetrace.program import summarize_program
from fusetrace.rules.control import count_equations

NEURONS = 32  # per population
N_IN = 20
N_OUT = 4
BPTT_STEPS = 10
RUN_CALLS = 20  # timed calls after the first, for the run time per step
FIRST_CALLS = 3  # first calls timed (median), each after clearing jax's caches ...
REPEAT_BELOW_S = 60.0  # ... unless one takes longer than this
METHODS = ("forward", "bptt", "es_d_rtrl", "d_rtrl", "e_prop")
ALGORITHMS = METHODS[2:]
# states per neuron -> (input synapse, ring synapse); equal Expons are merged into one state by brainpy
SYNAPSES = {
    2: (("expon", 5.0), ("expon", 5.0)),
    3: (("expon", 5.0), ("expon", 10.0)),
    4: (("dual", 5.0), ("expon", 10.0)),
    5: (("dual", 5.0), ("dual", 10.0)),
}


# --------------------------------------------------------------------------- the model


def _projection(comm, post, synapse: tuple[str, float]) -> bps.AlignPostProj:
    kind, tau_ms = synapse
    zero = braintools.init.Constant(0.0 * u.mA)
    if kind == "expon":
        desc = bps.Expon.desc(NEURONS, tau=tau_ms * u.ms, g_initializer=zero)
    else:
        desc = bps.DualExpon.desc(NEURONS, tau_decay=tau_ms * u.ms, tau_rise=1.0 * u.ms, g_initializer=zero)
    return bps.AlignPostProj(comm=comm, syn=desc, out=bps.CUBA.desc(scale=1.0), post=post)


class Ring(brainstate.nn.Module):
    """K LIF populations in a ring (`pop{k}` gets `pop{k-1}`'s spikes through `ring{k}` and the input
    through `inp{k}`) and a LeakyRateReadout `out` of all their spikes."""

    def __init__(self, populations: int, states: int = 2):
        super().__init__()
        self.populations = populations
        input_synapse, ring_synapse = SYNAPSES[states]
        init = braintools.init.KaimingNormal(scale=3.0, unit=u.mA)
        v0 = braintools.init.Uniform(0.0 * u.mV, 1.0 * u.mV)
        for k in range(populations):
            lif = bps.LIF(NEURONS, V_th=1.0 * u.mV, tau=10.0 * u.ms, V_initializer=v0)
            setattr(self, f"pop{k}", lif)
            inp = brainstate.nn.Linear(N_IN, NEURONS, b_init=None, w_init=init)
            setattr(self, f"inp{k}", _projection(inp, lif, input_synapse))
            ring = brainstate.nn.Linear(NEURONS, NEURONS, b_init=None, w_init=init)
            setattr(self, f"ring{k}", _projection(ring, lif, ring_synapse))
        self.out = bps.LeakyRateReadout(populations * NEURONS, N_OUT, tau=20.0 * u.ms)

    def update(self, x):
        k_all = range(self.populations)
        for k in k_all:
            getattr(self, f"ring{k}")(getattr(self, f"pop{(k - 1) % self.populations}").get_spike())
            getattr(self, f"inp{k}")(x)
        spikes = [getattr(self, f"pop{k}")(0.0 * u.mA) for k in k_all]
        return self.out(jnp.concatenate(spikes, axis=-1))


def build(populations: int, states: int, batch: int) -> Ring:
    brainstate.random.seed(0)
    model = Ring(populations, states)
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


def _inputs(batch: int, steps: int):
    key = jax.random.key(1)
    dtype = brainstate.environ.dftype()
    x = (jax.random.uniform(key, (steps, batch, N_IN)) < 0.05).astype(dtype)
    y = jax.random.normal(jax.random.fold_in(key, 1), (steps, batch, N_OUT), dtype)
    return x, y


# --------------------------------------------------------------------------- measuring one method


def _timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(function(*args))
    return time.perf_counter() - start, out


def _first_call(make, *args, tries: int = FIRST_CALLS) -> tuple[dict, object, object]:
    """`({"first_call_s", "first_call_cpu_s"}, function, output)`: the median wall and CPU (this process,
    all threads) seconds of the first call of a freshly jitted `make()`, over up to `tries`
    (jax's caches cleared before each; one try when it takes over `REPEAT_BELOW_S`), so that a burst of
    load from other jobs on the machine does not decide the number. CPU time is the steadier of the two
    on a shared machine."""
    wall, cpu = [], []
    while True:
        jax.clear_caches()
        function = make()
        start = time.process_time()
        seconds, out = _timed(function, *args)
        wall.append(seconds)
        cpu.append(time.process_time() - start)
        if len(wall) == tries or seconds > REPEAT_BELOW_S:
            times = {"first_call_s": statistics.median(wall), "first_call_cpu_s": statistics.median(cpu)}
            return times, function, out


def _run_ms(function, args_of, steps: int = 1) -> float:
    samples = []
    for call in range(RUN_CALLS):
        start = time.perf_counter()
        jax.block_until_ready(function(*args_of(call)))
        samples.append((time.perf_counter() - start) * 1e3 / steps)
    return statistics.median(samples)


def equations_by_part(closed) -> dict[str, int]:
    """Equations (nested counted) by the part of the fused step that emitted them (`fusetrace.program`)."""
    return {part.name: part.equations for part in summarize_program(closed).parts}


def _forward(model, x, y, tries: int) -> dict:
    jaxpr, _ = brainstate.transform.make_jaxpr(model.update)(x[0])
    captured = fusetrace.analyze(model, x[0], batch_size=x.shape[1]).captured
    first, step, _ = _first_call(lambda: brainstate.transform.jit(model.update), x[0], tries=tries)
    return {
        "equations": count_equations(jaxpr.jaxpr),
        "captured_equations": count_equations(captured.jaxpr.jaxpr),
        **first,
        "run_ms": _run_ms(step, lambda t: (x[t % len(x)],)),
    }


def _bptt(model, x, y, tries: int) -> dict:
    weights = model.states(brainstate.ParamState)

    def total(xs, ys):
        def body(xy):
            return common.loss(model.update(xy[0]), xy[1])

        return jnp.sum(brainstate.transform.for_loop(body, (xs, ys)))

    gradient = brainstate.transform.grad(total, weights)
    jaxpr, _ = brainstate.transform.make_jaxpr(gradient)(x, y)
    first, sequence, _ = _first_call(lambda: brainstate.transform.jit(gradient), x, y, tries=tries)
    return {
        "equations": count_equations(jaxpr.jaxpr),
        **first,
        "run_ms": _run_ms(sequence, lambda t: (x, y), BPTT_STEPS),
    }


def _fused(model, x, y, algorithm: str, tries: int) -> dict:
    start = time.perf_counter()
    learner = fusetrace.compile(model, x[0], loss=common.loss, algorithm=algorithm, batch_size=x.shape[1])
    compile_s = time.perf_counter() - start
    args = (learner.params, learner.init(), x[0], y[0])
    jaxpr = jax.make_jaxpr(learner.step)(*args)
    jax.clear_caches()
    phases, lowered = {}, jax.jit(learner.step)  # one first call in phases: trace, lower, XLA compile
    for phase in ("trace", "lower", "compile"):
        start = time.perf_counter()
        lowered = getattr(lowered, phase)(*args) if phase == "trace" else getattr(lowered, phase)()
        phases[f"{phase}_s"] = time.perf_counter() - start
    first, step, (state, _) = _first_call(lambda: jax.jit(learner.step), *args, tries=tries)
    carried = {"state": state}

    def args_of(t):
        return args[0], carried["state"], x[t % len(x)], y[t % len(y)]

    def run(*args):
        carried["state"], result = step(*args)
        return result.grads

    return {
        "equations": count_equations(jaxpr.jaxpr),
        "live_equations": count_equations(dce(jaxpr.jaxpr)),  # what jit lowers (it drops dead code first)
        "by_part": equations_by_part(jaxpr),
        "chain_nodes": len(learner.plan.chains),
        "fusetrace_compile_s": compile_s,
        **phases,
        **first,
        "run_ms": _run_ms(run, args_of),
    }


def measure(method: str, populations: int, states: int, batch: int, tries: int = FIRST_CALLS) -> dict:
    """One method on one ring, in this process (`tries`: first calls timed)."""
    common.configure(32)
    model = build(populations, states, batch)
    x, y = _inputs(batch, BPTT_STEPS)
    if method == "forward":
        return _forward(model, x, y, tries)
    if method == "bptt":
        return _bptt(model, x, y, tries)
    return _fused(model, x, y, method, tries)


# --------------------------------------------------------------------------- sweeps, results, plot


def sweep(
    methods, sizes: list[tuple[int, int]], batch: int, timeout_s: float, isolate: bool = True, results=None, saved=None
) -> dict:
    """`{method: {"K,S": result}}` over `sizes` (K populations, S states per neuron), each in a fresh process,
    every method at one size before the next size (so methods compared at a size ran under similar load);
    after a failure (or a timeout) a method skips its larger sizes. Fills `results` when given, calling
    `saved()` after each size (so a run stopped from outside keeps what it measured)."""
    results = {method: {} for method in methods} if results is None else results
    for populations, states in sizes:
        for method in methods:
            if any("error" in r for r in results[method].values()):
                results[method][f"{populations},{states}"] = {"error": "skipped after a smaller size failed"}
                continue
            args = ("--child", method, "--populations", str(populations), "--states", str(states))
            if isolate:
                result = common.run_child("compile.py", *args, "--batch", str(batch), timeout_s=timeout_s)
            else:
                result = measure(method, populations, states, batch, tries=1)  # a smoke run (--quick)
            results[method][f"{populations},{states}"] = result
            shown = result.get("error") or (
                f"{result['equations']:>9,d} eqns, first call {result['first_call_s']:7.2f} s, "
                f"run {result['run_ms']:8.3f} ms/step"
            )
            print(f"  {method:9s} K={populations:<4d} S={states}  {shown}", flush=True)
            if saved is not None:
                saved()
    return results


def _series(results: dict, method: str, key: str, axis: int, fixed: int):
    points = []
    for size, result in results.get(method, {}).items():
        populations, states = map(int, size.split(","))
        if "error" not in result and (states, populations)[axis] == fixed:
            points.append(((populations, states)[axis], result[key]))
    return sorted(points)


def plot(payload: dict, path, before: dict | None = None) -> None:
    """Equations and first-call time against K, equations against states per neuron; `before` (an earlier
    results file, e.g. `compile_before.json`) dashed."""
    plt = common.pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14.0, 4.2))
    styles = {"forward": "o", "bptt": "s", "es_d_rtrl": "^", "d_rtrl": "v", "e_prop": "d"}
    states, populations = payload["states_per_neuron"], payload["populations_for_states"]
    runs = [(payload, "-", "")] + ([(before, "--", f" ({before['machine']['fusetrace_commit']})")] if before else [])
    for run, line, suffix in runs:
        for method, marker in styles.items():
            if run is before and method in ("forward", "bptt"):
                continue  # unchanged by fusetrace
            color = f"C{list(styles).index(method)}"
            panels = [(axes[0], "equations"), (axes[1], "first_call_s")]
            if run is before and before["machine"].get("cpu") != payload.get("machine", {}).get("cpu"):
                panels = panels[:1]  # times from another machine are not comparable; equations are
            for axis, key in panels:
                points = _series(run["by_populations"], method, key, 0, states)
                if points:
                    axis.plot(*zip(*points, strict=True), line + marker, color=color, label=method + suffix)
            points = _series(run["by_states"], method, "equations", 1, populations)
            if points:
                axes[2].plot(*zip(*points, strict=True), line + marker, color=color, label=method + suffix)
    for axis in axes[:2]:
        axis.set_xscale("log", base=2)
        axis.set_xlabel(f"populations K (32 LIF neurons each, {states} states per neuron)")
    for axis in axes:
        axis.set_yscale("log")
    axes[0].set_ylabel("equations of the program (nested counted)")
    axes[1].set_ylabel("first jax.jit call (s): trace + compile + run")
    axes[2].set_xlabel(f"states per neuron (K = {populations})")
    axes[2].set_ylabel("equations of the program")
    axes[0].legend(fontsize=7)
    title = f"Program size and compile time on a ring of populations (batch {payload['batch']}, float32, CPU)"
    common.save_figure(figure, path, title)


BAR_SIZES = (8, 32)
BAR_METHODS = ("forward", "bptt", "es_d_rtrl")
SIZE_BAR, COMPILE_BAR, GROWTH_BAR = 10.0, 3.0, 1.25  # issue 19's targets


def bars(rounds: int, batch: int, timeout_s: float) -> dict:
    """Issue 19's targets on the ring (2 states per neuron), from `rounds` rounds in which forward, BPTT and
    es_d_rtrl take turns at K = 8 and 32 (fresh processes), so that the load of other jobs falls on all of
    them alike; first-call times are the median over the rounds of each round's median."""
    runs: dict[str, dict[int, list]] = {m: {k: [] for k in BAR_SIZES} for m in BAR_METHODS}
    for round_ in range(rounds):
        for populations in BAR_SIZES:
            for method in BAR_METHODS:
                args = ("--child", method, "--populations", str(populations), "--states", "2", "--batch", str(batch))
                result = common.run_child("compile.py", *args, timeout_s=timeout_s)
                runs[method][populations].append(result)
                print(f"  round {round_ + 1} {method:9s} K={populations:<3d} {result.get('first_call_s', result)}")

    def median(method, populations, key):
        return statistics.median(r[key] for r in runs[method][populations] if "error" not in r)

    small, large = BAR_SIZES
    forward = {k: median("forward", k, "captured_equations") for k in BAR_SIZES}
    fused = {k: median("es_d_rtrl", k, "equations") for k in BAR_SIZES}
    size = fused[large] / forward[large]
    wall = median("es_d_rtrl", large, "first_call_s") / median("bptt", large, "first_call_s")
    cpu = median("es_d_rtrl", large, "first_call_cpu_s") / median("bptt", large, "first_call_cpu_s")
    growth = (fused[large] / fused[small]) / (forward[large] / forward[small])
    first_call = f"es_d_rtrl first jit call at K = {large} ≤ {COMPILE_BAR:g} × a 10-step BPTT gradient's"
    targets = [
        (f"es_d_rtrl equations at K = {large} ≤ {SIZE_BAR:g} × the forward step's", size, SIZE_BAR),
        (f"{first_call} (wall seconds)", wall, COMPILE_BAR),
        (f"{first_call} (CPU seconds)", cpu, COMPILE_BAR),
        (f"es_d_rtrl growth K = {small} → {large} ≤ {GROWTH_BAR:g} × the forward step's", growth, GROWTH_BAR),
    ]
    return {
        "rounds": rounds,
        "targets": [{"target": t, "value": v, "bound": b, "met": v <= b} for t, v, b in targets],
        "runs": {m: {str(k): v for k, v in by_k.items()} for m, by_k in runs.items()},
    }


def merge(parts: list[dict]) -> dict:
    """One results payload from runs of the same sweep over different methods (`--methods`, run in
    parallel): their per-method results side by side, the first run's settings and machine, and the
    targets of whichever run measured them."""
    settings = ("batch", "neurons_per_population", "bptt_steps", "states_per_neuron", "populations_for_states")
    first = parts[0]
    for part in parts[1:]:
        different = [key for key in settings if key in part and part[key] != first.get(key)]
        if different:
            raise ValueError(f"the runs differ in {different}: they are not one sweep")
    payload = {key: first[key] for key in (*settings, "machine") if key in first}
    for sweep_name in ("by_populations", "by_states"):
        payload[sweep_name] = {m: r for part in parts for m, r in part.get(sweep_name, {}).items()}
    targets = [part["targets"] for part in parts if "targets" in part]
    if targets:
        payload["targets"] = targets[0]
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--states", type=int, nargs="+", default=sorted(SYNAPSES), choices=sorted(SYNAPSES))
    parser.add_argument("--states-at", type=int, default=8, help="K of the states-per-neuron sweep")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--out", default=None, help="write results/ and images/ under this folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, in this process (run_all --quick)")
    parser.add_argument("--bars", type=int, metavar="ROUNDS", help="measure issue 19's targets only, in ROUNDS rounds")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="join runs (--out DIR) of other methods")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.populations[0], args.states[0], args.batch)))
        return
    json_path, png_path = common.output_paths(args.out, "compile")
    if args.bars:  # into the existing results file
        payload = json.loads(json_path.read_text()) if json_path.exists() else {}
        payload.pop("machine", None)
        common.write_json(json_path, {**payload, "targets": bars(args.bars, args.batch, args.timeout)})
        return
    if args.quick:
        args.populations, args.states, args.states_at = [2, 3], [2, 3], 2
    if args.merge:
        payload = merge([json.loads((pathlib.Path(d) / "results" / "compile.json").read_text()) for d in args.merge])
        common.write_json(json_path, payload)
    else:
        default_states, isolate = min(args.states), not args.quick
        payload = {
            "batch": args.batch,
            "neurons_per_population": NEURONS,
            "bptt_steps": BPTT_STEPS,
            "states_per_neuron": default_states,
            "populations_for_states": args.states_at,
            "by_populations": {method: {} for method in args.methods},
            "by_states": {method: {} for method in args.methods},
        }

        def saved():
            common.write_json(json_path, payload)

        by_k, by_s = [(k, default_states) for k in args.populations], [(args.states_at, s) for s in args.states]
        sweep(args.methods, by_k, args.batch, args.timeout, isolate, payload["by_populations"], saved)
        sweep(args.methods, by_s, args.batch, args.timeout, isolate, payload["by_states"], saved)
    before_path = json_path.with_name("compile_before.json")
    plot(payload, png_path, json.loads(before_path.read_text()) if before_path.exists() else None)


if __name__ == "__main__":
    main()
