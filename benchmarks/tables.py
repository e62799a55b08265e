"""The markdown tables of docs/benchmarks.md, from the results files, so the page quotes the measured
numbers exactly: printed, or (--update) written between the page's `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->` markers.

    python benchmarks/tables.py [--results benchmarks/results] [--update docs/benchmarks.md]
"""

import argparse
import json
import pathlib
import re

import common

MIB = 2**20


def _load(folder: pathlib.Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _mark(met) -> str:
    return "—" if met is None else ("met" if met else "**missed**")


def _ms(value: float) -> str:
    """Three significant figures, without an exponent."""
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def speed(result: dict) -> str:
    rows = result["rows"]
    names = list(rows[0]["ms_per_step"])
    lines = ["| method | " + " | ".join(f"N = {r['neurons']}" for r in rows) + " |"]
    lines.append("|---|" + "---|" * len(rows))
    for name in names:
        cells = [_ms(r["ms_per_step"][name]["median_ms"]) if name in r["ms_per_step"] else "—" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| firing rate (fraction per step) | " + " | ".join(f"{r['firing_rate']:.3f}" for r in rows) + " |")
    lines += ["", "| ratio | target | " + " | ".join(f"N = {r['neurons']}" for r in rows) + " |"]
    lines.append("|---|---|" + "---|" * len(rows))
    for ratio, entry in rows[0]["ratios"].items():
        target = "—" if entry["target"] is None else f"≤ {entry['target']}"
        cells = []
        for row in rows:
            value = row["ratios"][ratio]
            cells.append("not installed" if value["value"] is None else _ms(value["value"]) + _suffix(value["met"]))
        lines.append(f"| {ratio} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _suffix(met) -> str:
    return "" if met is None else (" (met)" if met else " (**missed**)")


def _memory_table(methods: dict) -> list[str]:
    steps = list(next(iter(methods.values())))
    lines = ["| method | " + " | ".join(f"T = {t}" for t in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, per_steps in methods.items():
        cells = [
            f"{per_steps[t]['total_bytes'] / MIB:,.1f}" if "total_bytes" in per_steps[t] else "error" for t in steps
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _flat(entry: dict) -> list[str]:
    lines = []
    for name, value in entry["flatness"].items():
        lines.append(f"| {name} | {100 * value['growth']:+.2f}% | {_mark(value['met'])} |")
    for steps, value in entry.get("es_d_rtrl_vs_pp_prop", {}).items():
        lines.append(f"| es_d_rtrl / pp_prop at T = {steps} | {value['ratio']:.3f} | {_mark(value['met'])} |")
    return lines


def memory(result: dict) -> str:
    out = []
    for entry in result["compiled"]:
        out.append(f"Compiled memory (MiB), N = {entry['neurons']}, B = {result['batch']}:\n")
        out += _memory_table(entry["methods"])
        out += ["", "| check | measured | target |", "|---|---|---|"]
        out += [*_flat(entry), ""]
    if result.get("rss"):
        neurons = result["rss_neurons"]
        out.append(f"Peak RSS of a fresh process (MiB; in brackets: before compiling and running), N = {neurons}:\n")
        steps = list(next(iter(result["rss"].values())))
        out += ["| method | " + " | ".join(f"T = {t}" for t in steps) + " |", "|---|" + "---|" * len(steps)]
        for name, runs in result["rss"].items():
            cells = []
            for t in steps:
                run = runs[t]
                cells.append(
                    f"{run['peak_rss_bytes'] / MIB:,.0f} ({run['rss_before_bytes'] / MIB:,.0f})"
                    if "peak_rss_bytes" in run
                    else run["error"][:60]
                )
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    deep = result.get("deep")
    if deep:
        out.append(f"braintrace's configuration, compiled memory (MiB), B = {deep['batch']}:\n")
        out += _memory_table(deep["methods"])
        out += ["", "| check | measured | target |", "|---|---|---|", *_flat(deep)]
    return "\n".join(out)


def fidelity(result: dict) -> str:
    rows = [r for r in result["rows"] if "weight" in r]
    labels = list(dict.fromkeys(f"{r['library']} {r['algorithm']}" for r in rows))
    out = []
    for library in ("fusetrace", "braintrace"):
        chosen = [label for label in labels if label.startswith(library)]
        if not chosen:
            continue
        heads = [label.split(" ", 1)[1] for label in chosen]
        out += [f"{library} (cosine / norm ratio):", ""]
        out += ["| model | weight | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(chosen)]
        for model in dict.fromkeys(r["model"] for r in rows):
            for weight in dict.fromkeys(r["weight"] for r in rows if r["model"] == model):
                cells = []
                for label in chosen:
                    match = [
                        r
                        for r in rows
                        if r["model"] == model and r["weight"] == weight and f"{r['library']} {r['algorithm']}" == label
                    ]
                    cells.append(f"{match[0]['cosine']:.3f} / {match[0]['norm_ratio']:.3f}" if match else "—")
                name = "readout" if weight == "out.weight" else weight.replace(".comm.weight", "")
                lines = f"| {model} | {name} | " + " | ".join(cells) + " |"
                out.append(lines)
        out.append("")
    return "\n".join(out)


def _reason(error: str) -> str:
    return "out of memory" if "RESOURCE_EXHAUSTED" in error or "MemoryError" in error else error[:60]


def scale(result: dict) -> str:
    out = ["| method | largest N that ran | first N that failed | peak RSS at the largest | call time there | commit |"]
    out.append("|---|---|---|---|---|---|")
    for method, entry in result["methods"].items():
        ok = entry["largest_ok"]
        run = entry["attempts"].get(str(ok), {}) if ok else {}
        failed = entry["smallest_failed"]
        reason = _reason(entry["attempts"][str(failed)]["error"]) if failed else "none: capped"
        peak, seconds = run.get("peak_rss_bytes", 0) / 2**30, run.get("call_s", 0)
        out.append(
            f"| {method} | {ok:,} | {f'{failed:,}' if failed else '—'} ({reason}) | "
            f"{peak:.2f} GiB | {seconds:.3g} s | {entry.get('commit', '')} |"
        )
    out.append(f"\nMemory budget per attempt: {result['budget_bytes'] / 2**30:.1f} GiB; batch {result['batch']}.")
    return "\n".join(out)


COMPILE_METHODS = ("forward", "bptt", "es_d_rtrl", "d_rtrl", "e_prop")


def _size_cell(method: str, result: dict | None, forward: dict | None, key: str) -> str:
    if result is None:
        return "—"
    if "error" in result:
        error = result["error"]
        if error.startswith(("not measured", "skipped")):
            return "—"
        return "timed out" if "timed out" in error else "failed"
    value = result[key]
    if key != "equations":
        return f"{value:.3g}"
    if method == "forward":
        return f"{value:,} ({result['captured_equations']:,} captured)"
    if method == "bptt" or forward is None or "error" in forward:
        return f"{value:,}"
    return f"{value:,} ({value / forward['captured_equations']:.1f}×)"


def compile_cost(result: dict) -> str:
    """Equations and first-call seconds against K (and equations against states per neuron); the fused
    programs' equations also as a multiple of the captured (simplified) forward step's."""
    by_k, by_s = result["by_populations"], result["by_states"]
    methods = [m for m in COMPILE_METHODS if m in by_k]
    lines = ["| K | " + " | ".join(f"{m} equations" for m in methods) + " | " + " | ".join(methods) + " |"]
    lines.append("|---|" + "---|" * (2 * len(methods)))
    for size in by_k[methods[0]]:
        row = {m: by_k[m].get(size) for m in methods}
        cells = [_size_cell(m, row[m], row.get("forward"), "equations") for m in methods]
        cells += [_size_cell(m, row[m], None, "first_call_s") for m in methods]
        lines.append(f"| {size.split(',')[0]} | " + " | ".join(cells) + " |")
    at = result["populations_for_states"]
    lines += ["", f"Left: equations; right: first `jax.jit` call (s). States per neuron at K = {at}:", ""]
    lines.append("| S | " + " | ".join(f"{m} equations" for m in methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for size in by_s[methods[0]]:
        row = {m: by_s[m].get(size) for m in methods}
        cells = [_size_cell(m, row[m], row.get("forward"), "equations") for m in methods]
        lines.append(f"| {size.split(',')[1]} | " + " | ".join(cells) + " |")
    if "targets" in result:
        rounds = result["targets"]["rounds"]
        lines += ["", f"Issue 19's targets ({rounds} interleaved rounds, `compile.py --bars {rounds}`):", ""]
        lines += ["| target | measured | |", "|---|---|---|"]
        for entry in result["targets"]["targets"]:
            lines.append(f"| {entry['target']} | {entry['value']:.2f} | {_mark(entry['met'])} |")
    return "\n".join(lines)


def gated(result: dict, before: dict | None = None) -> str:
    """Gated cells: cosine as mean (worst seed) / mean norm ratio per method; `before`, a run of the same
    benchmark on an earlier commit (`gated_before.json`), adds its d_rtrl column."""
    rows = {(s["cell"], s["library"], s["algorithm"], s["weight"]): s for s in result["summary"]}
    columns = [
        ("fusetrace", "d_rtrl"),
        ("fusetrace", "d_rtrl(own_loop_hops=1)"),
        ("fusetrace", "d_rtrl(own_loop_hops=2)"),
        ("braintrace", "D_RTRL"),
        ("fusetrace", "es_d_rtrl(0.9)"),
        ("braintrace", "pp_prop"),
    ]
    previous = (
        {} if before is None else {(s["cell"], s["weight"]): s for s in before["summary"] if s["algorithm"] == "d_rtrl"}
    )
    cell = lambda s: "—" if s is None else f"{s['cosine']:.3f} ({s['worst_cosine']:.3f}) / {s['norm_ratio']:.2f}"
    head = ["cell", "weight", *(f"{lib} {alg}" for lib, alg in columns[:1]), *(["before: d_rtrl"] if previous else [])]
    head += [f"{lib} {alg}" for lib, alg in columns[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    weights = dict.fromkeys((s["cell"], s["weight"]) for s in result["summary"] if not s["weight"].startswith("out."))
    for name, weight in weights:
        values = [cell(rows.get((name, *columns[0], weight)))]
        values += [cell(previous.get((name, weight)))] if previous else []
        values += [cell(rows.get((name, lib, alg, weight))) for lib, alg in columns[1:]]
        lines.append(f"| {name} | `{weight}` | " + " | ".join(values) + " |")
    return "\n".join(lines)


def sparse_batch(result: dict, before: dict | None = None) -> str:
    """The sparse gradient over a batch: temporary MiB and ms per step, this commit beside `before`."""
    previous = {} if before is None else {row["batch"]: row for row in before["rows"]}
    head = "| B | step temp. MiB | step ms | window temp. MiB | window ms/step |"
    if previous:
        head += f" {before['label']}: step temp. MiB | step ms | window temp. MiB | window ms/step |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in result["rows"]:
        cells = [row["batch"], row["step_temp_bytes"] / MIB, row["step_ms"], row["window_temp_bytes"] / MIB]
        cells.append(row["window_ms_per_step"])
        if row["batch"] in previous:
            old = previous[row["batch"]]
            cells += [
                old["step_temp_bytes"] / MIB,
                old["step_ms"],
                old["window_temp_bytes"] / MIB,
                old["window_ms_per_step"],
            ]
        lines.append("| " + " | ".join(str(c) if isinstance(c, int) else f"{c:,.2f}" for c in cells) + " |")
    return "\n".join(lines)


RENDERERS = {
    "speed": speed,
    "memory": memory,
    "fidelity": fidelity,
    "scale": scale,
    "compile": compile_cost,
    "compile_before": compile_cost,
}


def update(page: pathlib.Path, tables: dict[str, str]) -> None:
    """Replace each marked block of `page` with its table; a marker pair without a result stays as it is."""
    text = page.read_text()
    for name, table in tables.items():
        block = re.compile(rf"(<!-- bench:{name} -->).*?(<!-- /bench:{name} -->)", re.S)
        # blank lines around the table: markdown would read it as part of the HTML comment's block otherwise
        text = block.sub(lambda match, table=table: f"{match.group(1)}\n\n{table}\n\n{match.group(2)}", text)
    page.write_text(text)
    print(f"updated {page}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(common.RESULTS))
    parser.add_argument("--update", help="rewrite the marked tables of this markdown page")
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.results)
    tables = {}
    for name, render in RENDERERS.items():
        result = _load(folder, name)
        if result is not None:
            tables[name] = render(result).strip()
    if (result := _load(folder, "gated")) is not None:
        tables["gated"] = gated(result, _load(folder, "gated_before"))
    if (result := _load(folder, "sparse_batch")) is not None:
        tables["sparse_batch"] = sparse_batch(result, _load(folder, "sparse_batch_before"))
    if args.update:
        update(pathlib.Path(args.update), tables)
    else:
        for name, table in tables.items():
            print(f"### {name}\n\n{table}\n")


if __name__ == "__main__":
    main()
