"""Differential fuzzing (issue 15): random brainpy.state networks against BPTT and the references.

`tests/fuzz_strategies.py` draws networks from the grammar of `tests/fuzz_models.py`;
`tests/fuzz_oracle.py` checks each one under every algorithm (what `learner.report()` claims against
BPTT, the definitional references where they apply, one invariant per model). docs/reliability.md says
what is covered and how to run the long fuzz.

* The default run tests `DEFAULT_EXAMPLES` networks of a fixed seed (derandomised; 4, or 12 in the long
  mode) and fails on the first disagreement, which hypothesis then shrinks to a smaller network.
* `FUSETRACE_FUZZ=N bash dev test -k fuzz` tests N networks (seed `FUSETRACE_FUZZ_SEED`, default 0),
  recording every outcome (one JSON line per network under `FUSETRACE_FUZZ_DIR`, default runs/fuzz, and
  a markdown summary beside it) and failing at the end if any disagreed. `FUSETRACE_FUZZ_SHARD=i/n` makes
  this process shard i of n: it tests its share of the N networks from a stream of its own, so that n
  processes together test N (`tests/fuzz_parallel.sh` starts them and merges their reports).
* `FUSETRACE_FUZZ_EVENT_PRODUCT=1` forms every plain `x @ W` of the fused forward from its non-zeros
  (`passes.event_product`, which the networks are otherwise too small for).
"""

import functools
import os
import pathlib
import time
import traceback

import brainstate
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, seed, settings

import fuzz_models
import fuzz_oracle
import fuzz_report
from fusetrace.passes import event_product
from fuzz_strategies import specs

# the suite's fuzz budget: 4 networks (6 took 110 s of the default run on a 2-core AMD EPYC, 2026-12-06);
# the long mode (`FUSETRACE_LONG=1`, tests/conftest.py) tests 12 from the same derandomised seed
DEFAULT_EXAMPLES = 12 if os.environ.get("FUSETRACE_LONG") == "1" else 4
LONG_RUN = int(os.environ.get("FUSETRACE_FUZZ", "0"))
SHARD_STRIDE = 100_003  # shard i of a run with seed s draws from hypothesis seed s + i * SHARD_STRIDE
QUIET = {
    "deadline": None,
    "database": None,
    "suppress_health_check": list(HealthCheck),
}


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=fuzz_models.DT)


@pytest.fixture(autouse=True)
def _event_products(monkeypatch):
    """FUSETRACE_FUZZ_EVENT_PRODUCT=1: every plain `x @ W` of the fused forward formed from its non-zeros at
    every step (`passes.event_product`, whose size and density gates keep the fuzz's small networks off it),
    so that the references, which run the plain model's products, check it too."""
    if os.environ.get("FUSETRACE_FUZZ_EVENT_PRODUCT") == "1":
        for name, value in (("MIN_WEIGHTS", 0), ("MIN_POST", 0), ("MAX_ROWS", 1 << 30), ("DENSITY", 1.0)):
            monkeypatch.setattr(event_product, name, value)


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


def shard(text: str, total: int) -> tuple[int, int, int]:
    """`(index, count, networks)` of `FUSETRACE_FUZZ_SHARD` "i/n": shard i of n tests its share of `total`."""
    index, count = (int(part) for part in text.split("/"))
    if not 0 <= index < count:
        raise ValueError(f"FUSETRACE_FUZZ_SHARD={text!r}: expected i/n with 0 <= i < n")
    return index, count, total // count + (index < total % count)


@pytest.mark.skipif(LONG_RUN == 0, reason="set FUSETRACE_FUZZ=N to fuzz N networks")
def test_long_fuzz_run():
    run_seed = int(os.environ.get("FUSETRACE_FUZZ_SEED", "0"))
    index, count, networks = shard(os.environ.get("FUSETRACE_FUZZ_SHARD", "0/1"), LONG_RUN)
    name = f"seed{run_seed}" + (f"-shard{index}of{count}" if count > 1 else "")
    folder = _run_folder()
    lines, summary = folder / f"{name}.jsonl", folder / f"{name}.md"
    lines.write_text("")
    records, structures = [], set()

    @seed(run_seed + index * SHARD_STRIDE)
    @settings(max_examples=networks, phases=(Phase.generate,), **QUIET)
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


# --------------------------------------------------------------------------- the tools themselves (no JAX)

DRAWS = 400  # specs drawn (not built) to check that the strategies reach every part of the grammar
RATE_DRAWS = 12  # networks built and run forward (about 1 s each): a cover of the grammar, then more draws
RATE_SHARE = 0.75  # of those, at least this share must fire inside fuzz_oracle.RATE_RANGE


def grammar() -> set[str]:
    """Every feature of the grammar, as `Spec.features()` names them."""
    wanted = {f"neuron:{k}" for k in fuzz_models.NEURON_KINDS} | {f"synapse:{s}" for s in fuzz_models.SYNAPSES}
    wanted |= {f"comm:{c}" for c in fuzz_models.COMMS} | {f"readout:{r}" for r in fuzz_models.READOUTS}
    wanted |= {f"read:{r}" for r in fuzz_models.READS} | {f"loss:{x}" for x in fuzz_models.LOSSES}
    wanted |= {f"control:{c}" for c in fuzz_models.CONTROLS} | {f"batch:{b}" for b in (None, 1, 2, 3)}
    wanted |= {f"wiring:{w}" for w in ("input", "feed_forward", "skip", "recurrent", "lateral_or_backward")}
    wanted |= {"stp", "coba", "tied", "regularizer", "noise_input", "dropout", "hetero_tau", "readout:series"}
    wanted |= {"readout:concat", "delay:1", "delay:2", "param:bias", "param:threshold", "inputs:2"}
    wanted |= {f"transform:{t}" for t in fuzz_models.TRANSFORMS} | {"outputs:tuple", "outputs:dict"}
    wanted |= {f"populations:{n}" for n in (1, 2, 3)} | {f"surrogate:{s}" for s in ("relu", "sigmoid")}
    return wanted


@functools.cache
def drawn() -> tuple[fuzz_models.Spec, ...]:
    """`DRAWS` specs of a fixed seed."""
    found = []

    @seed(0)
    @settings(max_examples=DRAWS, phases=(Phase.generate,), **QUIET)
    @given(spec=specs())
    def draw(spec):
        found.append(spec)

    draw()
    return tuple(found)


def test_the_strategies_reach_every_part_of_the_grammar():
    seen = set().union(*(spec.features() for spec in drawn()))
    assert grammar() <= seen, f"never drawn: {sorted(grammar() - seen)}"


def test_the_invariants_compare_a_tiny_leaf_against_the_largest():
    """Two programs' rounding in a leaf that is a cancellation (1e-13 of the largest, like a saturated
    gated cell's trace, fuzz seed 4) is not a disagreement; a wrong value in a small leaf still is."""
    big, tiny = np.ones(4), np.full(3, 1e-13)
    assert fuzz_oracle._close([big, tiny * (1 + 1e-5)], [big, tiny]) < fuzz_oracle.RTOL_SAME
    assert fuzz_oracle._close([big, 2e-7 * np.ones(3)], [big, 1e-7 * np.ones(3)]) > 0.01
    assert fuzz_oracle._close([big * (1 + 1e-6)], [big]) > fuzz_oracle.RTOL_SAME


def cover(specs_: tuple, wanted: set[str]) -> list:
    """A few of `specs_` that together use every feature in `wanted` they use at all (greedy)."""
    chosen, left = [], set(wanted)
    while left:
        best = max(specs_, key=lambda spec: len(left & set(spec.features())))
        if not left & set(best.features()):
            break
        chosen.append(best)
        left -= set(best.features())
    return chosen


@pytest.mark.skipif(LONG_RUN > 0, reason="the long run's report counts the silent and saturated networks")
def test_every_part_of_the_grammar_is_built_and_fires_at_realistic_rates():
    """Each feature of the grammar is built and run (a cover of the drawn specs, then more of them), and
    silent networks, which test nothing, are rare: most fire at 0.02-0.8 spikes per neuron and step in every
    spiking population, with a median rate in the range of cortex-like models."""
    chosen = cover(drawn(), grammar())
    chosen += [spec for spec in drawn() if spec not in chosen][: max(0, RATE_DRAWS - len(chosen))]
    built = set().union(*(spec.features() for spec in chosen))
    assert grammar() <= built, f"never built: {sorted(grammar() - built)}"
    found = [fuzz_oracle.firing_rates(spec) for spec in chosen]
    inside = [fuzz_oracle.silent_or_saturated(rates) is None for rates in found]
    median = float(np.median([rate for rates in found for rate in rates.values()]))
    assert sum(inside) >= RATE_SHARE * len(found), found
    assert 0.05 <= median <= 0.5, found


def test_shrinking_keeps_specs_well_formed():
    """Every simpler variant of a spec with ties, series readouts and three populations is a valid spec
    whose indices point at existing parts (the records check themselves at construction)."""
    import fuzz_shrink
    from fuzz_models import Population, Projection, Readout, Spec

    spec = Spec(
        populations=(Population("lif", 4), Population("alif", 4), Population("rate", 3)),
        projections=(
            Projection("x0", 0),
            Projection("p0", 1, comm="linear_bias"),
            Projection("p0", 1, timing="prev", tie=1),
            Projection("p1", 2, synapse="current"),
            Projection("p2", 0, timing="prev", synapse="user_alpha"),
        ),
        readouts=(Readout("leaky", ("p1", "p2")), Readout("linear", ("r0",)), Readout("none", ("p0",), "V")),
        outputs="tuple",
        noise=1,
    )
    count = 0
    for candidate in fuzz_shrink.candidates(spec):
        if candidate is None:
            continue
        count += 1
        n_pops, n_projs = len(candidate.populations), len(candidate.projections)
        for proj in candidate.projections:
            assert proj.target < n_pops and (proj.tie is None or proj.tie < n_projs)
            assert proj.source.startswith("x") or int(proj.source[1:]) < n_pops
        for readout in candidate.readouts:
            for source in readout.sources:
                limit = n_pops if source.startswith("p") else len(candidate.readouts)
                assert int(source[1:]) < limit
    assert count > 10


def test_the_shards_of_a_long_run_share_its_networks():
    for total, count in ((2000, 16), (7, 3), (2, 4)):
        shares = [shard(f"{i}/{count}", total)[2] for i in range(count)]
        assert sum(shares) == total and max(shares) - min(shares) <= 1
    with pytest.raises(ValueError, match="0 <= i < n"):
        shard("4/4", 10)


def test_the_report_counts_models_refusals_and_disagreements():
    from fuzz_models import Population, Projection, Readout, Spec

    spec = Spec((Population("lif", 3),), (Projection("x0", 0),), (Readout("linear", ("p0",)),))
    tested = fuzz_oracle.Outcome(spec, rates={0: 0.2})
    tested.algorithms = {
        "d_rtrl": fuzz_oracle.AlgorithmOutcome("compiled", exact=2, references=("rtrl",)),
        "es_d_rtrl": fuzz_oracle.AlgorithmOutcome("refused", "NotNeuronAlignedError: `p0.V` mixes neurons"),
    }
    tested.disagree("d_rtrl: proj0.comm.weight.weight reported exact but differs from BPTT by 0.5")
    silent = fuzz_oracle.Outcome(spec, rates={0: 0.0}, rejected="silent: population p0 fires 0.000 spikes")
    text = fuzz_report.summary([fuzz_report.record(tested, 1.0), fuzz_report.record(silent, 0.5)])
    assert "models generated: 2; tested: 1" in text and "disagreements: 1" in text
    assert "| d_rtrl | 1 | 0 | 0 | 2 | 0 | 1 |" in text
    assert "NotNeuronAlignedError: `…` mixes neurons" in text
    assert "| silent | 1 |" in text and "reported exact but differs" in text
