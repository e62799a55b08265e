"""Weight -> hidden relations.

Consumes: `StepFacts` and the `Group`s of the step. Produces: a tuple of `Relation`s — at least one
for every weight leaf, in leaf order — each with a status:

* "traced": the weight enters a contracting op (`dot_general`, event/sparse products) whose output
  reaches exactly one hidden group, element-wise (the tail). The op's other operand is the
  presynaptic input. Or (op "elementwise", no contraction) a per-neuron parameter — one element per
  neuron of the group, or a single element — that reaches exactly one group element-wise (a
  learnable bias current, threshold or time constant): its trace is per neuron.
* "instantaneous": the weight reaches the step's outputs without passing through a hidden state;
  it gets its exact same-step gradient.
* "excluded": no trace can be derived; `reason` says why. Nothing is ever dropped silently.

A relation also records what its presynaptic input depends on: `pre_links` — `(group, var, new)` for
each value aligned with one group's new (`new`) or previous values from which the input is assembled by
linear structural ops only (this step's spikes of one population, last step's spikes, or several
populations concatenated: the credit chains of `passes.chains` start there); `pre_new` — the groups
whose *new* values reach it; `pre_recurrent` — groups whose *previous* values reach it.
"""

import dataclasses

import numpy as np

from fusetrace._compat import Literal, aval_shape
from fusetrace.interpret import producers, uses_of
from fusetrace.rules import Dep, Fact
from fusetrace.stepfacts import StepFacts

from .hidden import Group

SMALL_LTI = 16  # neuron states per batch entry up to which an LTI group's relations keep exact traces (es_d_rtrl)


@dataclasses.dataclass(frozen=True)
class Relation:
    weight: str
    weight_leaf: int
    group: str | None
    op: str
    status: str
    reason: str = ""
    contraction: int | None = None  # index into StepFacts.contractions
    n_pre: int = 0  # elements per batch entry of the presynaptic input
    pre_new: tuple[str, ...] = ()
    pre_links: tuple = dataclasses.field(default=(), repr=False, compare=False)  # ((group, Var, new), ...)
    # when `pre_links` is empty: the aligned values the input is computed from through ops that mix a
    # group's neurons (a normalisation across them): ((group, Var, new), ...), read by the credit chains
    # with the mixing's derivative taken at the current step
    pre_mixing: tuple = dataclasses.field(default=(), repr=False, compare=False)
    pre_recurrent: tuple[str, ...] = ()
    # untraced states carried across steps (a delay's buffer) whose values reach the input: it reads its
    # groups' values of earlier steps there, so it has no `pre_links` and no credit chain goes through it
    pre_carried: tuple[str, ...] = ()
    shared: bool = False  # one weight element reaches many neurons (scalar weight)
    tail_perm: tuple[int, ...] | None = None  # group layout axis k = op output axis tail_perm[k]
    op_shape: tuple[int, ...] | None = None  # the op output's shape (the group's, up to tail_perm and unit axes)
    positions: int = 1  # output positions per batch entry that share each weight element (convolutions)
    same_injection: int | None = (
        None  # index of an earlier relation whose op output enters the group summed with this one's
    )
    weight_leaves: tuple[int, ...] = ()  # every weight the op's weight operand is computed from
    transformed: bool = False  # the op reads a transform of the weight(s): its effective weight is traced
    weight_shape: tuple[int, ...] = ()  # the traced weight's shape (the leaf's, or the effective weight's)
    # contractions (StepFacts indices) through which the op output also reaches the group within the step,
    # each a square product of values aligned with the group's neurons (a gate read by the cell's other
    # weight): `F` crosses them by their diagonal (`derive.transition_derivatives`)
    crossings: tuple[int, ...] = ()
    # one presynaptic element per batch entry that depends on nothing tracked (a bias written as `ones @ b`
    # by `passes.gates`): its per-weight trace is a per-neuron trace, as an element-wise parameter's
    per_neuron: bool = False
    # the receiving group is linear time-invariant and small (a readout: at most `SMALL_LTI` neuron states
    # per batch entry): es_d_rtrl keeps its per-weight trace, exact, in at most SMALL_LTI·n_pre numbers per
    # batch entry (a factorised pair is not exact there unless its decay is every unit's own)
    small_lti: bool = False
    # the part of the weight the op reads when its operand is a slice of it (a gate's columns `[:, 5:10]`,
    # a concatenation piece's rows `[0:3, :]`: `passes.gates`), in the leaf's indices; "" otherwise
    view: str = ""

    @property
    def keeps_trace(self) -> bool:
        """Whether es_d_rtrl keeps this relation's per-weight trace instead of a pair of factors: a per-neuron
        relation (its per-weight trace is per neuron) or one into a small LTI group (exact and small)."""
        return self.per_neuron or self.small_lti

    def __post_init__(self):
        if not self.weight_leaves:
            object.__setattr__(self, "weight_leaves", (self.weight_leaf,))
        if self.status not in ("traced", "instantaneous", "excluded"):
            raise ValueError(f"unknown relation status {self.status!r}")
        if self.status == "excluded" and not self.reason:
            raise ValueError("an excluded relation needs a reason")
        if self.status == "traced" and (self.group is None or (self.contraction is None) != self.elementwise):
            raise ValueError("a traced relation needs a group, and a contraction unless it is element-wise")

    @property
    def elementwise(self) -> bool:
        """A per-neuron parameter with no contraction (its trace is per neuron)."""
        return self.op == "elementwise"


def _group_of_leaf(groups: tuple[Group, ...]) -> dict[int, Group]:
    return {leaf: group for group in groups for leaf in group.leaves}


def _reaches(facts: StepFacts, source, groups) -> tuple[dict[str, Dep | None], bool]:
    """{group name: the dependency if it is one-to-one, else None} of the groups whose new values
    depend on `source`, and whether a step output depends on it directly."""
    by_leaf = _group_of_leaf(groups)
    reached: dict[str, Dep | None] = {}
    for leaf in sorted(by_leaf):
        dep = facts.new_fact(leaf).get(source)
        if dep is not None:
            name = by_leaf[leaf].name
            dep = dep if dep.one_to_one else None
            if name in reached:
                earlier = reached[name]
                if earlier is None or dep is None or earlier.perm != dep.perm:
                    dep = None
            reached[name] = dep
    jaxpr = facts.captured.jaxpr.jaxpr
    outputs = jaxpr.outvars[: facts.captured.n_outputs]
    direct = any(source in facts.propagation.of(v) for v in outputs)
    return reached, direct


def _feeds(facts: StepFacts, source) -> tuple[str, ...]:
    """The weights whose ops read `source` in their presynaptic input (weight -> weight paths)."""
    leaves = facts.captured.leaves
    names = [leaves[c.weight_leaf].path for c in facts.contractions if source in c.pre_fact]
    return tuple(dict.fromkeys(names))


def _read_with_its_group(facts: StepFacts, groups, leaf_index: int, group: str) -> bool:
    """Whether every op input that a per-neuron parameter of `group` reaches reads it only through linear
    views of values aligned with that group (its neurons' spikes, computed with the parameter: a trained
    threshold), one element per neuron — so its effect there is a per-neuron sensitivity `∂v/∂θ` beside
    the group's own, which the credit chains carry (`passes.credit`)."""
    source = ("weight", leaf_index)
    for contraction in facts.contractions:
        if source not in contraction.pre_fact:
            continue
        if group in _reaches(facts, ("relation", contraction.index), groups)[0]:
            return False  # back into its own group (a gate read by the cell's other weight): no chain carries it
        links = pre_links(facts, groups, contraction.pre_var)
        if not links or any(name != group for name, _, _ in links):
            return False
        for _, var, _ in links:
            dep = facts.propagation.of(var).get(source)
            if dep is not None and not dep.one_to_one and int(np.prod(facts.captured.leaves[leaf_index].shape)) > 1:
                return False
        if not any(source in facts.propagation.of(var) for _, var, _ in links):
            return False
    return True


def _through_weights(names: tuple[str, ...]) -> str:
    listed = ", ".join(f"`{name}`" for name in names)
    return (
        f"its value reaches the presynaptic input of the op of {listed} (a weight -> weight path): per-neuron "
        "traces do not cross another weight"
    )


def _groups_in(fact: Fact, kind: str, groups) -> tuple[str, ...]:
    by_leaf = _group_of_leaf(groups)
    names = [by_leaf[i].name for (k, i), dep in sorted(fact.items()) if k == kind and i in by_leaf]
    return tuple(dict.fromkeys(names))


# ops that only move elements, linearly: a value assembled from aligned values by these is pulled back
# exactly by a VJP through them
LINEAR_STRUCTURAL = frozenset(
    {
        "concatenate",
        "stack",
        "slice",
        "reshape",
        "squeeze",
        "transpose",
        "broadcast_in_dim",
        "convert_element_type",
        "copy",
        "rev",
        "pad",
    }
)


def _aligned_group(fact: Fact, shape, by_leaf) -> tuple[str, bool] | None:
    """`(group, new)` when `fact` depends, element-wise and with the group's shape, on the new values
    (`new`) or on the previous values of one group, and on no other hidden value; else None."""
    kinds = {(by_leaf[i].name, k) for (k, i), _ in fact.items() if k in ("new", "hidden") and i in by_leaf}
    aligned = [by_leaf[i] for (k, i), dep in fact.items() if k in ("new", "hidden") and i in by_leaf and dep.aligned]
    if len(kinds) == 1 and aligned and tuple(shape) == aligned[0].shape:
        ((name, kind),) = kinds
        return name, kind == "new"
    return None


def pre_links(facts: StepFacts, groups, var) -> tuple[tuple[str, object, bool], ...]:
    """`(group, aligned var, new)` from which `var` is assembled by `LINEAR_STRUCTURAL` ops alone (`new`:
    the var reads the group's new values, else its previous ones); empty when some part of `var` comes
    from hidden values another way."""
    by_leaf = _group_of_leaf(groups)
    producer = producers(facts.captured.jaxpr.jaxpr)
    links, frontier = [], [var]
    while frontier:
        current = frontier.pop(0)
        fact = facts.propagation.of(current)
        if not any(k in ("new", "hidden") for k, _ in fact):
            continue  # inputs and constants carry no credit
        found = _aligned_group(fact, aval_shape(current), by_leaf)
        if found is not None:
            links.append((found[0], current, found[1]))
            continue
        eqn = producer.get(current)
        if eqn is None or eqn.primitive.name not in LINEAR_STRUCTURAL:
            return ()
        frontier.extend(a for a in eqn.invars if not isinstance(a, Literal))
    return tuple(links)


# where an op reads positions, not values: a value reaching only these operands does not flow into its output
_INDEX_OPERANDS = {
    "dynamic_slice": lambda n: range(1, n),
    "dynamic_update_slice": lambda n: range(2, n),
    "gather": lambda n: (1,),
    "scatter": lambda n: (1,),
    "scatter-add": lambda n: (1,),
    "select_n": lambda n: (0,),
}
_COMPARISONS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})  # outputs a mask, not the compared values
_UNTRACKED = ("short_term", "long_term")  # states carried across steps whose sensitivities nothing traces


def carried_reads(facts: StepFacts, var) -> tuple[str, ...]:
    """The states carried from earlier steps, untraced (brainstate's short- and long-term states: a delay's
    ring buffer), written with hidden values, whose values flow into `var` — not only through positions
    or comparisons (a refractory neuron reads its last spike time only to mask its voltage). A weight op
    reading a population's spikes from a delay's buffer reads them as they were steps ago: no view of the
    population's new or previous values, and the credit of those steps passes through the buffer, which
    no trace follows."""
    captured = facts.captured
    jaxpr = captured.jaxpr.jaxpr
    carried = {}
    for i, leaf in enumerate(captured.leaves):
        written = jaxpr.outvars[captured.n_outputs + i]
        fact = {} if isinstance(written, Literal) else facts.propagation.of(written)
        holds = any(kind in ("new", "hidden") for kind, _ in fact)
        if leaf.role in _UNTRACKED and holds:  # (a clock or a counter carries no population's values)
            carried[jaxpr.invars[captured.n_inputs + i]] = leaf.name
    if not carried:
        return ()
    producer = producers(jaxpr)
    own = set(facts.new_vars.values())  # a group's new values: what they are computed from is its own dynamics
    found, frontier, seen = [], [var], set()
    while frontier:
        current = frontier.pop()
        if isinstance(current, Literal) or id(current) in seen or current in own:
            continue
        seen.add(id(current))
        if current in carried:
            found.append(carried[current])
            continue
        eqn = producer.get(current)
        if eqn is None or eqn.primitive.name in _COMPARISONS:
            continue
        skip = set(_INDEX_OPERANDS.get(eqn.primitive.name, lambda n: ())(len(eqn.invars)))
        frontier.extend(a for k, a in enumerate(eqn.invars) if k not in skip)
    return tuple(dict.fromkeys(found))


def mixing_links(facts: StepFacts, groups, var) -> tuple[tuple[str, object, bool], ...]:
    """`(group, aligned var, new)` from which `var` is computed by any ops (one that mixes the group's
    neurons included: `standardize(V − V_th)` across a population), all aligned with ONE group's new or
    previous values; empty when the input also reads other hidden values, or reads them some other way."""
    by_leaf = _group_of_leaf(groups)
    producer = producers(facts.captured.jaxpr.jaxpr)
    links, frontier, seen = [], [var], set()
    while frontier:
        current = frontier.pop(0)
        if any(current is v for v in seen):
            continue
        seen.add(current)
        fact = facts.propagation.of(current)
        if not any(k in ("new", "hidden") for k, _ in fact):
            continue  # inputs and constants carry no credit
        found = _aligned_group(fact, aval_shape(current), by_leaf)
        if found is not None:
            if not any(current is v for _, v, _ in links):
                links.append((found[0], current, found[1]))
            continue
        eqn = producer.get(current)
        if eqn is None:
            return ()
        frontier.extend(a for a in eqn.invars if not isinstance(a, Literal))
    links = [
        link for link in links if not _computed_from(link[1], [v for _, v, _ in links if v is not link[1]], producer)
    ]
    return tuple(links) if len({(name, new) for name, _, new in links}) == 1 else ()


def _computed_from(var, others, producer) -> bool:
    """Whether `var` is computed from one of the vars `others` (an aligned value derived from another
    aligned value: `square(x)` beside `x`; the link is then `x`)."""
    frontier, seen = [var], []
    while frontier:
        current = frontier.pop()
        if any(current is v for v in seen):
            continue
        seen.append(current)
        if current is not var and any(current is v for v in others):
            return True
        eqn = producer.get(current)
        if eqn is not None:
            frontier.extend(a for a in eqn.invars if not isinstance(a, Literal))
    return False


def _instantaneous(common: dict) -> Relation:
    return Relation(
        group=None,
        status="instantaneous",
        reason="reaches the step output with no hidden state in between: exact same-step gradient",
        **common,
    )


def find_relations(facts: StepFacts, groups: tuple[Group, ...]) -> tuple[Relation, ...]:
    leaves = facts.captured.leaves
    relations: list[Relation] = []
    for leaf_index, leaf in enumerate(leaves):
        if leaf.role != "weight":
            continue
        found = [c for c in facts.contractions if c.weight_leaf == leaf_index]
        for contraction in found:
            relations.extend(_classify(facts, groups, leaf_index, contraction))
        secondary = any(leaf_index in c.weight_leaves for c in facts.contractions)  # in another's transform
        if not found and not secondary:
            relations.append(_without_contraction(facts, groups, leaf_index))
        else:
            relations.extend(_beside_contractions(facts, groups, leaf_index))
    return _with_same_injections(facts, [_mark_small_lti(groups, r) for r in relations])


def _mark_small_lti(groups, relation: Relation) -> Relation:
    """`relation` with `small_lti` set when it is a traced weight op into a linear time-invariant group of at
    most `SMALL_LTI` neuron states per batch entry."""
    if relation.status != "traced" or relation.contraction is None:
        return relation
    group = next(g for g in groups if g.name == relation.group)
    return dataclasses.replace(relation, small_lti=group.lti and group.n_neurons * group.n_states <= SMALL_LTI)


_SUMS = ("add", "add_any")


def _first(relation: Relation, index: int) -> int:
    return index if relation.same_injection is None else relation.same_injection


def _with_same_injections(facts: StepFacts, relations: list[Relation]) -> tuple[Relation, ...]:
    """Mark traced relations whose op outputs reach their group only through one sum: from each op output,
    follow the chain of same-shape `add`s while the value has no other use; two chains that meet make the
    outputs enter through the same value, so `∂h/∂y` (the F of DESIGN.md §2) is the same array for both —
    es_d_rtrl then keeps one postsynaptic factor for them. Each relation points at the first such one."""
    uses = uses_of(facts.captured.jaxpr.jaxpr)

    def chain(var) -> set:
        seen = {var}
        while len(consumers := uses.get(var, [])) == 1 and consumers[0] is not None:
            eqn = consumers[0]
            out = eqn.outvars[0]
            if (
                eqn.primitive.name not in _SUMS
                or aval_shape(out) != aval_shape(var)
                or out.aval.dtype != var.aval.dtype
            ):
                break
            var = out
            seen.add(var)
        return seen

    chains: dict[int, set] = {}
    result = list(relations)
    for index, relation in enumerate(relations):
        if relation.status != "traced" or relation.contraction is None:
            continue
        mine = chains[index] = chain(facts.contractions[relation.contraction].out_var)
        for earlier, theirs in chains.items():
            other = result[earlier]
            same_place = (other.group, other.op_shape, other.tail_perm) == (
                relation.group,
                relation.op_shape,
                relation.tail_perm,
            )
            if earlier != index and same_place and mine & theirs:
                result[index] = dataclasses.replace(relation, same_injection=_first(result[earlier], earlier))
                break
    return tuple(result)


_VIEWS = ("reshape", "broadcast_in_dim", "squeeze", "convert_element_type")


def _view(facts: StepFacts, contraction, leaf_index: int) -> str:
    """`[a:b, ...]`, the leaf's elements that the op's weight operand holds, when the operand is one
    slice of the leaf up to reshapes and broadcasts; "" otherwise."""
    jaxpr = facts.captured.jaxpr.jaxpr
    leaf_var = jaxpr.invars[facts.captured.n_inputs + leaf_index]
    producer = producers(jaxpr)
    shape = tuple(facts.captured.leaves[leaf_index].shape)
    var, found = contraction.weight_var, None
    while var is not leaf_var:
        eqn = None if isinstance(var, Literal) else producer.get(var)
        if eqn is None or (eqn.primitive.name != "slice" and eqn.primitive.name not in _VIEWS):
            return ""
        if eqn.primitive.name == "slice":
            if found is not None:
                return ""
            found = eqn.params["start_indices"][-len(shape) :], eqn.params["limit_indices"][-len(shape) :]
        var = eqn.invars[0]
    if found is None or not shape:
        return ""
    parts = [":" if (a, b) == (0, n) else f"{a}:{b}" for a, b, n in zip(*found, shape, strict=True)]
    return "[" + ", ".join(parts) + "]"


def _positions(contraction, batch: int | None) -> int:
    """Output positions per batch entry of a convolution (each kernel element is used at each); 1 else."""
    eqn = contraction.eqn
    if eqn.primitive.name != "conv_general_dilated":
        return 1
    shape = contraction.out_var.aval.shape
    features = shape[eqn.params["dimension_numbers"].out_spec[1]]
    return int(np.prod(shape, dtype=int)) // features // (batch or 1)


def _classify(facts: StepFacts, groups, leaf_index: int, contraction) -> list[Relation]:
    """The relations of one contraction: one per group its output reaches element-wise (an op output
    shared by several groups — a `Linear` applied once to feed two populations — splits its credit per
    receiving group), or one instantaneous or excluded relation."""
    leaf = facts.captured.leaves[leaf_index]
    op = contraction.eqn.primitive.name
    reached, direct = _reaches(facts, ("relation", contraction.index), groups)
    pre_var = contraction.pre_var
    batch = facts.captured.batch_size
    pre_shape = tuple(pre_var.aval.shape)
    size = int(np.prod(pre_shape, dtype=int))
    n_pre = size // batch if batch is not None and batch in pre_shape else size  # per batch entry
    common = {
        "weight": leaf.path,
        "weight_leaf": leaf_index,
        "op": op,
        "contraction": contraction.index,
        "n_pre": n_pre,
        "pre_carried": (carried := carried_reads(facts, pre_var) if contraction.pre_fact else ()),
        "pre_links": (links := () if carried else pre_links(facts, groups, pre_var)),
        "pre_mixing": () if links or carried else mixing_links(facts, groups, pre_var),
        "pre_new": tuple(dict.fromkeys(name for name, _, new in links if new)),
        "pre_recurrent": _groups_in(contraction.pre_fact, "hidden", groups),
        "shared": int(np.prod(leaf.shape, dtype=int)) == 1,
        "op_shape": tuple(contraction.out_var.aval.shape),
        "positions": _positions(contraction, batch),
        "weight_leaves": contraction.weight_leaves,
        "transformed": contraction.transformed,
        "weight_shape": tuple(aval_shape(contraction.weight_var)) if contraction.transformed else tuple(leaf.shape),
        "per_neuron": n_pre == 1 and not contraction.pre_fact,
        "view": _view(facts, contraction, leaf_index) if contraction.transformed else "",
    }
    if contraction.transformed:
        common["shared"] = int(np.prod(common["weight_shape"], dtype=int)) == 1
    downstream = _feeds(facts, ("relation", contraction.index))
    crossed = _crossed(facts, groups, ("relation", contraction.index), reached) if downstream else None
    if crossed is not None:
        name, tail, crossings = crossed
        return [Relation(group=name, status="traced", tail_perm=tail.perm, crossings=crossings, **common)]
    if downstream:
        return [
            Relation(
                group=next(iter(reached)) if len(reached) == 1 else None,
                status="excluded",
                reason=_through_weights(downstream),
                **common,
            )
        ]
    if not reached:
        if direct:
            return [_instantaneous(common)]
        return [
            Relation(
                group=None,
                status="excluded",
                reason=f"the output of `{op}` reaches neither a hidden state nor the step output",
                **common,
            )
        ]
    return [_into_group(op, name, tail, common) for name, tail in reached.items()]


def _diagonal_product(contraction) -> bool:
    """`pre @ W` with `W` square and `pre`'s last axis contracted: element `i` of the output reads element
    `i` of `pre` through `W[i, i]`."""
    eqn = contraction.eqn
    weight = aval_shape(contraction.weight_var)
    rank = len(aval_shape(contraction.pre_var))
    numbers = eqn.params.get("dimension_numbers")
    return (
        eqn.primitive.name == "dot_general"
        and (contraction.pre_operand, contraction.weight_operand) == (0, 1)
        and len(weight) == 2
        and weight[0] == weight[1]
        and numbers == (((rank - 1,), (0,)), ((), ()))
    )


def _crossed(facts: StepFacts, groups, source, reached: dict) -> tuple[str, Dep, tuple[int, ...]] | None:
    """`(group, tail, crossings)` when `source` (a relation's op output, or a per-neuron parameter)
    reaches one group element-wise except through square products whose input is aligned with it and
    whose output reaches that group element-wise (the gate `r` of a GRU, read as `(r * h) @ W_h[N_in:]`);
    None otherwise."""
    crossings, names = [], set(reached)
    for contraction in facts.contractions:
        dep = contraction.pre_fact.get(source)
        if dep is None:
            continue
        if not (dep.aligned and _diagonal_product(contraction)) or _feeds(facts, ("relation", contraction.index)):
            return None
        into, _ = _reaches(facts, ("relation", contraction.index), groups)
        if len(into) != 1 or not all(d is not None and d.aligned for d in into.values()):
            return None
        names.update(into)
        crossings.append(contraction.index)
    if len(names) != 1 or any(d is None or not d.aligned for d in reached.values()):
        return None
    return names.pop(), Dep(True, False), tuple(crossings)


def _into_group(op: str, name: str, tail, common: dict) -> Relation:
    if tail is None:
        return Relation(
            group=name,
            status="excluded",
            reason=f"the path from `{op}` to group `{name}` is not element-wise per neuron (a non-element-wise tail)",
            **common,
        )
    return Relation(group=name, status="traced", tail_perm=tail.perm, **common)


def _beside_contractions(facts: StepFacts, groups, leaf_index: int) -> list[Relation]:
    """A weight used by contracting ops that ALSO reaches hidden values another way (element-wise, or
    through another weight's input): one excluded relation for those other paths (same-step gradient)."""
    reached, _ = _reaches(facts, ("weight", leaf_index), groups)
    downstream = _feeds(facts, ("weight", leaf_index))
    if not reached and not downstream:
        return []
    places = [f"hidden group(s) {', '.join(reached)}"] if reached else []
    places += [f"the input of the op of {', '.join(f'`{n}`' for n in downstream)}"] if downstream else []
    return [
        Relation(
            weight=facts.captured.leaves[leaf_index].path,
            weight_leaf=leaf_index,
            group=next(iter(reached)) if len(reached) == 1 else None,
            op="elementwise",
            status="excluded",
            reason=f"besides its contracting op(s) it also reaches {' and '.join(places)} directly; that "
            "path gets no trace",
        )
    ]


def _without_contraction(facts: StepFacts, groups, leaf_index: int) -> Relation:
    leaf = facts.captured.leaves[leaf_index]
    reached, direct = _reaches(facts, ("weight", leaf_index), groups)
    downstream = _feeds(facts, ("weight", leaf_index))
    used = reached or direct or downstream
    common = {"weight": leaf.path, "weight_leaf": leaf_index, "op": "elementwise" if used else "none"}
    if downstream and len(reached) == 1 and _read_with_its_group(facts, groups, leaf_index, next(iter(reached))):
        downstream = ()  # e.g. a threshold read by the spikes a readout takes: the credit chains carry it
    crossed = _crossed(facts, groups, ("weight", leaf_index), reached) if downstream else None
    if crossed is not None:  # a gate's bias, its gate read by the cell's other weight
        name, dep, crossings = crossed
        group = next(g for g in groups if g.name == name)
        size = int(np.prod(leaf.shape, dtype=int))
        if size == 1 or size == group.n_neurons:
            return Relation(group=name, status="traced", shared=size == 1, crossings=crossings, **common)
    if downstream:
        return Relation(
            group=next(iter(reached)) if len(reached) == 1 else None,
            status="excluded",
            reason=_through_weights(downstream),
            **common,
        )
    if reached:
        names = ", ".join(reached)
        if len(reached) == 1:
            ((name, dep),) = reached.items()
            group = next(g for g in groups if g.name == name)
            size = int(np.prod(leaf.shape, dtype=int))
            per_neuron = size == 1 or (dep is not None and dep.perm is None and size == group.n_neurons)
            if per_neuron and (dep is not None or size == 1):
                return Relation(group=name, status="traced", shared=size == 1, **common)
        return Relation(
            group=next(iter(reached)) if len(reached) == 1 else None,
            status="excluded",
            reason=f"reaches hidden group(s) {names} without a weight contraction, and not as one "
            "parameter per neuron of one group (e.g. several groups, or a weight transformed by another "
            "weight)",
            **common,
        )
    if direct:
        return _instantaneous(common)
    return Relation(
        group=None,
        status="excluded",
        reason="not used by the step (no path to a hidden state or to the output)",
        **common,
    )
