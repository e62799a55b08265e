"""`Analysis`: what fusetrace found in one step (groups, relations, graph) and how to look at it."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np

from . import display
from .capture import Captured
from .drawing import Drawing, build_drawing, to_dot
from .errors import CaptureError, four_part
from .naming import Names
from .passes.hidden import Group
from .passes.relations import Relation
from .stepfacts import StepFacts

ALGORITHMS = ("d_rtrl", "es_d_rtrl", "e_prop")
LARGE_CONSTANT_BYTES = 1 << 16  # constants from this size on can be passed to the step as arguments


def _nbytes(x) -> int:
    return int(np.prod(np.shape(x), dtype=int)) * np.dtype(jnp.result_type(x)).itemsize


def _spec(x) -> str:
    return f"{jnp.result_type(x)}{list(jnp.shape(x))}"


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity (a static jit field)
class Analysis:
    """The analysis of one captured step.

    Attributes:
        groups: hidden groups (states sharing a neuron axis, coupled element-wise).
        relations: one or more per weight leaf, each "traced", "instantaneous" or "excluded".
        graph: the frozen networkx dependency graph (schema in `fusetrace.graph`).
    """

    captured: Captured
    facts: StepFacts
    groups: tuple[Group, ...]
    relations: tuple[Relation, ...]
    graph: nx.DiGraph
    csr_rows: tuple = dataclasses.field(default=(), repr=False)  # ((indptr operand, row of each entry), ...)

    def rows_of(self, indptr) -> Any:
        """The precomputed row of every stored entry of the CSR matrix whose `indptr` is the captured
        step's operand `indptr` (a constvar, or a literal), or None (then the program computes it)."""
        return next((rows for var, rows in self.csr_rows if var is indptr), None)

    def constants(self) -> dict:
        """The large arrays the step closes over: `{"step": (...), "csr_rows": (...)}` — the captured
        step's constants of at least `LARGE_CONSTANT_BYTES` (a connectome's CSR indices, ...) and the
        precomputed CSR row indices (see `Learner.constants`)."""
        consts = self.captured.jaxpr.consts
        return {
            "step": tuple(consts[i] for i in self.large_constant_indices()),
            "csr_rows": tuple(rows for _, rows in self.csr_rows),
        }

    def with_constants(self, constants: dict) -> "Analysis":
        """This analysis with `constants` (the structure, shapes and dtypes of `constants()`; arrays or
        tracers) in place of its own."""
        own = self.constants()
        expected, got = jax.tree.structure(own), jax.tree.structure(constants)
        mismatch = expected != got or any(
            jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b)
            for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(constants), strict=True)
        )
        if mismatch:
            raise CaptureError(
                four_part(
                    what="`constants` are not the learner's",
                    where=f"got {jax.tree.map(_spec, constants)}",
                    why=f"the compiled step closes over {jax.tree.map(_spec, own)}",
                    fix="pass `learner.constants` (or arrays of the same structure, shapes and dtypes)",
                )
            )
        consts = list(self.captured.jaxpr.consts)
        for i, value in zip(self.large_constant_indices(), constants["step"], strict=True):
            consts[i] = value
        csr_rows = tuple((var, rows) for (var, _), rows in zip(self.csr_rows, constants["csr_rows"], strict=True))
        return dataclasses.replace(self, captured=self.captured.with_consts(consts), csr_rows=csr_rows)

    def large_constant_indices(self) -> list[int]:
        consts = self.captured.jaxpr.consts
        return [i for i, c in enumerate(consts) if np.ndim(c) > 0 and _nbytes(c) >= LARGE_CONSTANT_BYTES]

    @property
    def batch_size(self) -> int | None:
        """The batch size the states were captured with, or None for unbatched states."""
        return self.captured.batch_size

    def group_of(self, path: str) -> Group:
        """The group holding the hidden state (leaf) at `path`."""
        for group in self.groups:
            if path in group.states:
                return group
        raise KeyError(f"no hidden state `{path}`; hidden states: {[s for g in self.groups for s in g.states]}")

    def group_named(self, name: str) -> Group:
        """The group called `name` (as in `summary()`)."""
        return next(g for g in self.groups if g.name == name)

    def relations_of(self, weight: str) -> tuple[Relation, ...]:
        """The relations of the weight leaf at path `weight` (at least one for every weight leaf): those filed
        under it and those whose op reads a transform of it with other weights (a low-rank `u @ v`)."""
        leaf = next((i for i, leaf in enumerate(self.captured.leaves) if leaf.path == weight), None)
        return tuple(r for r in self.relations if r.weight == weight or leaf in r.weight_leaves)

    def trace_bytes(self, algorithm: str) -> int:
        """Bytes of trace state the algorithm keeps for this batch size.

        `d_rtrl` / `e_prop`: Σ over traced relations of B·|W|·S (B·N·S for a single shared weight or a
        per-neuron parameter: the trace is per neuron; B·P·|W|·S for a convolution with P output positions);
        `es_d_rtrl`: Σ of B·(n_pre + N·S) (without the N·S of a relation whose op output enters its
        group summed with an earlier one's: they share that postsynaptic factor; a relation into a small
        linear time-invariant group, `Relation.small_lti`, and a per-neuron one count as under d_rtrl),
        with B the batch size (1 when unbatched), S the receiving group's states per neuron, N its
        neurons, and the weight's item size.
        """
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
        batch = self.batch_size or 1
        total = 0
        for relation in self.relations:
            if relation.status != "traced":
                continue
            leaf = self.captured.leaves[relation.weight_leaf]
            group = self.group_named(relation.group)
            itemsize = np.dtype(leaf.dtype).itemsize
            size = int(np.prod(relation.weight_shape or leaf.shape, dtype=int))  # the effective weight's
            if algorithm == "es_d_rtrl" and not relation.keeps_trace:  # factorised (element-wise: n_pre 0)
                same = relation.same_injection
                shared = same is not None and not self.relations[same].keeps_trace
                post = 0 if shared else group.n_neurons * group.n_states
                total += batch * (relation.n_pre + post) * itemsize
            elif relation.elementwise or size == 1:  # one parameter for all neurons: trace per neuron
                total += batch * group.n_neurons * group.n_states * itemsize
            elif relation.positions > 1:  # a convolution: one kernel copy per output position
                total += batch * relation.positions * size * group.n_states * itemsize
            else:
                total += batch * size * group.n_states * itemsize
        return total

    @functools.cached_property
    def names(self) -> Names:
        """Raw paths <-> the user's names of states, weights and groups (the scheme: `fusetrace.naming`)."""
        return Names.of(self.captured.leaves, self.groups)

    def name_of(self, path: str) -> str:
        """The user's name of the state or weight leaf at raw `path` (a `StateLeaf.path`, a state path or
        a `Relation.weight`): `I.V` for brainpy's `EI.post.V`, `E.syn[inE].g` for an AlignPost synapse.

        Raises:
            KeyError: no state or leaf has this raw path.

        Examples:
            ```python
            analysis.name_of(analysis.relations[0].weight)  # "inE.comm.weight.weight"
            ```
        """
        if path not in self.names.leaves:
            raise KeyError(f"no state or weight at raw path `{path}` (a name? see `path_of`)")
        return self.names.name_of(path)

    def group_name_of(self, group: Group | str) -> str:
        """The user's name of a group (a `Group`, or its raw `Group.name`): the population holding its
        states (`E` for `E.V` and `E.syn[inE].g`)."""
        return self.names.group(group if isinstance(group, str) else group.name)

    def path_of(self, name: str) -> str:
        """The raw path (the key in `Learner.params`, `StateLeaf.path`, `Group.name`) that a name means;
        a raw path is returned as it is.

        Raises:
            KeyError: nothing has this name or path.
        """
        raw = self.names.resolve(name)
        if raw is None:
            raise KeyError(f"no state, weight or group `{name}`; known: {sorted(self.names.leaves.values())}")
        return raw

    def trace_memory(self) -> dict[str, int]:
        """Bytes of trace state for each algorithm (`trace_bytes`)."""
        return {name: self.trace_bytes(name) for name in ALGORITHMS}

    def summary(self) -> str:
        """Stable text: groups, states per neuron, relations, exclusions with reasons, trace memory."""
        return display.summary(self, self.trace_memory())

    def drawing(self, title: str = "") -> Drawing:
        """The drawing: groups as boxes holding their states, each weight an arrow labelled with its name
        and op and coloured by its relation's status (traced / instantaneous / excluded)."""
        return build_drawing(self, title=title)

    def draw(self, path, title: str = "") -> str:
        """Write the drawing to `path` (`.svg` or `.png`); Graphviz when its `dot` program is on PATH, else a
        layered matplotlib layout. Returns the engine used ("dot" or "matplotlib")."""
        from . import plots  # matplotlib is loaded only to draw

        return plots.draw(self.drawing(title), path)

    def to_dot(self) -> str:
        """The drawing in Graphviz dot syntax (render it with `dot -Tsvg`)."""
        return to_dot(self.drawing())

    def explain(self, path: str) -> str:
        """What fusetrace does with the state or weight at `path` (a name such as `I.V`, or a raw path), and
        why; a group's name explains its first state."""
        return display.explain(self, path)

    def _repr_html_(self) -> str:
        from . import plots

        tables = [
            display.html_table(display.group_rows(self), "hidden groups"),
            display.html_table(display.relation_rows(self), "weight relations"),
            display.html_table(display.memory_rows(self.trace_memory()), "trace memory"),
        ]
        return display.html_view("fusetrace analysis", tables, plots.svg(self.drawing()))

    def __repr__(self) -> str:
        groups = ", ".join(self.names.group(g.name) for g in self.groups)
        return f"Analysis(groups=[{groups}], relations={len(self.relations)}, batch_size={self.batch_size})"
