"""Differential fuzzing (issue 15): random brainpy.state networks against BPTT and the references.

`tests/fuzz_strategies.py` draws networks from the grammar of `tests/fuzz_models.py`;
`tests/fuzz_oracle.py` checks each one under every algorithm (what `learner.report()` claims against
BPTT, the definitional references where they apply, one invariant per model). docs/reliability.md says
what is covered and how to run the long fuzz.

* The default run tests `DEFAULT_EXAMPLES` networks of a fixed seed (derandomised) and fails on the first
  disagreement, which hypothesis then shrinks to a smaller network.
* `FUSETRACE_FUZZ=N bash dev test -k fuzz` runs N networks (seed `FUSETRACE_FUZZ_SEED`, default 0),
  recording every outcome (one JSON line per network under `FUSETRACE_FUZZ_DIR`, default runs/fuzz, and
  a markdown summary beside it) and failing at the end if any disagreed.
"""

import os
import pathlib
import time
import traceback

import brainstate
import pytest
from hypothesis import HealthCheck, Phase, assume, given, seed, settings

import fuzz_models
import fuzz_oracle
import fuzz_report
from fuzz_strategies import specs

DEFAULT_EXAMPLES = 4  # 5-15 s each on this 2-core machine (the first, simplest, draws): about 40 s in all
LONG_RUN = int(os.environ.get("FUSETRACE_FUZZ", "0"))
QUIET = {
    "deadline": None,
    "database": None,
    "suppress_health_check": list(HealthCheck),
}


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=fuzz_models.DT)


@pytest.mark.skipif(LONG_RUN > 0, reason="the long run (FUSETRACE_FUZZ) covers it")
@settings(max_examples=DEFAULT_EXAMPLES, derandomize=True, phases=(Phase.generate, Phase.shrink), **QUIET)
@given(spec=specs())
def test_generated_networks_keep_the_reports_promises(spec):
    outcome = fuzz_oracle.check_model(spec)
    assume(outcome.rejected is None)
    assert not outcome.disagreements, "\n".join(outcome.disagreements)


def _run_folder() -> pathlib.Path:
    folder = pathlib.Path(os.environ.get("FUSETRACE_FUZZ_DIR", "runs/fuzz"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _checked(spec) -> fuzz_oracle.Outcome:
    """The oracle's outcome; an exception inside the oracle itself is recorded as a disagreement."""
    try:
        return fuzz_oracle.check_model(spec)
    except Exception:
        outcome = fuzz_oracle.Outcome(spec)
        outcome.disagree(f"the oracle raised:\n{traceback.format_exc(limit=6)}")
        return outcome


@pytest.mark.skipif(LONG_RUN == 0, reason="set FUSETRACE_FUZZ=N to fuzz N networks")
def test_long_fuzz_run():
    run_seed = int(os.environ.get("FUSETRACE_FUZZ_SEED", "0"))
    folder = _run_folder()
    lines, summary = folder / f"seed{run_seed}.jsonl", folder / f"seed{run_seed}.md"
    lines.write_text("")
    records, structures = [], set()

    @seed(run_seed)
    @settings(max_examples=LONG_RUN, phases=(Phase.generate,), **QUIET)
    @given(spec=specs())
    def run(spec):
        assume(spec.structure() not in structures)  # hypothesis mutates what it drew: test each program once
        structures.add(spec.structure())
        start = time.perf_counter()
        outcome = _checked(spec)
        records.append(fuzz_report.record(outcome, time.perf_counter() - start))
        with lines.open("a") as out:
            out.write(fuzz_report.json.dumps(records[-1]) + "\n")
        if len(records) % 10 == 0:
            summary.write_text(fuzz_report.summary(records))
        assume(outcome.rejected is None)

    run()
    summary.write_text(fuzz_report.summary(records))
    disagreements = [(r["spec"], d) for r in records for d in r["disagreements"]]
    assert not disagreements, f"{len(disagreements)} disagreements; see {summary}"
