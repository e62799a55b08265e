"""The temporal-XOR figure and table of docs/results.md, from the runs of benchmarks/results_runs.sh.

    python benchmarks/xor_figure.py [--runs runs/results] [--out docs/images/xor-curves.png]

Reads runs/results/xor-<algorithm>[-frozen]-s<seed>/metrics.json: training accuracy per iteration (one
fresh batch each, smoothed over 25 iterations, mean over seeds) and the held-out test accuracy of the
final weights; prints the markdown table and draws the curves.
"""

import argparse
import json
import pathlib

import common
import numpy as np

ALGORITHMS = ("bptt", "d_rtrl", "e_prop", "es_d_rtrl")
SEEDS = (0, 1, 2)
SMOOTH = 25  # iterations per point of the smoothed training curve


def _runs(root: pathlib.Path, algorithm: str, frozen: bool) -> list[dict]:
    suffix = "-frozen" if frozen else ""
    return [json.loads((root / f"xor-{algorithm}{suffix}-s{seed}" / "metrics.json").read_text()) for seed in SEEDS]


def table(root: pathlib.Path) -> str:
    lines = [
        "| algorithm | first layer | test accuracy, final weights (seeds 0, 1, 2) | mean | time per run |",
        "|---|---|---|---|---|",
    ]
    for algorithm in ALGORITHMS:
        for frozen in (False, True):
            runs = _runs(root, algorithm, frozen)
            tests = [run["test"]["final"]["accuracy"] for run in runs]
            seconds = np.mean([run["seconds"] for run in runs])
            shown = ", ".join(f"{t:.3f}" for t in tests)
            which = "frozen" if frozen else "**learning**"
            lines.append(f"| `{algorithm}` | {which} | {shown} | {np.mean(tests):.3f} | {seconds:.0f} s |")
    return "\n".join(lines)


def figure(root: pathlib.Path, path: pathlib.Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(ALGORITHMS), figsize=(4 * len(ALGORITHMS), 3.2), sharey=True)
    for axis, algorithm in zip(axes, ALGORITHMS, strict=True):
        for frozen, style in ((False, "-"), (True, "--")):
            runs = _runs(root, algorithm, frozen)
            curves = np.array([[entry["accuracy"] for entry in run["history"]] for run in runs])
            smooth = np.convolve(curves.mean(axis=0), np.ones(SMOOTH) / SMOOTH, mode="valid")
            label = "first layer frozen" if frozen else "first layer learning"
            axis.plot(np.arange(smooth.size) + SMOOTH, smooth, style, label=label)
        axis.axhline(0.95, color="grey", lw=0.8, ls=":")
        axis.set_title(algorithm)
        axis.set_xlabel("iteration")
    axes[0].set_ylabel("training accuracy (3 seeds)")
    axes[0].legend(fontsize=8)
    common.save_figure(fig, path, "Temporal XOR: what the first layer's learning adds")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/results")
    parser.add_argument("--out", default="docs/images/xor-curves.png")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.runs)
    print(table(root))
    figure(root, pathlib.Path(args.out))


if __name__ == "__main__":
    main()
