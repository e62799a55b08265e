"""`benchmarks/run_all --quick` keeps working: it runs every benchmark at tiny sizes, as CI would (without
braintrace: its columns must read "not installed" instead of failing), and writes results with the
expected keys and sane values. Times and ratios are not checked here: they belong to benchmarks/. The
default run checks speed and fidelity; memory, scale and compile run in the long mode
(`FUSETRACE_LONG=1`, tests/conftest.py)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600  # about a minute on 2 idle cores; the margin is for a loaded machine
METHODS = ("forward", "bptt", "fusetrace d_rtrl", "fusetrace es_d_rtrl")


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _run_quick(out: pathlib.Path, parts: tuple[str, ...]) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "FUSETRACE_BENCH_NO_PEER": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "run_all"), "--quick", "--out", str(out), "--only", *parts],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = {name: json.loads((out / "results" / f"{name}.json").read_text()) for name in (*parts, "run_all")}
    assert set(results["run_all"]["seconds"]) == set(parts)
    for name in parts:
        assert (out / "images" / f"bench-{name}.png").stat().st_size > 0
        assert results[name]["machine"]["braintrace"] == "not installed"
    return results


def test_run_all_quick_writes_speed_and_fidelity(tmp_path):
    results = _run_quick(tmp_path, ("speed", "fidelity"))

    (row,) = results["speed"]["rows"]
    assert set(row["ms_per_step"]) == set(METHODS)  # the peer's programs are absent, not failed
    assert all(_positive(v["median_ms"]) for v in row["ms_per_step"].values())
    assert 0 < row["firing_rate"] < 1
    assert row["ratios"]["fusetrace es_d_rtrl / braintrace pp_prop"]["value"] is None
    assert _positive(row["ratios"]["fusetrace es_d_rtrl / forward"]["value"])

    rows = results["fidelity"]["rows"]
    assert rows and all("error" not in r for r in rows)
    assert all(math.isfinite(r["cosine"]) and r["norm_ratio"] >= 0 for r in rows)
    assert {r["library"] for r in rows} == {"fusetrace"}
    assert "d_rtrl" in results["fidelity"]["norm_target"]


@pytest.mark.long  # ~45 s of the quick run's ~60 on 2 cores
def test_run_all_quick_writes_memory_scale_and_compile(tmp_path):
    results = _run_quick(tmp_path, ("memory", "scale", "compile"))

    for method in ("es_d_rtrl", "bptt"):
        assert _positive(results["scale"]["methods"][method]["largest_ok"])

    memory = results["memory"]
    (table,) = memory["compiled"]
    assert set(table["methods"]) == set(METHODS)
    for per_steps in table["methods"].values():
        assert all(_positive(entry["total_bytes"]) for entry in per_steps.values())
    assert set(table["flatness"]) == {"fusetrace d_rtrl", "fusetrace es_d_rtrl"}
    assert all(_positive(v["peak_rss_bytes"]) for runs in memory["rss"].values() for v in runs.values())
    assert memory["deep"]["batch"] >= 1
    assert all(_positive(e["total_bytes"]) for runs in memory["deep"]["methods"].values() for e in runs.values())

    for sweep in ("by_populations", "by_states"):
        measured = results["compile"][sweep]
        assert set(measured) == {"forward", "bptt", "es_d_rtrl", "d_rtrl", "e_prop"}
        for method, sizes in measured.items():
            assert sizes and all(_positive(r["equations"]) and _positive(r["first_call_s"]) for r in sizes.values())
            if method not in ("forward", "bptt"):
                assert all(sum(r["by_part"].values()) == r["equations"] for r in sizes.values())
