"""Scale: the largest network (recurrent LIF, sparse fixed-number connectivity, 100 connections per neuron)
on which fusetrace's es_d_rtrl runs one step on this machine, and the largest on which BPTT runs one
T = 1000 sequence.

    python benchmarks/scale.py [--batch 16] [--start-es 65536] [--start-bptt 4096] [--refine 2] [--methods ...]
                               [--out DIR] [--quick]

Each attempt is a fresh process (build the model, compile, run once) whose address space is capped at a
memory budget (75% of physical memory, or what is available now less 2 GiB if that is less), so an attempt
that does not fit fails inside that process. N doubles until an attempt fails, then `--refine` bisection
steps narrow the gap. A method left out of --methods keeps its result from the existing file; each result
records the fusetrace commit it ran on. float32; 100 Poisson inputs, readout of 10; recurrent weights in
an EventFixedProb (brainevent's event-driven sparse product). Writes benchmarks/results/scale.json and
docs/images/bench-scale.png (or under --out).
"""

import argparse
import json
import time

import common
import jax
import matplotlib.ticker

CONNECTIONS = 100
BPTT_STEPS = 1000
BUDGET_FRACTION = 0.75
RESERVE = 2 * 2**30  # left to the rest of the machine when the budget comes from what is available now
CHILD_TIMEOUT_S = 1800.0
SMALLEST = 128
METHODS = ("es_d_rtrl", "bptt")


def spec(neurons: int) -> common.Spec:
    return common.Spec(n=neurons, sparse_conn=min(CONNECTIONS, neurons))


def attempt(method: str, neurons: int, batch: int, steps: int) -> dict:
    """Build, compile and run one step (es_d_rtrl) or one sequence (bptt) at N: timings and peak RSS."""
    start = time.perf_counter()
    model = common.build(spec(neurons), batch)
    built = time.perf_counter()
    if method == "es_d_rtrl":
        bank = common.input_bank(model.spec, batch, 1)
        program = common.step_program("fusetrace es_d_rtrl", model, batch, bank, bptt_steps=1)
    else:
        program = common.bptt_sequence(model, batch, steps)
    jax.block_until_ready(program.run())  # compiles, then runs
    first = time.perf_counter()
    jax.block_until_ready(program.run())
    return {
        "neurons": neurons,
        "build_s": built - start,
        "compile_and_first_call_s": first - built,
        "call_s": time.perf_counter() - first,
        "peak_rss_bytes": common.peak_rss_bytes(),
    }


def child(args) -> None:
    """One attempt in this fresh process, under the memory cap; its result as a JSON line."""
    common.apply_memory_limit()
    common.configure(32)
    print(json.dumps(attempt(args.child, args.neurons, args.batch, args.steps)))


def search(method: str, start: int, batch: int, steps: int, refine: int, budget: int, cap: int, isolate=True) -> dict:
    """Double N from `start` until an attempt fails (or `cap`; halve instead while even `start` fails), then
    bisect `refine` times. Each attempt runs in its own capped process unless `isolate` is False (tiny smoke
    runs: in this process)."""
    attempts = {}

    def fits(n: int) -> bool:
        if isolate:
            args = ("--child", method, "--neurons", str(n), "--batch", str(batch), "--steps", str(steps))
            result = common.run_child("scale.py", *args, timeout_s=CHILD_TIMEOUT_S, memory_limit=budget)
        else:
            result = attempt(method, n, batch, steps)
        attempts[str(n)] = result
        shown = f"ok, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB" if "error" not in result else result["error"]
        print(f"  {method:9s} N={n:10d} {shown}", flush=True)
        return "error" not in result

    ok, bad, n = None, None, start
    while n <= cap:
        if fits(n):
            ok, n = n, 2 * n
        else:
            bad = n
            break
    while ok is None and bad is not None and bad > SMALLEST:  # the start did not fit: halve until one does
        n = bad // 2
        if fits(n):
            ok = n
        else:
            bad = n
    for _ in range(refine if ok is not None and bad is not None else 0):
        middle = (ok + bad) // 2
        if fits(middle):
            ok = middle
        else:
            bad = middle
    return {"largest_ok": ok, "smallest_failed": bad, "capped": bad is None, "attempts": attempts}


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.0))
    for method, style in (("es_d_rtrl", "-o"), ("bptt", "-s")):
        entry = result["methods"][method]
        points = sorted((int(n), v["peak_rss_bytes"]) for n, v in entry["attempts"].items() if "error" not in v)
        failed = sorted(int(n) for n, v in entry["attempts"].items() if "error" in v)
        label = "fusetrace es_d_rtrl, one step" if method == "es_d_rtrl" else f"BPTT, T = {result['bptt_steps']}"
        label += f" ({entry.get('commit', '?')})"
        line = axis.plot([p[0] for p in points], [p[1] / 2**30 for p in points], style, label=label)[0]
        if failed:
            axis.plot(failed, [result["budget_bytes"] / 2**30] * len(failed), "x", color=line.get_color(), ms=9)
    axis.axhline(result["budget_bytes"] / 2**30, color="k", lw=0.7, ls="--", label="memory budget (x: failed)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_yticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel("neurons N (100 connections each)")
    axis.set_ylabel("peak RSS of the run (GiB)")
    axis.set_title(f"Largest network per method, B = {result['batch']} (float32, CPU)", fontsize=10)
    axis.legend(fontsize=8)
    common.save_figure(figure, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--start-es", type=int, default=65536)
    parser.add_argument("--start-bptt", type=int, default=4096)
    parser.add_argument("--refine", type=int, default=2)
    parser.add_argument("--cap", type=int, default=1 << 26, help="stop doubling beyond this N")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="searches to run now")
    parser.add_argument("--out", default=None, help="write results/ and images/ under this folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, capped, in this process (run_all --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--neurons", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=BPTT_STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    steps = BPTT_STEPS
    if args.quick:
        args.batch, args.start_es, args.start_bptt, args.refine, args.cap, steps = 2, 128, 128, 0, 128, 10
    physical = int(common.machine()["memory_gib"] * 2**30)
    budget = min(int(BUDGET_FRACTION * physical), common.available_bytes() - RESERVE)
    print(f"memory budget per attempt: {budget / 2**30:.1f} GiB", flush=True)
    result = {"batch": args.batch, "connections": CONNECTIONS, "bptt_steps": steps, "budget_bytes": budget}
    json_path, png_path = common.output_paths(args.out, "scale")
    previous = json.loads(json_path.read_text())["methods"] if json_path.exists() else {}
    starts = {"es_d_rtrl": (args.start_es, 1), "bptt": (args.start_bptt, steps)}
    result["methods"] = {}
    for method in METHODS:
        if method in args.methods:
            start, length = starts[method]
            found = search(method, start, args.batch, length, args.refine, budget, args.cap, isolate=not args.quick)
            result["methods"][method] = {**found, "commit": common.machine()["fusetrace_commit"]}
        else:  # an expensive search not asked for this time keeps its previous result
            result["methods"][method] = previous[method]
    common.write_json(json_path, result)
    plot(result, png_path)


if __name__ == "__main__":
    main()
