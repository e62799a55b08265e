"""`Analysis`: what fusetrace found in one step (groups, relations, graph) and how to look at it."""

import dataclasses

import networkx as nx
import numpy as np

from . import display
from .capture import Captured
from .passes.hidden import Group
from .passes.relations import Relation
from .stepfacts import StepFacts

ALGORITHMS = ("d_rtrl", "es_d_rtrl", "e_prop")


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
        """The relations of the weight leaf at path `weight` (at least one for every weight leaf)."""
        return tuple(r for r in self.relations if r.weight == weight)

    def trace_bytes(self, algorithm: str) -> int:
        """Bytes of trace state the algorithm keeps for this batch size.

        `d_rtrl` / `e_prop`: Σ over traced relations of B·|W|·S (B·N·S for a single shared weight or a
        per-neuron parameter: the trace is per neuron; B·P·|W|·S for a convolution with P output positions);
        `es_d_rtrl`: Σ of B·(n_pre + N·S) (without the N·S of a relation whose op output enters its
        group summed with an earlier one's: they share that postsynaptic factor),
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
            size = int(np.prod(leaf.shape, dtype=int))
            if algorithm == "es_d_rtrl":  # element-wise parameters: n_pre 0, per neuron
                post = 0 if relation.same_injection is not None else group.n_neurons * group.n_states
                total += batch * (relation.n_pre + post) * itemsize
            elif relation.elementwise or size == 1:  # one parameter for all neurons: trace per neuron
                total += batch * group.n_neurons * group.n_states * itemsize
            elif relation.positions > 1:  # a convolution: one kernel copy per output position
                total += batch * relation.positions * size * group.n_states * itemsize
            else:
                total += batch * size * group.n_states * itemsize
        return total

    def summary(self) -> str:
        """Stable text: groups, states per neuron, relations, exclusions with reasons, trace memory."""
        return display.summary(self)

    def to_dot(self) -> str:
        """The dependency graph in Graphviz dot syntax."""
        return display.to_dot(self.graph)

    def explain(self, path: str) -> str:
        """What fusetrace does with the state or weight at `path`, and why."""
        return display.explain(self, path)
