"""`fusetrace.analyze` on the model zoo: groups, relations, trace sizes, display, errors.

Every expectation comes from `tests/zoo.py`, written by hand from the model; nothing is read back from
fusetrace. Analyses are cached per (model, batch size) so each model is traced once per batch size.
"""

import functools

import brainpy.state as bps
import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest
from jax.extend.core import Primitive

import fusetrace
import zoo
from fusetrace.errors import FusetraceError, NotNeuronAlignedError, UnsupportedPrimitiveError
from fusetrace.passes.relations import SMALL_LTI

NAMES = tuple(zoo.ZOO)
BATCHES = (None, 2)
ALGORITHMS = ("d_rtrl", "es_d_rtrl", "e_prop")


@functools.cache
def analysed(name: str, batch_size: int | None):
    case = zoo.ZOO[name](batch_size=batch_size)
    return case, fusetrace.analyze(case.model, *case.inputs, batch_size=batch_size)


# --------------------------------------------------------------------------- the zoo itself


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_steps(name):
    """The zoo models are valid brainpy.state models: one step runs and gives finite values."""
    model, inputs, _ = zoo.ZOO[name](batch_size=2)
    out = model.update(*inputs)
    for leaf in jax.tree.leaves(out, is_leaf=u.math.is_quantity):
        assert np.all(np.isfinite(np.asarray(u.get_mantissa(leaf))))
        assert np.shape(leaf)[0] == 2


@pytest.mark.parametrize("name", NAMES)
def test_zoo_expectation_covers_model(name):
    """Sanity of the hand-written expectations: the groups partition the model's HiddenStates and the
    relations name every ParamState leaf exactly once."""
    model, _, expected = zoo.ZOO[name]()
    grouped = [p for g in expected["groups"].values() for p in g["states"]]
    assert sorted(grouped) == sorted(zoo.hidden_paths(model))
    assert sorted(expected["relations"]) == sorted(zoo.weight_leaf_paths(model))


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize("batch_size", BATCHES)
@pytest.mark.parametrize("name", NAMES)
def test_groups(name, batch_size):
    case, analysis = analysed(name, batch_size)
    got = {
        g.name: {"states": frozenset(g.states), "n_states": g.n_states, "n_neurons": g.n_neurons}
        for g in analysis.groups
    }
    assert len(got) == len(analysis.groups), "two groups share a name"
    expected = case.expected["groups"]
    assert got == {name: {k: v for k, v in group.items() if k != "lti"} for name, group in expected.items()}
    assert all(analysis.group_named(name).lti for name, group in expected.items() if group["lti"])


@pytest.mark.parametrize("name", NAMES)
def test_group_states_follow_model_order(name):
    case, analysis = analysed(name, None)
    order = zoo.state_paths(case.model)
    for group in analysis.groups:
        assert isinstance(group.states, tuple)
        assert group.n_states == len(group.states) == len(set(group.states))
        assert list(group.states) == [p for p in order if p in set(group.states)]
        assert group.name == group.states[0]


@pytest.mark.parametrize("name", NAMES)
def test_group_of(name):
    case, analysis = analysed(name, None)
    for group_name, group in case.expected["groups"].items():
        for path in group["states"]:
            assert analysis.group_of(path).name == group_name


# --------------------------------------------------------------------------- relations


def _relation_table(analysis, expected):
    """{weight: (group, op, status)}, with op blanked where the expectation leaves it open."""
    table = {}
    for rel in analysis.relations:
        want = expected["relations"].get(rel.weight)
        op = None if want is not None and want[1] is None else rel.op
        table[rel.weight] = (rel.group, op, rel.status)
    return table


@pytest.mark.parametrize("batch_size", BATCHES)
@pytest.mark.parametrize("name", NAMES)
def test_relations(name, batch_size):
    case, analysis = analysed(name, batch_size)
    weights = [rel.weight for rel in analysis.relations]
    assert len(weights) == len(set(weights)), f"a weight has several relations: {weights}"
    assert _relation_table(analysis, case.expected) == case.expected["relations"]
    relations = analysis.relations
    pairs = {
        frozenset((r.weight, relations[r.same_injection].weight)) for r in relations if r.same_injection is not None
    }
    assert pairs == case.expected["same_injection"]  # op outputs that enter their group through one sum


@pytest.mark.parametrize("name", NAMES)
def test_relation_reasons(name):
    """Traced relations carry no reason; excluded ones always explain themselves."""
    _, analysis = analysed(name, None)
    for rel in analysis.relations:
        assert rel.status in ("traced", "instantaneous", "excluded")
        assert isinstance(rel.reason, str)
        if rel.status == "traced":
            assert rel.reason == ""
            assert rel.group is not None
        if rel.status == "excluded":
            assert rel.reason.strip()
        if rel.status == "instantaneous":
            assert rel.group is None


# --------------------------------------------------------------------------- trace sizes


def _expected_bytes(case, algorithm: str) -> int:
    """The documented trace sizes, from the hand-written expectation and the model's weights."""
    expected, batch = case.expected, case.batch_size or 1
    total = 0
    for weight, (group, _op, status) in expected["relations"].items():
        if status != "traced":
            continue
        n_states = expected["groups"][group]["n_states"]
        n_neurons = expected["groups"][group]["n_neurons"]
        size, dtype = zoo.weight_size(case.model, weight)
        # a single shared weight's trace is per neuron
        if algorithm in ("d_rtrl", "e_prop"):
            total += batch * (n_neurons if size == 1 else size) * n_states * dtype.itemsize
        elif expected["groups"][group]["lti"] and n_neurons * n_states <= SMALL_LTI:  # a small readout: exact
            total += batch * size * n_states * dtype.itemsize
        else:  # one postsynaptic factor for op outputs summed into the group
            order = zoo.weight_leaf_paths(case.model).index  # the earlier weight keeps the factor
            shared = any(weight in pair and min(pair, key=order) != weight for pair in expected["same_injection"])
            total += batch * (expected["n_pre"][weight] + (0 if shared else n_neurons * n_states)) * dtype.itemsize
    return total


@pytest.mark.parametrize("batch_size", BATCHES)
@pytest.mark.parametrize("name", NAMES)
def test_trace_bytes(name, batch_size):
    case, analysis = analysed(name, batch_size)
    for algorithm in ALGORITHMS:
        got = analysis.trace_bytes(algorithm)
        assert isinstance(got, int)
        assert got == _expected_bytes(case, algorithm), algorithm


# --------------------------------------------------------------------------- state initialisation


@pytest.mark.parametrize("batch_size", BATCHES)
def test_analyze_initialises_states(batch_size):
    """A model with no states yet is initialised by `analyze` with the requested batch size."""
    case = zoo.lif_cuba(batch_size=batch_size, init=False)
    assert not zoo.hidden_paths(case.model), "weights exist from construction, hidden states must not"
    analysis = fusetrace.analyze(case.model, *case.inputs, batch_size=batch_size)
    want_shape = (10,) if batch_size is None else (batch_size, 10)
    assert case.model.N.V.value.shape == want_shape
    assert {g.name: frozenset(g.states) for g in analysis.groups} == {
        name: g["states"] for name, g in case.expected["groups"].items()
    }


def test_analyze_reinitialises_wrong_batch():
    """States built for no batch are re-initialised when `analyze` is asked for batch 3."""
    case = zoo.lif_cuba(batch_size=None)
    batched = zoo.lif_cuba(batch_size=3, init=False).inputs
    analysis = fusetrace.analyze(case.model, *batched, batch_size=3)
    assert case.model.N.V.value.shape == (3, 10)
    assert case.model.inp.syn.g.value.shape == (3, 10)
    assert [g.n_neurons for g in analysis.groups] == [10]


def test_analyze_keeps_existing_states():
    """States of the right batch are used as they are: same objects, same values afterwards."""
    case = zoo.lif_cuba(batch_size=2)
    model = case.model
    model.N.V.value = jnp.full_like(u.get_mantissa(model.N.V.value), 0.25) * u.mV
    v_state, g_state = model.N.V, model.inp.syn.g
    before = {zoo.path_of(model, s): np.asarray(u.get_mantissa(s.value)) for s in (v_state, g_state)}
    analysis = fusetrace.analyze(model, *case.inputs, batch_size=2)
    assert model.N.V is v_state and model.inp.syn.g is g_state
    for state in (v_state, g_state):
        after = np.asarray(u.get_mantissa(state.value))
        np.testing.assert_array_equal(after, before[zoo.path_of(model, state)])
    assert analysis.group_of(zoo.path_of(model, v_state)).n_neurons == 10


# --------------------------------------------------------------------------- display and graph


@pytest.mark.parametrize("name", ["ei_net", "linear_readout", "align_pre"])
def test_display(name):
    case, analysis = analysed(name, None)
    summary = analysis.summary()
    assert isinstance(summary, str) and summary.strip()
    for weight in case.expected["relations"]:
        assert weight in summary, f"summary does not mention {weight}"
    dot = analysis.to_dot()
    assert isinstance(dot, str) and "digraph" in dot
    for weight in case.expected["relations"]:
        text = analysis.explain(weight)
        assert isinstance(text, str) and weight in text
    for group in case.expected["groups"]:
        assert isinstance(analysis.explain(group), str) and analysis.explain(group).strip()


def test_graph_is_frozen_digraph():
    _, analysis = analysed("ei_net", None)
    graph = analysis.graph
    assert isinstance(graph, nx.DiGraph)
    assert nx.is_frozen(graph)
    with pytest.raises(nx.NetworkXError):
        graph.add_node("not allowed")


# --------------------------------------------------------------------------- unsupported primitives


MYSTERY_NAME = "fusetrace_test_mystery"
mystery_p = Primitive(MYSTERY_NAME)
mystery_p.def_impl(lambda x: 0.5 * x)
mystery_p.def_abstract_eval(lambda aval: aval)


class _MysteryCell(brainstate.nn.Module):
    """h' = mystery(h) + x W: a hidden state updated through a primitive no rule knows."""

    def __init__(self, n_in=3, n=4, on_hidden=True):
        super().__init__()
        self.n, self.on_hidden = n, on_hidden
        self.fc = brainstate.nn.Linear(n_in, n, b_init=None)

    def init_state(self, batch_size=None, **kwargs):
        shape = (self.n,) if batch_size is None else (batch_size, self.n)
        self.v = brainstate.HiddenState(jnp.zeros(shape, dtype=jnp.float32))

    def update(self, x):
        if self.on_hidden:
            self.v.value = mystery_p.bind(self.v.value) + self.fc(x)
            return self.v.value
        # The unknown primitive only sees the raw input: no hidden state or weight on its path.
        self.v.value = 0.9 * self.v.value + self.fc(x)
        return self.v.value, mystery_p.bind(x)


class _MysteryNet(brainstate.nn.Module):
    def __init__(self, on_hidden=True):
        super().__init__()
        self.odd_layer = _MysteryCell(on_hidden=on_hidden)

    def update(self, x):
        return self.odd_layer(x)


def test_unsupported_primitive_on_hidden_path():
    model = _MysteryNet(on_hidden=True)
    brainstate.nn.init_all_states(model)
    x = jnp.ones((3,), dtype=jnp.float32)
    model.update(x)  # the model itself is fine
    hidden = zoo.path_of(model, model.odd_layer.v)
    assert hidden == "odd_layer.v"
    with pytest.raises(UnsupportedPrimitiveError) as info:
        fusetrace.analyze(model, x)
    assert isinstance(info.value, NotImplementedError)
    assert isinstance(info.value, FusetraceError)
    message = str(info.value)
    assert MYSTERY_NAME in message
    assert hidden in message
    lines = message.splitlines()
    assert lines[0].strip(), "the first part says what failed"
    for part in ("  where:", "  why:", "  fix:"):
        assert any(line.startswith(part) for line in lines), f"no line starting {part!r}:\n{message}"


def test_unsupported_primitive_off_hidden_paths_is_allowed():
    """STYLE.md: an unknown primitive touching no hidden state or weight is bound unchanged."""
    model = _MysteryNet(on_hidden=False)
    brainstate.nn.init_all_states(model)
    x = jnp.ones((3,), dtype=jnp.float32)
    analysis = fusetrace.analyze(model, x)
    v = zoo.path_of(model, model.odd_layer.v)
    assert [(g.name, g.states) for g in analysis.groups] == [(v, (v,))]
    assert [(r.weight, r.group, r.status) for r in analysis.relations] == [
        (zoo.leaf_of(model, model.odd_layer.fc.weight, "weight"), v, "traced")
    ]


class _SelfMixing(brainstate.nn.Module):
    """A population whose input current reads the mean of its OWN membrane potentials: no weight between
    the neurons, so per-neuron traces would silently drop the mixing."""

    def __init__(self):
        super().__init__()
        self.pop = bps.LIF(5, V_th=1.0 * u.mV, tau=5.0 * u.ms)
        self.fc = brainstate.nn.Linear(3, 5)

    def update(self, x):
        return self.pop(self.fc(x) * u.mA + u.math.mean(self.pop.V.value) / u.ohm)


def test_a_state_mixing_its_own_neurons_without_a_weight_is_refused():
    model = _SelfMixing()
    brainstate.nn.init_all_states(model)
    with pytest.raises(NotNeuronAlignedError, match=r"`pop\.V` mixes neurons of `pop\.V`"):
        fusetrace.analyze(model, jnp.ones(3))
