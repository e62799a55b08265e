"""The whole suite runs in float64: exactness claims are checked at 1e-6 and tighter.

XLA's CPU backend compiles the suite's programs without its LLVM optimisations (`FAST_XLA_FLAGS`, also
inherited by the suite's subprocesses): compiling is most of the suite's time, and those passes cost a
fifth of it. They change the machine code, not the program: every HLO pass (fusion, simplification) still
runs, and values may differ by rounding only. Speed is measured in benchmarks/, never here.
"""

import os

FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # (xdist's workers inherit the controller's)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_XLA_FLAGS}".strip()  # before jax starts

import brainstate  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
brainstate.environ.set(precision=64)  # brainstate fixes its default float type on import otherwise


# Seconds one worker spends in each of the costliest test files (`bash dev test --durations=0`, summed per
# file, 2-core machine). `bash dev test` hands whole files to its two workers in collection order
# (`--no-loadscope-reorder`), so the costliest go first and the many small ones fill in behind them;
# xdist's own order (most tests first) left the long single-test files for the end, one worker idle.
# A scheduling hint only: a file missing here runs after these, in its usual order.
FILE_SECONDS = {  # measured 2026-12-06 (2-core AMD EPYC), long tests left out
    "test_compile_exact.py": 106,
    "test_deep_credit.py": 104,
    "test_trainer_checkpoint.py": 101,
    "test_coverage.py": 91,
    "test_fuzz.py": 75,
    "test_no_silent_zeros.py": 53,
    "test_sharding.py": 52,
    "test_components.py": 40,
    "test_scan.py": 39,
    "test_connectome.py": 36,
    "test_tasks.py": 32,
    "test_validation.py": 31,
    "test_gated_cells.py": 29,
    "test_fuzz_regressions.py": 27,
    "test_benchmarks.py": 25,
    "test_compile_reference.py": 25,
}


# `FUSETRACE_LONG=1 bash dev test` also runs the tests marked `long`: studies (a network trained for many
# steps) and smoke runs of whole scripts that would put the default run over its 10-minute budget on 2
# cores. Without it they are reported as skipped, with this command as the reason.
LONG = os.environ.get("FUSETRACE_LONG") == "1"


def pytest_collection_modifyitems(items):
    def cost(item):
        return -FILE_SECONDS.get(item.path.name, 0)

    items.sort(key=cost)  # stable: tests keep their order within a file, and the rest keep theirs
    if not LONG:
        skip = pytest.mark.skip(reason="long: `FUSETRACE_LONG=1 bash dev test` runs it")
        for item in items:
            if "long" in item.keywords:
                item.add_marker(skip)
