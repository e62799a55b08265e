"""Find hidden groups.

Consumes: `StepFacts` of a simplified step. Produces: a tuple of `Group`s; groups and the states in
them follow `model.states()` order.

A group is the set of hidden leaves whose new values depend on each other's previous or new values
element-wise (paths through weight relations are already cut). Invariants checked here, not assumed:
every leaf of a group has one shape; a hidden leaf's new value depends on no hidden value through a
neuron-mixing path (else `NotNeuronAlignedError`). A group is linear time-invariant (`lti`) when its new
values are affine, with source-free coefficients, in its own states and in the relations feeding it
(the standard `LeakyRateReadout`).
"""

import dataclasses

from fusetrace._compat import source_line
from fusetrace.errors import NotNeuronAlignedError, four_part
from fusetrace.stepfacts import StepFacts


@dataclasses.dataclass(frozen=True)
class Group:
    """Hidden states sharing a neuron axis and coupled element-wise within a step.

    name: the dotted path of its first state. states: dotted paths of its hidden leaves.
    leaves: their indices in `Captured.leaves`. n_neurons: elements per batch entry.
    shape: the (common) shape of its leaves. lti: linear time-invariant (see module docstring).
    """

    name: str
    states: tuple[str, ...]
    leaves: tuple[int, ...]
    n_neurons: int
    shape: tuple[int, ...]
    lti: bool

    def __post_init__(self):
        if len(self.states) != len(self.leaves) or not self.leaves:
            raise ValueError("a group needs one path per leaf and at least one leaf")

    @property
    def n_states(self) -> int:
        return len(self.leaves)


def _find(parent: dict[int, int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def find_groups(facts: StepFacts) -> tuple[Group, ...]:
    leaves = facts.captured.leaves
    hidden = [i for i, leaf in enumerate(leaves) if leaf.role == "hidden"]
    parent = {i: i for i in hidden}
    for j in hidden:
        for (kind, i), dep in facts.new_fact(j).items():
            if kind not in ("hidden", "new"):
                continue
            if not dep.aligned or leaves[i].shape != leaves[j].shape:  # its own neurons too (i == j)
                _not_aligned(facts, j, i)
            parent[_find(parent, i)] = _find(parent, j)
    members: dict[int, list[int]] = {}
    for i in sorted(hidden, key=lambda i: (leaves[i].order, i)):  # model.states() order
        members.setdefault(_find(parent, i), []).append(i)
    groups = []
    for indices in members.values():
        member_set = set(indices)
        lti = all(
            dep.affine
            for j in indices
            for (kind, i), dep in facts.new_fact(j).items()
            if kind == "relation" or (kind in ("hidden", "new") and i in member_set)
        )
        first = leaves[indices[0]]
        groups.append(
            Group(
                name=first.path,
                states=tuple(leaves[i].path for i in indices),
                leaves=tuple(indices),
                n_neurons=first.n_neurons,
                shape=first.shape,
                lti=lti,
            )
        )
    return tuple(groups)


def _not_aligned(facts: StepFacts, j: int, i: int) -> None:
    leaves = facts.captured.leaves
    var = facts.new_vars[j]
    producer = next((e for e in facts.captured.jaxpr.jaxpr.eqns if var in e.outvars), None)
    where = f"`{producer.primitive.name}` at {source_line(producer)}" if producer is not None else "the step"
    raise NotNeuronAlignedError(
        four_part(
            what=f"the update of hidden state `{leaves[j].path}` mixes neurons of `{leaves[i].path}` "
            "without going through a weight",
            where=f"the new value of `{leaves[j].path}` is produced by {where}",
            why="per-neuron traces need each neuron's new state to depend only on the same neuron's states "
            "(cross-neuron paths must pass through a weight: matmul, event or sparse product)",
            fix="route the cross-neuron interaction through a weight (a brainstate.nn.Linear or event "
            "projection), or keep the mixing state out of HiddenState (use ShortTermState)",
        )
    )
