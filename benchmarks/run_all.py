"""Every benchmark in turn — speed, memory, fidelity, scale, compile — each writing its results JSON and plot.

    benchmarks/run_all [--quick] [--out DIR] [--only speed memory fidelity scale compile]

Without --out, results go to benchmarks/results/ and plots to docs/images/ (what docs/benchmarks.md shows);
with --quick (tiny sizes, about a minute on 2 cores) they go under runs/bench-quick/ so the reported
results stay untouched. braintrace is optional (`pip install -e '.[bench]'`): without it, or with
FUSETRACE_BENCH_NO_PEER=1, its columns are recorded as "not installed". Also writes run_all.json: the
wall time of each benchmark.
"""

import argparse
import pathlib
import subprocess
import sys
import time

import common
import compile as compile_cost
import memory
import scale
import speed

# float32: one process
IN_PROCESS = {"speed": speed.main, "memory": memory.main, "scale": scale.main, "compile": compile_cost.main}
BENCHMARKS = ("speed", "memory", "fidelity", "scale", "compile")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every benchmark")
    parser.add_argument("--out", default=None, help="write results/ and images/ under this folder")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = parser.parse_args(argv)
    out = args.out or (str(common.ROOT / "runs" / "bench-quick") if args.quick else None)
    forwarded = (["--quick"] if args.quick else []) + (["--out", out] if out else [])
    seconds = {}
    for name in args.only:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        if name in IN_PROCESS:
            IN_PROCESS[name](forwarded)
        else:  # fidelity runs in float64, and x64 is process-wide
            subprocess.run(
                [sys.executable, str(pathlib.Path(__file__).with_name("fidelity.py")), *forwarded], check=True
            )
        seconds[name] = time.perf_counter() - start
        print(f"== {name} took {seconds[name]:.0f} s", flush=True)
    json_path, _ = common.output_paths(out, "run_all")
    common.write_json(json_path, {"quick": args.quick, "seconds": seconds, "total_s": sum(seconds.values())})


if __name__ == "__main__":
    main()
