"""The fuzz run's report: one JSON line per generated model, summarised as markdown.

`record(outcome)` turns a `fuzz_oracle.Outcome` into a JSON-ready dict; `summary(records)` counts models
generated (by feature), rejected (silent or saturated), compiled / refused (by reason) / crashed per
algorithm, weights reported exact and approximate, references and invariants checked, and lists every
disagreement with its model. Run as a script to merge the JSON lines of several runs:

    .venv/bin/python tests/fuzz_report.py runs/fuzz/*.jsonl > runs/fuzz/report.md
"""

import collections
import dataclasses
import json
import re
import sys

import fuzz_oracle


def record(outcome: fuzz_oracle.Outcome, seconds: float) -> dict:
    """A JSON-ready summary of one model's outcome."""
    return {
        "spec": repr(outcome.spec),
        "features": outcome.spec.features(),
        "rates": {str(k): round(v, 4) for k, v in outcome.rates.items()},
        "rejected": outcome.rejected,
        "algorithms": {a: dataclasses.asdict(r) for a, r in outcome.algorithms.items()},
        "checks": list(outcome.checks),
        "disagreements": list(outcome.disagreements),
        "zeros": [[a, path, text] for a, path, text in outcome.zero_diagnostics],
        "seconds": round(seconds, 2),
    }


def _reason(text: str) -> str:
    """A refusal's class and message with the model's own names blanked, so equal causes count together."""
    text = re.sub(r"`[^`]*`", "`…`", text)
    return re.sub(r"\d+", "N", text)[:160]


def _table(rows: list[tuple], header: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _per_algorithm(tested: list[dict]) -> list[str]:
    rows = []
    for algorithm in fuzz_oracle.ALGORITHMS:
        results = [r["algorithms"][algorithm] for r in tested if algorithm in r["algorithms"]]
        status = collections.Counter(x["status"] for x in results)
        refs = sum(bool(x["references"]) for x in results)
        exact, approx = sum(x["exact"] for x in results), sum(x["approximate"] for x in results)
        rows.append((algorithm, status["compiled"], status["refused"], status["crashed"], exact, approx, refs))
    header = ("algorithm", "compiled", "refused", "crashed", "weights exact", "weights approximate", "vs reference")
    return _table(rows, header)


def summary(records: list[dict]) -> str:
    """The markdown report of a run."""
    tested = [r for r in records if not r["rejected"]]
    rejected = collections.Counter(
        _reason(r["rejected"]) if r["rejected"].startswith("BPTT") else r["rejected"].split(":")[0]
        for r in records
        if r["rejected"]
    )
    lines = [
        "# Fuzz report",
        "",
        f"models generated: {len(records)}; tested: {len(tested)}; "
        f"rejected (silent, saturated, diverging or not runnable): {len(records) - len(tested)}; "
        f"disagreements: {sum(len(r['disagreements']) for r in records)}; "
        f"seconds: {sum(r['seconds'] for r in records):.0f}",
        "",
        *_per_algorithm(tested),
        "",
        "## Refusals by reason",
        "",
    ]
    refusals = collections.Counter(
        (a, _reason(x["reason"])) for r in tested for a, x in r["algorithms"].items() if x["status"] == "refused"
    )
    lines += _table([(a, reason, n) for (a, reason), n in refusals.most_common()], ("algorithm", "reason", "models"))
    checks = collections.Counter(c.split(":")[0] for r in tested for c in r["checks"])
    lines += ["", "## Invariants checked", "", *_table(sorted(checks.items()), ("invariant", "models"))]
    features = collections.Counter(f for r in tested for f in r["features"])
    lines += ["", "## Tested models by feature", "", *_table(sorted(features.items()), ("feature", "models"))]
    lines += ["", "## Rejected models", "", *_table(rejected.most_common(), ("why", "models"))]
    lines += ["", "## Disagreements", ""]
    for r in records:
        for text in r["disagreements"]:
            lines += [f"* {text}", f"  `{r['spec']}`"]
    return "\n".join(lines) + "\n"


def main(paths: list[str]) -> None:
    records = []
    for path in paths:
        with open(path) as lines:
            records += [json.loads(line) for line in lines if line.strip()]
    sys.stdout.write(summary(records))


if __name__ == "__main__":
    main(sys.argv[1:])
