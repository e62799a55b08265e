"""Memory against sequence length T: XLA's compiled memory analysis of each method's whole-sequence
program, and the peak RSS of a fresh process running it; then braintrace's own memory-benchmark
configuration (3 recurrent LIF layers x 512, 32,768 Poisson inputs) at the largest batch that fits.

    python benchmarks/memory.py [--neurons 512 2048] [--steps 100 300 1000] [--rss-neurons 512] [--out DIR] [--quick]

A program is T steps in one compiled loop (inputs and targets drawn inside it, so nothing in its
arguments grows with T), returning the summed gradients: BPTT differentiates the whole loop; the online
methods carry their traces through it; "forward" only simulates. Compiled memory = arguments + outputs
+ temporaries − aliased bytes (`compiled.memory_analysis()`); it needs compilation only. Peak RSS is the
VmHWM of a separate process per (method, T) that compiles and runs the program once (it includes the
interpreter, the libraries and compilation; getrusage's ru_maxrss is not used: Linux carries it over
from the parent across exec). float32, B = 16, same model as speed.py.
Writes benchmarks/results/memory.json and docs/images/bench-memory.png (or under --out).
"""

import argparse
import json
import time

import common
import jax

FLAT_TOLERANCE = 0.05  # target: an online program at the largest T within 5% of the smallest
BUDGET_FRACTION = 0.75  # the share of physical memory a program may take to count as "fits this machine"
DEEP_SPEC = common.Spec(n_in=32768, n=512, n_out=11, layers=3, recurrent=True, in_scale=3.0, hidden_scale=3.0)
DEEP_STEPS = (50, 100, 200, 400, 1000)
DEEP_BATCHES = (128, 64, 32, 16, 8, 4, 2, 1)


ONLINE = ("fusetrace d_rtrl", "fusetrace es_d_rtrl", "braintrace D_RTRL", "braintrace pp_prop")


def compiled(spec: common.Spec, batch: int, steps_list, methods=None) -> dict:
    """{method: {T: memory fields or {"error": ...}}} from compiling each program (nothing is run)."""
    out = {}
    for name in methods or common.methods():
        out[name] = {}
        make = None
        for steps in steps_list:
            start = time.perf_counter()
            try:
                make = make or common.sequence_maker(name, common.build(spec, batch), batch)
                entry = common.compiled_memory(make(steps).lower())
            except Exception as error:  # a program that cannot be built or compiled here is a result, not a crash
                entry = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            out[name][str(steps)] = entry
            shown = f"{entry['total_bytes'] / 2**20:10.1f} MiB" if "total_bytes" in entry else entry["error"][:80]
            print(f"  {name:22s} T={steps:5d} {shown}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def flatness(table: dict) -> dict:
    """For each online method: total bytes at the largest T over the smallest, and the 5% target."""
    out = {}
    for name in ONLINE:
        if name not in table:
            continue
        rows = {int(t): v["total_bytes"] for t, v in table[name].items() if "total_bytes" in v}
        if len(rows) >= 2:
            growth = rows[max(rows)] / rows[min(rows)] - 1.0
            out[name] = {"growth": growth, "target": FLAT_TOLERANCE, "met": abs(growth) <= FLAT_TOLERANCE}
    return out


def versus(table: dict, ours: str = "fusetrace es_d_rtrl", theirs: str = "braintrace pp_prop") -> dict:
    """{T: our total bytes / theirs} (target: at most 1), empty without the peer."""
    if ours not in table or theirs not in table:
        return {}
    out = {}
    for steps, entry in table[ours].items():
        other = table[theirs].get(steps, {})
        if "total_bytes" in entry and "total_bytes" in other:
            ratio = entry["total_bytes"] / other["total_bytes"]
            out[steps] = {"ratio": ratio, "target": 1.0, "met": ratio <= 1.0}
    return out


def child(args) -> None:
    """One (method, T) in this fresh process: build, compile and run once; print the RSS figures as JSON."""
    common.apply_memory_limit()
    common.configure(32)
    spec = DEEP_SPEC if args.config == "deep" else common.Spec(n=args.neurons)
    model = common.build(spec, args.batch)
    before = common.peak_rss_bytes()
    program = common.sequence_maker(args.child, model, args.batch)(args.child_steps)
    start = time.perf_counter()
    jax.block_until_ready(program.run())
    seconds = time.perf_counter() - start
    print(json.dumps({"rss_before_bytes": before, "peak_rss_bytes": common.peak_rss_bytes(), "run_s": seconds}))


def rss(neurons: int, batch: int, steps_list, timeout_s: float, methods=None) -> dict:
    """{method: {T: child result}}: peak RSS of a separate process per (method, T)."""
    out = {}
    for name in methods or common.methods():
        out[name] = {}
        for steps in steps_list:
            result = common.run_child(
                "memory.py",
                *("--child", name, "--child-steps", str(steps), "--neurons", str(neurons), "--batch", str(batch)),
                timeout_s=timeout_s,
            )
            out[name][str(steps)] = result
            shown = f"{result['peak_rss_bytes'] / 2**20:8.0f} MiB" if "peak_rss_bytes" in result else result["error"]
            print(f"  rss {name:22s} T={steps:5d} {shown}", flush=True)
    return out


def deep_batch(spec: common.Spec, batches, steps: int, budget: int) -> tuple[int, dict]:
    """The largest batch at which BPTT over `steps` steps compiles to at most `budget` bytes."""
    tried = {}
    for batch in batches:
        entry = compiled(spec, batch, [steps], methods=["bptt"])["bptt"][str(steps)]
        tried[str(batch)] = entry.get("total_bytes")
        if entry.get("total_bytes", budget + 1) <= budget:
            return batch, tried
    return batches[-1], tried


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    panels = [("compiled", f"compiled memory, N = {result['neurons'][-1]}", result["compiled"][-1]["methods"], None)]
    if result.get("rss"):
        panels.append(("rss", f"peak RSS (separate runs), N = {result['rss_neurons']}", result["rss"], None))
    deep = result.get("deep")
    if deep:
        title = f"braintrace's configuration, B = {deep['batch']}"
        panels.append(("compiled", title, deep["methods"], deep["budget_bytes"]))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.2), squeeze=False)
    for axis, (kind, title, table, budget) in zip(axes[0], panels, strict=True):
        key = "total_bytes" if kind == "compiled" else "peak_rss_bytes"
        for name, rows in table.items():
            points = sorted((int(t), v[key]) for t, v in rows.items() if key in v)
            if points:
                style = "-o" if name.startswith("fusetrace") else "--s" if name.startswith("brain") else ":^"
                axis.plot([p[0] for p in points], [p[1] / 2**20 for p in points], style, label=name)
        if budget:
            axis.axhline(budget / 2**20, color="k", lw=0.7, ls="--", label="this machine's budget")
        axis.set_xscale("log")
        axis.set_yscale("log" if kind == "compiled" else "linear")
        axis.set_xlabel("sequence length T")
        axis.set_ylabel("MiB")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=7)
    common.save_figure(figure, path, "Memory against sequence length (float32, CPU)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--rss-neurons", type=int, default=512, help="N of the peak-RSS runs (0: skip them)")
    parser.add_argument("--rss-timeout", type=float, default=1800.0)
    parser.add_argument("--no-deep", action="store_true", help="skip braintrace's configuration")
    parser.add_argument("--out", default=None, help="write results/ and images/ under this folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for run_all --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--config", default="speed", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    deep_spec, deep_steps, deep_batches = DEEP_SPEC, DEEP_STEPS, DEEP_BATCHES
    rss_steps, rss_methods, deep_methods = args.steps, None, None
    if args.quick:  # tiny sizes; one RSS run; braintrace's configuration for one method at one batch
        args.neurons, args.batch, args.steps, args.rss_neurons = [32], 4, [10, 30], 32
        deep_spec = common.Spec(n_in=256, n=32, n_out=11, layers=3, in_scale=3.0, hidden_scale=3.0)
        deep_steps, deep_batches, rss_steps = (10, 30), (4,), [10]
        rss_methods, deep_methods = ["fusetrace es_d_rtrl"], ["fusetrace es_d_rtrl"]
    common.configure(32)
    result = {"batch": args.batch, "steps": args.steps, "neurons": args.neurons, "compiled": []}
    for n in args.neurons:
        print(f"compiled memory, N={n}, B={args.batch}", flush=True)
        table = compiled(common.Spec(n=n), args.batch, args.steps)
        entry = {"neurons": n, "methods": table, "flatness": flatness(table), "es_d_rtrl_vs_pp_prop": versus(table)}
        result["compiled"].append(entry)
    if args.rss_neurons:
        print(f"peak RSS, N={args.rss_neurons}", flush=True)
        result["rss_neurons"] = args.rss_neurons
        result["rss"] = rss(args.rss_neurons, args.batch, rss_steps, args.rss_timeout, methods=rss_methods)
    if not args.no_deep:
        budget = int(BUDGET_FRACTION * common.machine()["memory_gib"] * 2**30)
        batch, tried = deep_batch(deep_spec, deep_batches, max(deep_steps), budget)
        print(f"braintrace's configuration at B={batch}", flush=True)
        table = compiled(deep_spec, batch, deep_steps, methods=deep_methods)
        result["deep"] = {
            "spec": dict(vars(deep_spec)),
            "batch": batch,
            "budget_bytes": budget,
            "bptt_bytes_by_batch": tried,
            "steps": list(deep_steps),
            "methods": table,
            "flatness": flatness(table),
            "es_d_rtrl_vs_pp_prop": versus(table),
        }
    json_path, png_path = common.output_paths(args.out, "memory")
    common.write_json(json_path, result)
    plot(result, png_path)


if __name__ == "__main__":
    main()
