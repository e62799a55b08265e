"""Hypothesis properties of `fusetrace.analyze` over population sizes, batch sizes and time constants.

* determinism: two analyses of equal models agree (summary text, graph nodes and edges);
* batch invariance: groups and relations are the same for batch None, 1 and 3 (dense comms, whose op
  does not change with batching);
* trace sizes follow the documented formulas: linear in the batch size, `d_rtrl`/`e_prop` linear in
  |W|·S, `es_d_rtrl` linear in n_pre + N·S (no n_pre·N term).
"""

import brainunit as u
import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

import fusetrace
import zoo
from fusetrace.passes.relations import SMALL_LTI

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.integers(min_value=1, max_value=24)
taus = st.floats(min_value=2.0, max_value=50.0, allow_nan=False).map(lambda t: t * u.ms)
batches = st.sampled_from([None, 1, 3])


def _readout_case(n_in, n, n_out, tau, tau_out, batch_size):
    return zoo.leaky_readout(batch_size=batch_size, n_in=n_in, n=n, n_out=n_out, tau=tau, tau_out=tau_out)


def _analyse(case):
    return fusetrace.analyze(case.model, *case.inputs, batch_size=case.batch_size)


def _itemsize(model) -> int:
    """Bytes per weight element (float32, or float64 when the suite enables x64); all zoo weights share it."""
    _, dtype = zoo.weight_size(model, "out.weight")
    return dtype.itemsize


def _structure(analysis):
    """The documented, batch-independent content of an analysis."""
    groups = tuple((g.name, g.states, g.n_states, g.n_neurons) for g in analysis.groups)
    relations = tuple(sorted((r.weight, r.group, r.op, r.status, r.reason) for r in analysis.relations))
    return groups, relations


@SETTINGS
@given(n_in=sizes, n=sizes, n_out=sizes, tau=taus, tau_out=taus, batch_size=batches)
def test_deterministic(n_in, n, n_out, tau, tau_out, batch_size):
    first = _analyse(_readout_case(n_in, n, n_out, tau, tau_out, batch_size))
    second = _analyse(_readout_case(n_in, n, n_out, tau, tau_out, batch_size))
    assert first.summary() == second.summary()
    assert set(first.graph.nodes) == set(second.graph.nodes)
    assert set(first.graph.edges) == set(second.graph.edges)
    assert _structure(first) == _structure(second)


@SETTINGS
@given(n_in=sizes, n=sizes, n_out=sizes, tau=taus, tau_out=taus)
def test_batch_invariant(n_in, n, n_out, tau, tau_out):
    structures = {
        batch_size: _structure(_analyse(_readout_case(n_in, n, n_out, tau, tau_out, batch_size)))
        for batch_size in (None, 1, 3)
    }
    assert structures[None] == structures[1] == structures[3]


@SETTINGS
@given(n_in=sizes, n_exc=sizes, n_inh=sizes, n_out=sizes)
def test_batch_invariant_ei(n_in, n_exc, n_inh, n_out):
    structures = [
        _structure(_analyse(zoo.ei_net(batch_size=b, n_in=n_in, n_exc=n_exc, n_inh=n_inh, n_out=n_out)))
        for b in (None, 3)
    ]
    assert structures[0] == structures[1]


def _readout_es(n_pre: int, n_out: int) -> int:
    """es_d_rtrl's trace numbers of a leaky readout (S=1) per batch entry: the per-weight trace when the
    readout is small (`Relation.small_lti`), else the pair of factors."""
    return n_pre * n_out if n_out <= SMALL_LTI else n_pre + n_out


@SETTINGS
@given(n_in=sizes, n=sizes, n_out=sizes, tau=taus, batch_size=st.integers(min_value=1, max_value=5))
def test_trace_bytes_scaling(n_in, n, n_out, tau, batch_size):
    """One LIF group (S=2) + leaky readout (S=1), written out by hand."""
    case = _readout_case(n_in, n, n_out, tau, tau, None)
    itemsize = _itemsize(case.model)
    unbatched = _analyse(case)
    batched = _analyse(_readout_case(n_in, n, n_out, tau, tau, batch_size))
    # |W|·S per traced relation: input (n_in x n) onto {V, g}, readout (n x n_out) onto {r}.
    d_rtrl = (n_in * n * 2 + n * n_out * 1) * itemsize
    # (n_pre + N·S) per factorised relation; the readout into a small LTI group keeps its exact trace.
    es_d_rtrl = ((n_in + n * 2) + _readout_es(n, n_out)) * itemsize
    for algorithm, want in (("d_rtrl", d_rtrl), ("e_prop", d_rtrl), ("es_d_rtrl", es_d_rtrl)):
        assert unbatched.trace_bytes(algorithm) == want, algorithm
        assert batched.trace_bytes(algorithm) == batch_size * want, algorithm


@SETTINGS
@given(n_in=sizes, n_exc=sizes, n_inh=sizes, n_out=sizes, batch_size=batches)
def test_trace_bytes_ei(n_in, n_exc, n_inh, n_out, batch_size):
    """E/I net: one group of S=4 over N = n_exc + n_inh neurons, readout S=1; four traced weights."""
    num, batch = n_exc + n_inh, batch_size or 1
    case = zoo.ei_net(batch_size=batch_size, n_in=n_in, n_exc=n_exc, n_inh=n_inh, n_out=n_out)
    itemsize = _itemsize(case.model)
    analysis = _analyse(case)
    hidden_pre = (n_exc, n_inh, n_in)  # E, I and input comms, all onto the S=4 group
    d_rtrl = (sum(p * num * 4 for p in hidden_pre) + num * n_out) * itemsize
    es_d_rtrl = (sum(p + num * 4 for p in hidden_pre) + _readout_es(num, n_out)) * itemsize
    assert analysis.trace_bytes("d_rtrl") == batch * d_rtrl
    assert analysis.trace_bytes("e_prop") == batch * d_rtrl
    assert analysis.trace_bytes("es_d_rtrl") == batch * es_d_rtrl
