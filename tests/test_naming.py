"""The user's names (`fusetrace.naming`): every state, weight and group shown by the attribute path the
model was written with, never by brainstate's first-found path, an AlignPost describer key or a repr.

Checked on every model of the zoo and the coverage zoo, on the task networks and on the E/I example of
the docs; names are checked against the model itself (an attribute path must lead to its state; a
merged synapse's projections must hold it), with a reference shortest-path search written here.
"""

import collections
import importlib.util
import pathlib
import re

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax.numpy as jnp
import numpy as np
import pytest

import fusetrace
import zoo
import zoo_coverage
from fusetrace.capture import StateLeaf, state_names
from fusetrace.errors import FusetraceError, NotNeuronAlignedError
from fusetrace.naming import Names, group_names, relative_to_parent, split, unique
from fusetrace.passes.hidden import Group
from fusetrace.tasks import REGISTRY, connectome_network, drive_neurons, generate_connectome

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = ("_before_updates", "_after_updates", "<class", "{'", "Constant(", " // ", "Quantity(")
MAX_NAME = 100  # "no longer than a line"
# an attribute path with optional [item] parts: `E.V`, `layers[0].V`, `E.syn[inE,EE].g`
NAME = re.compile(
    r"[A-Za-z_]\w*(\[[^\]\s]*(\[[^\]\s]*\])*[^\]\s]*\])*(\.[A-Za-z_]\w*(\[[^\]\s]*(\[[^\]\s]*\])*[^\]\s]*\])*)*"
)


def _cases():
    for name, factory in zoo.ZOO.items():
        yield f"zoo:{name}", lambda factory=factory: factory()
    for name, model in zoo_coverage.COVERAGE.items():
        yield f"coverage:{name}", lambda model=model: model.build(model.batch_sizes[0])


CASES = dict(_cases())


def _task_network(name: str):
    spec = REGISTRY[name]
    brainstate.environ.set(dt=spec.dt_ms * u.ms)
    return spec.network(), (spec.sample(batch=2, seed=0).inputs[0],), 2


def _connectome_network():
    graph = generate_connectome(120, 1_000, n_neuropils=3, seed=0)
    network = connectome_network(graph, drive=drive_neurons(graph, 12), batch_size=None)
    return network, (np.zeros(12), 0.0 * u.ms), None


def ei_example_module():
    """`examples/ei_inspect.py`, loaded from its file (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location("ei_inspect", ROOT / "examples" / "ei_inspect.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ei_example():
    model, example, _ = ei_example_module().ei_network()
    return model, (example,), None


# --------------------------------------------------------------------------- a reference, and checks


def _resolve(model, name: str):
    """The object an attribute path (`a.b[0].c`, `d[key]`) leads to, or None; a merged synapse's
    `POST.syn[PROJ,...]` leads to the synapse that the projections PROJ (relative to POST's parent) all
    hold and that feeds POST."""
    node, parts = model, split(name)
    for index, part in enumerate(parts):
        attribute, bracket, rest = part.partition("[")
        item = rest[:-1]
        if bracket and attribute in ("syn", "out"):
            node = _merged(model, parts[: index - 1], item, attribute, node)
            continue
        node = getattr(node, attribute, None)
        if bracket and isinstance(node, list | tuple) and item.isdigit():
            node = node[int(item)]
        elif bracket and isinstance(node, dict):
            node = node.get(item)
        elif bracket:
            return None
    return node


def _merged(model, parent: list[str], projections: str, part: str, post):
    holders = []
    for projection in split_commas(projections):
        if not projection.startswith("+"):
            holder = _resolve(model, ".".join([*parent, projection])) if parent else None
            holders.append(holder if holder is not None else _resolve(model, projection))
    held = [getattr(h, part, None) for h in holders]
    fits = holders and all(h is not None and h.post is post for h in holders) and all(x is held[0] for x in held)
    return held[0] if fits else None


def split_commas(text: str) -> list[str]:
    """`text` split at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return [*parts, text[start:]]


def _shortest_depth(model, target) -> int | None:
    """Attribute hops from `model` to `target` through public attributes (breadth-first)."""
    queue, seen = collections.deque([(model, 0)]), {id(model)}
    while queue:
        node, depth = queue.popleft()
        if node is target:
            return depth
        for attribute, value in vars(node).items():
            if attribute.startswith("_"):
                continue
            children = value if isinstance(value, list | tuple) else [value]
            for child in children:
                if isinstance(child, brainstate.graph.Node) and id(child) not in seen:
                    seen.add(id(child))
                    queue.append((child, depth + 1))
    return None


def _check_name(name: str) -> None:
    assert len(name) <= MAX_NAME and "\n" not in name, name
    assert not any(bad in name for bad in FORBIDDEN), name
    assert NAME.fullmatch(name), f"not an attribute path: {name!r}"


def _check_text(text: str) -> None:
    bad = [b for b in FORBIDDEN if b in text]
    assert not bad, f"{bad} shown in:\n{text[:2000]}"


def _check_analysis(model, analysis) -> None:
    leaves = analysis.captured.leaves
    names = [leaf.name for leaf in leaves if leaf.role != "random"]
    assert len(set(names)) == len(names), f"names repeat: {names}"
    for leaf in leaves:
        if leaf.role != "random":
            _check_name(leaf.name)
            assert analysis.name_of(leaf.path) == leaf.name and analysis.path_of(leaf.name) == leaf.path
    for group in analysis.groups:
        _check_name(analysis.group_name_of(group))
    _check_populations(model, analysis)
    _check_text(analysis.summary())
    _check_text(analysis.to_dot())
    for leaf in leaves:
        if leaf.role in ("hidden", "weight"):
            _check_text(analysis.explain(leaf.name))
    _check_text(repr(analysis))


def _check_populations(model, analysis) -> None:
    """Every neuron population's group is named by the shortest attribute path to the population."""
    states = analysis.captured.states
    for neuron in _neurons(model):
        index = next(i for i, s in enumerate(states) if s is neuron.V)
        leaf = analysis.captured.leaves[analysis.captured.leaf_state.index(index)]
        name = analysis.group_name_of(analysis.group_of(leaf.path))
        assert _resolve(model, name) is neuron, f"group {name!r} is not the population's attribute path"
        assert len(split(name)) == _shortest_depth(model, neuron), f"{name!r} is not the shortest path"


def _neurons(model) -> list:
    found = []
    for node in model.nodes(bps.Neuron).values():
        if all(node is not seen for seen in found):
            found.append(node)
    return found


def _states_resolve(model) -> None:
    """Every state's name leads to the state (plain paths by attributes, merged synapses by projections)."""
    for state, name in state_names(model).items():
        assert _resolve(model, name) is state, f"{name!r} does not lead to its state"


# --------------------------------------------------------------------------- the zoos, tasks, example


@pytest.mark.parametrize("case", list(CASES))
def test_names_on_the_zoos(case):
    built = CASES[case]()
    _states_resolve(built.model)
    try:
        analysis = fusetrace.analyze(built.model, *built.inputs, batch_size=built.batch_size)
    except FusetraceError as error:  # a model the analysis refuses: its message speaks names too
        _check_text(str(error))
        return
    _check_analysis(built.model, analysis)


@pytest.mark.parametrize("name", [*REGISTRY, "connectome", "ei_example"])
def test_names_on_task_networks_and_the_example(name):
    model, inputs, batch = {"connectome": _connectome_network, "ei_example": _ei_example}.get(
        name, lambda: _task_network(name)
    )()
    _states_resolve(model)
    analysis = fusetrace.analyze(model, *inputs, batch_size=batch)
    _check_analysis(model, analysis)


def test_the_ei_example_reads_as_written():
    model, inputs, _ = _ei_example()
    analysis = fusetrace.analyze(model, *inputs)
    groups = {analysis.group_name_of(g): [analysis.name_of(p) for p in g.states] for g in analysis.groups}
    assert groups == {"E": ["E.V", "E.syn[inE,EE].g", "E.syn[IE].g"], "I": ["I.V", "I.syn[EI].g"], "out": ["out.r"]}
    weights = [analysis.name_of(r.weight) for r in analysis.relations]
    assert sorted(weights) == sorted([*(f"{p}.comm.weight.weight" for p in ("inE", "EE", "EI", "IE")), "out.weight"])
    assert "  I: 10 neurons x 2 states per neuron (nonlinear)\n    - I.V\n    - I.syn[EI].g\n" in analysis.summary()
    assert analysis.explain("I.V") == analysis.explain(analysis.path_of("I.V"))  # a name or the raw path
    assert analysis.explain("I") == analysis.explain("I.V")  # a group's name explains its first state
    graph_names = {data["name"] for _, data in analysis.graph.nodes(data=True) if data["kind"] == "hidden"}
    assert graph_names == {n for states in groups.values() for n in states}


def test_names_are_stable_across_builds():
    """Two builds of one model (fresh objects, other ids) get the same names, in the same order."""
    first, second = (zoo.ei_merged(batch_size=2) for _ in range(2))
    assert list(state_names(first.model).values()) == list(state_names(second.model).values())


# --------------------------------------------------------------------------- the pieces


def test_split_and_relative():
    assert split("E.syn[inE,a.b].g") == ["E", "syn[inE,a.b]", "g"]
    assert split("layers[0].V") == ["layers[0]", "V"]
    assert relative_to_parent("hidden.inp", "hidden.N") == "inp"
    assert relative_to_parent("inp", "hidden.N") == "inp"
    assert relative_to_parent("other.inp", "hidden.N") == "other.inp"
    assert unique(["a", "b", "a", "a"]) == ["a", "b", "a~2", "a~3"]


def _leaf(path: str, name: str) -> StateLeaf:
    return StateLeaf(path, path, (), "hidden", (3,), np.dtype("float32"), None, None, 0, name=name)


def test_group_names_fall_back_to_the_first_state():
    leaves = [_leaf("x.N.V", "N.V"), _leaf("x.N.g", "N.syn[p].g"), _leaf("N.a", "N.a"), _leaf("h", "h")]
    groups = [
        Group("x.N.V", ("x.N.V", "x.N.g"), (0, 1), 3, (3,), False),
        Group("N.a", ("N.a",), (2,), 3, (3,), False),  # would also be `N`: taken, so its state's name
        Group("h", ("h",), (3,), 3, (3,), True),  # a state on the model itself: no module
    ]
    assert group_names(groups, leaves) == {"x.N.V": "N.V", "N.a": "N.a", "h": "h"}
    assert group_names(groups[:1] + groups[2:], leaves) == {"x.N.V": "N", "h": "h"}


def test_translate_rewrites_raw_paths_only():
    names = Names(
        {"EI.post.V": "I.V", "E._b.(<class 'x'>).syn.g": "E.syn[inE].g", "w.weight": "w.weight"},
        {"EI.post.V": "I", "E.V": "E"},
    )
    text = (
        "group `EI.post.V` lies on a loop; state `EI.post.V` and `E._b.(<class 'x'>).syn.g` are read; "
        "reaches hidden group(s) E.V, EI.post.V; `EI.post.V_th` and xEI.post.V stay"
    )
    assert names.translate(text) == (
        "group `I` lies on a loop; state `I.V` and `E.syn[inE].g` are read; "
        "reaches hidden group(s) E, I; `EI.post.V_th` and xEI.post.V stay"
    )
    assert names.resolve("I.V") == "EI.post.V" and names.resolve("I") == "EI.post.V"
    assert names.resolve("EI.post.V") == "EI.post.V" and names.resolve("nothing") is None


class MixedNeurons(brainstate.nn.Module):
    """A population `pop` whose input current reads the mean of its synapse's conductances (no weight in
    between), fed by a projection `inp` that brainstate's traversal reaches first (raw path `inp.post.V`)."""

    def __init__(self, n_in=3, n=4):
        super().__init__()
        self.pop = bps.LIF(n, V_th=1.0 * u.mV, tau=10.0 * u.ms)
        self.inp = bps.AlignPostProj(
            comm=brainstate.nn.Linear(n_in, n, w_init=braintools.init.KaimingNormal(unit=u.mA), b_init=None),
            syn=bps.Expon.desc(n, tau=5.0 * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA)),
            out=bps.CUBA.desc(scale=1.0),
            post=self.pop,
        )

    def update(self, x):
        self.inp(x)
        return self.pop(jnp.mean(u.get_mantissa(self.inp.syn.g.value), axis=-1, keepdims=True) * u.mA)


def test_errors_speak_names():
    model = MixedNeurons()
    with pytest.raises(NotNeuronAlignedError) as raised:
        fusetrace.analyze(model, jnp.zeros(3))
    message = str(raised.value)
    assert "`pop.V`" in message and "`pop.syn[inp].g`" in message and "inp.post" not in message, message
    _check_text(message)
