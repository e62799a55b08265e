"""Credit chains: which downstream paths carry a weight's credit to the loss, and how exactly.

Consumes: an `Analysis`, the algorithm, the traced relations, the step's values at compile time and
the depth limit. Produces the chain `Node`s (parents before children) and, per traced relation, the
notes that say which of its credit paths are approximate or dropped.

A weight into group `A` reaches the loss through the groups downstream of `A`: a path
`A -> G_1 -> ... -> G_m` follows weight ops (`via_j`, traced relations into `G_j`) whose presynaptic
inputs read the previous group's new or previous values (`link_j`). With `M^j` the sensitivity of
`G_j`'s states to the weight, `M^j_t = D^j M^j_{t-1} + F^j (∂y_j/∂u)(P^{j-1} M^{j-1})`. Since the weight
only moves `A`'s neurons, `M^j` factors into the op weights (constant in time) and a trace indexed like
`A`'s own — one `q` per carried state of `G_j`, per class of units sharing `G_j`'s dynamics:

    q^j ← D̄^j_c q^j + F̄^j_c · In^j,    In^1 = P^A·ε (A's link sensitivity, exact at injection),
                                        In^j = q^{j-1}[s]   (s: the state of G_{j-1} that link_j reads)

and its gradient term is `Σ_s pull(δ^{G_m}[s]) · q^m[s]`, where `pull` carries the learning signal back
through `via_m, ..., via_1` (their op VJPs), masking each stage to its class and multiplying by the link
sensitivity `P^{j-1}` of each intermediate stage at the current step.

Exact (equal to BPTT's sensitivity) when every stage group is linear time-invariant (`Group.lti`), lies
on no loop, its units fall into few classes of identical `(D, F)` (`MAX_CLASSES`), and each intermediate
link reads its group affinely (then `P` is constant and reading it at the current step changes nothing).
Otherwise approximate, and said so: a nonlinear stage filters the trace with its `D` and `F` averaged
over its neurons, each weighted by the surrogate derivative of its spikes at this step (the neurons that
can pass credit on: an unweighted mean, or the subthreshold decay alone, overestimated the first layer's
gradient of a two-layer LIF stack 1.4- and 1.9-fold, the weighted one by 4%), and its time-varying
factors (the surrogate derivatives in `P` and in `δ`) are read at the current step — a mean-field split
like es_d_rtrl's factorisation. A group-to-group edge that cannot carry a chain (its weight op is
excluded, or its input is not a linear view of the group's values) and paths longer than the depth limit
are dropped, with a note.

A group that reads its own previous values through weights (a recurrent layer, the E population of an
E/I loop) is a loop the chain cannot follow to the end, but it can unroll it: after a node whose stage is
that group comes a node for one more round through the group's own recurrent weights (the same group,
entered through the recurrent op), up to `hops` rounds (compile option `loop_hops`), each a stage toward
the depth limit. The gradient is then the one with the loop truncated after that many rounds (exact for
that truncation through a linear group; on a small sparse E/I network one round took the E -> I weights'
cosine at one seed from 0.73 to 0.94). The owner's own group is unrolled the same way, but only on request
(`own_hops`, compile option `own_loop_hops`, default 0): its per-neuron trace is the algorithm's own
definition, and each round costs one more trace of the owner's size. Not unrolled: a node kept per unit,
and loops through two or more groups.

A last stage (no credit goes on from it) that would not be exact and has at most `RESOLVED_MAX_UNITS`
units — a readout, a spiking output population, a second layer read by a `Linear` — is *resolved*: its
node keeps one trace per unit `o` (a trailing axis), `q_o ← D_o q_o + F_o · (C_o ⊙ In)`, with the unit's
own `D_o`, `F_o` and `C_o` the unit's op output pulled back through the whole path at this step. The
surrogate derivatives on the way are then taken at the step the credit passes, not when it is read (on a
two-layer stack whose later layers barely fire, reading them at the current step gave the first layers
cosine 0.64 and 0.83; resolved, 0.96 and 0.997). A resolved node is exact when its parent is (or it is
a first stage) and its group lies on no loop, nonlinear or not: per unit, nothing is averaged.
"""

import dataclasses

import numpy as np

from fusetrace.analysis import Analysis

from . import derive, factorised
from .structure import group_edges, looping_groups, prev_read_states, read_states, relation_sources, state_structure

DEFAULT_LOOP_HOPS = 1  # rounds a chain follows a downstream group's own recurrent weights
DEFAULT_OWN_LOOP_HOPS = 0  # rounds it follows the weight's own group's recurrent weights
MAX_CLASSES = 16  # distinct (D, F) per LTI stage kept exactly; beyond, one averaged class (approximate)
RESOLVED_MAX_UNITS = 16  # a last stage of at most this many units gets one trace per unit (`Node.resolved`)
PERTURBATION = 0.37  # relative change of every weight for the second look at an LTI stage's classes


@dataclasses.dataclass(frozen=True, eq=False)
class UnitClasses:
    """The units of a stage group, split by identical linear dynamics `(D, F)`.

    masks: one 0/1 array per class over the group's unit axes (the batch axis excluded).
    representatives: a flat unit index per class, whose `(D, F)` stand for the class (exact classes).
    exact: every unit of a class has the class's dynamics, at any weights.
    """

    masks: tuple[np.ndarray, ...]
    representatives: tuple[int, ...]
    exact: bool

    def __post_init__(self):
        if len(self.masks) != len(self.representatives) or not self.masks:
            raise ValueError("one representative per class, and at least one class")


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    """One downstream group of a chain: `via` (a relation into `group`) reads the previous group's new
    (`link_new`) or previous values through `link`; `link_affine`: its sensitivity to them is constant."""

    via: int
    group: str
    link: object = dataclasses.field(repr=False)
    link_new: bool
    link_affine: bool
    classes: UnitClasses = dataclasses.field(repr=False)
    contraction: int = -1  # the via's contraction index
    mixing: bool = False  # the via's input is computed from `link` by ops that mix the neurons

    @property
    def source(self) -> tuple[str, int]:
        """The source the via injects into the stage group."""
        return ("relation", self.contraction)


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """The credit trace of one chain prefix: `owner`'s trace carried through `stages`, one class of units
    per stage (`unit_class`), and per stage after the first the state of the previous group its link
    reads (`read_state`). `states`: the carried states of the last stage's group; `read` / `read_prev`:
    those whose new / previous values the loss reads (they give gradient terms)."""

    key: str
    owner: int
    stages: tuple[Stage, ...]
    unit_class: tuple[int, ...]
    read_state: tuple[int | None, ...]
    parent: str | None
    states: tuple[int, ...]
    read: tuple[int, ...]
    read_prev: tuple[int, ...]
    exact: bool
    resolved: bool = False  # one trace per unit of the last stage (a trailing axis), entered at the step

    def __post_init__(self):
        if not (len(self.stages) == len(self.unit_class) == len(self.read_state)) or not self.stages:
            raise ValueError("a node has one class and one read state per stage, and at least one stage")
        if not set(self.read) | set(self.read_prev) <= set(self.states):
            raise ValueError("a node reads only states it carries")

    @property
    def stage(self) -> Stage:
        return self.stages[-1]


def trace_owners(analysis: Analysis, algorithm: str, traced) -> list[int]:
    """The traced relations whose trace a chain starts from (a shared es_d_rtrl postsynaptic factor once)."""
    relations = analysis.relations
    return [
        k
        for k in traced
        if not factorised.factorised(algorithm, relations[k]) or factorised.post_owner(algorithm, relations, k) == k
    ]


def plan_chains(
    analysis: Analysis,
    algorithm: str,
    traced,
    values,
    depth: int,
    hops: int = DEFAULT_LOOP_HOPS,
    own_hops: int = DEFAULT_OWN_LOOP_HOPS,
) -> tuple[tuple[Node, ...], dict]:
    """`(nodes, notes)`: every needed chain node (parents first) and, per owner relation index, the notes
    on its approximate or dropped credit paths."""
    planner = _Planner(analysis, values, depth, hops, own_hops)
    nodes, notes = [], {}
    for owner in trace_owners(analysis, algorithm, traced):
        group = analysis.relations[owner].group
        found, reasons = planner.grow(owner, None, (), (), (), (group,))
        nodes += found
        if reasons:
            notes[owner] = _describe(reasons, planner.depth)
    return tuple(nodes), notes


def _describe(reasons: list[tuple], depth: int) -> tuple[str, ...]:
    """The notes of one owner: its nonlinear stage groups in one sentence, then each other reason once."""
    reasons = list(dict.fromkeys(reasons))
    rounds: dict[tuple, int] = {}  # (group, weight, option) -> the most rounds followed
    for kind, *args in reasons:
        if kind == "hops":
            rounds[(args[0], args[1], args[3])] = max(rounds.get((args[0], args[1], args[3]), 0), args[2])
    reasons = [r for r in reasons if r[0] != "hops"] + [("hops", g, w, n, o) for (g, w, o), n in rounds.items()]
    nonlinear = [r[1] for r in reasons if r[0] == "nonlinear"]
    resolved = [r[1] for r in reasons if r[0] == "resolved"]
    notes = []
    if nonlinear:
        names = " and ".join(f"`{g}`" for g in nonlinear)
        its = "their" if len(nonlinear) > 1 else "its"
        notes.append(
            f"credit through {names} (nonlinear) is approximate: the trace is filtered by {its} dynamics averaged "
            f"over {its} neurons (weighted by the surrogate derivatives of {its} spikes), and the surrogate "
            "derivatives on the way to the loss are read at the current step"
            + (" (into a group kept per unit: at the step the credit enters it)" if resolved else "")
        )
    for kind, *args in reasons:
        if kind == "loop":
            notes.append(f"credit through `{args[0]}` is approximate: it lies on a loop through weights")
        elif kind == "crowded":
            notes.append(
                f"credit through `{args[0]}` is approximate: its units have more than {MAX_CLASSES} distinct "
                "dynamics (their mean is used)"
            )
        elif kind == "link":
            notes.append(
                f"credit from `{args[0]}` into `{args[1]}`'s input is approximate: it is read through a nonlinear "
                "function whose derivative is taken at the current step"
            )
        elif kind == "mixing":
            into = f"`{args[1]}`'s input" if args[0] is None else f"`{args[1]}`'s input from `{args[0]}`"
            notes.append(
                f"credit into {into} is approximate: that input mixes the neurons it reads (a normalisation "
                "across them), and the mixing's derivative is taken at the current step"
            )
        elif kind == "resolved":
            notes.append(
                f"credit into `{args[0]}` is kept per unit (a trace for each of its {args[1]} units): its own "
                "dynamics are exact, and the derivatives on the way into it are taken at the step the credit enters it"
            )
        elif kind == "hops":
            group, weight, hops, option = args
            times = "once" if hops == 1 else f"{hops} times"
            kept = f"followed {times} around the loop and further rounds are dropped" if hops else "dropped"
            notes.append(
                f"credit around `{group}`'s own recurrent weights (`{weight}`) is {kept} (compile option {option})"
            )
        elif kind == "dropped":
            notes.append(f"credit through `{args[0]}` into `{args[1]}` is dropped: {args[2]}")
        elif kind == "depth":
            notes.append(
                f"credit paths longer than {depth} groups (on to `{args[0]}`) are dropped (compile option credit_depth)"
            )
    return tuple(notes)


class _Planner:
    """The static facts every chain reads (edges, loss reads, classes), computed once per compile."""

    def __init__(self, analysis: Analysis, values, depth: int, hops: int, own_hops: int):
        self.analysis, self.values, self.depth = analysis, values, depth
        self.hops, self.own_hops = hops, own_hops
        self.looping = looping_groups(analysis)
        self.edges = group_edges(analysis)
        self.feeds_loss = _feeds_loss(analysis, self.edges)
        self.classes: dict[tuple[str, int], UnitClasses] = {}

    def grow(self, owner, parent: Node | None, stages, unit_class, read_state, visited) -> tuple[list[Node], list]:
        """The needed nodes below `parent` (whose path is `stages`, through the groups `visited`)."""
        analysis = self.analysis
        current = visited[-1]
        nodes, reasons = [], []
        for source, target, via in self.edges:
            if source != current or target not in self.feeds_loss:
                continue
            if target in visited:  # a loop: its credit is not a finite chain, but a self-loop can be unrolled
                if not self._round_loop(target, parent, visited):
                    continue
                own = visited[0] == target  # (a path never comes back to a group it left)
                hops, option = (self.own_hops, "own_loop_hops") if own else (self.hops, "loop_hops")
                done = _rounds(visited)  # (the note gives the most rounds any path took)
                if hops or not own:  # (none of its own loop is the algorithm's own trace: no note)
                    reasons.append(("hops", target, analysis.relations[via].weight, min(done + 1, hops), option))
                if done >= hops:
                    continue
            if len(stages) >= self.depth:
                reasons.append(("depth", target))
                continue
            stage, why = self._stage(via, current)
            if stage is None:
                reasons.append(("dropped", analysis.relations[via].weight, target, why))
                continue
            resolved = self._resolvable(stage, parent, (*visited, target))
            if resolved:
                stage = dataclasses.replace(stage, classes=_one_class(analysis, analysis.group_named(stage.group)))
            for choice in self._read_choices(parent, stage):
                for c in range(len(stage.classes.masks)):
                    more = ((*stages, stage), (*unit_class, c), (*read_state, choice))
                    found, deeper = self._node(owner, parent, *more, (*visited, target), resolved)
                    nodes += found
                    reasons += deeper
        return nodes, reasons

    @staticmethod
    def _round_loop(target: str, parent: Node | None, visited) -> bool:
        """Whether an edge into a visited group is the current group's own recurrence, which a chain may
        follow round by round (`hops`, or `own_hops` for the owner's group): not out of a node kept per
        unit (its units' own loop is not followed)."""
        return (parent is None or not parent.resolved) and target == visited[-1]

    def _resolvable(self, stage: Stage, parent: Node | None, visited) -> bool:
        """Whether a stage gets one trace per unit (`Node.resolved`): it would not be exact with a trace
        per class, it has at most `RESOLVED_MAX_UNITS` units, and it is a last stage (no credit goes on
        from it to another group that reaches the loss)."""
        if (parent is None or parent.exact) and self._exact_stage(stage, first=parent is None):
            return False
        group = self.analysis.group_named(stage.group)
        if group_units(self.analysis, group) > RESOLVED_MAX_UNITS:
            return False
        onward = (t for s, t, _ in self.edges if s == stage.group and t in self.feeds_loss and t not in visited)
        return next(onward, None) is None

    def _node(self, owner, parent, stages, unit_class, read_state, visited, resolved=False) -> tuple[list[Node], list]:
        analysis = self.analysis
        stage = stages[-1]
        group = analysis.group_named(stage.group)
        states = _carried(analysis, group, analysis.relations[stage.via])
        if resolved:  # per unit: its own dynamics (linear or not), its link's derivative and classes are exact
            exact = (parent is None or parent.exact) and stage.group not in self.looping
        else:
            exact = (parent is None or parent.exact) and self._exact_stage(stage, first=parent is None)
        node = Node(
            key=f"q{owner}_"
            + "_".join(f"{s.via}c{c}s{r}" for s, c, r in zip(stages, unit_class, read_state, strict=True))
            + ("_units" if resolved else ""),
            owner=owner,
            stages=stages,
            unit_class=unit_class,
            read_state=read_state,
            parent=None if parent is None else parent.key,
            states=states,
            read=tuple(s for s in read_states(analysis, group) if s in states),
            read_prev=tuple(s for s in prev_read_states(analysis, group) if s in states),
            exact=exact,
            resolved=resolved,
        )
        children, reasons = self.grow(owner, node, stages, unit_class, read_state, visited)
        if not children and not node.read and not node.read_prev:
            return [], reasons
        if resolved:
            loop = [("loop", stage.group)] if stage.group in self.looping else []
            return [node], reasons + loop + ([] if exact else [("resolved", stage.group, group_units(analysis, group))])
        previous = None if parent is None else parent.stage
        return [node, *children], reasons + self._approximations(stage, previous)

    def _stage(self, via: int, source: str) -> tuple[Stage | None, str]:
        analysis = self.analysis
        relation = analysis.relations[via]
        if relation.status != "traced" or relation.contraction is None:
            return None, f"that op is not a traced weight relation ({relation.reason or relation.status})"
        if relation.pre_carried:
            held = ", ".join(f"`{name}`" for name in relation.pre_carried)
            return None, f"its input reads `{source}`'s values of earlier steps from {held}, which no trace follows"
        links = [(var, new) for group, var, new in relation.pre_links if group == source]
        mixing = not links
        if mixing:  # the input mixes the group's neurons (a normalisation across them)
            links = [(var, new) for group, var, new in relation.pre_mixing if group == source]
        if len(links) != 1:
            return None, f"its input is not one view of `{source}`'s new or previous values"
        ((link, new),) = links
        group = analysis.group_named(source)
        kind = "new" if new else "hidden"
        deps = [dep for (k, i), dep in analysis.facts.propagation.of(link).items() if k == kind and i in group.leaves]
        key = (relation.group, via)
        if key not in self.classes:
            self.classes[key] = unit_classes(analysis, analysis.group_named(relation.group), relation, self.values)
        affine = all(d.affine for d in deps)
        stage = Stage(via, relation.group, link, new, affine, self.classes[key], relation.contraction, mixing)
        return stage, ""

    def _read_choices(self, parent: Node | None, stage: Stage) -> list[int | None]:
        """The previous group's states the link reads (one child node each); None for a first stage (A's
        link sensitivity is applied where the trace enters the chain)."""
        if parent is None:
            return [None]
        group = self.analysis.group_named(parent.stage.group)
        kind = "new" if stage.link_new else "hidden"
        fact = self.analysis.facts.propagation.of(stage.link)
        return [s for s in parent.states if (kind, group.leaves[s]) in fact]

    def _exact_stage(self, stage: Stage, first: bool) -> bool:
        group = self.analysis.group_named(stage.group)
        linked = (first or stage.link_affine) and not stage.mixing
        return group.lti and stage.group not in self.looping and stage.classes.exact and linked

    def _approximations(self, stage: Stage, previous: Stage | None) -> list[tuple]:
        """Why a kept stage is not exact (none: it is)."""
        group = self.analysis.group_named(stage.group)
        if not group.lti:
            return [("nonlinear", stage.group)]
        reasons: list[tuple] = []
        if stage.group in self.looping:
            reasons.append(("loop", stage.group))
        if not stage.classes.exact:
            reasons.append(("crowded", stage.group))
        if previous is not None and not stage.link_affine and self.analysis.group_named(previous.group).lti:
            reasons.append(("link", previous.group, stage.group))  # (after a nonlinear group, its note covers it)
        if stage.mixing:
            source = previous.group if previous is not None else None
            reasons.append(("mixing", source, stage.group))
        return reasons


def _rounds(visited) -> int:
    """How many times the path has gone round its last group's own recurrence (repeats at its end)."""
    last = visited[-1]
    return next((k for k, group in enumerate(reversed(visited[:-1])) if group != last), len(visited) - 1)


def _feeds_loss(analysis: Analysis, edges) -> set[str]:
    """The groups whose values reach the loss: read by the outputs, or upstream of such a group."""
    reached = {g.name for g in analysis.groups if read_states(analysis, g) or prev_read_states(analysis, g)}
    changed = True
    while changed:
        changed = False
        for source, target, _ in edges:
            if target in reached and source not in reached:
                reached.add(source)
                changed = True
    return reached


def _carried(analysis: Analysis, group, via) -> tuple[int, ...]:
    """The states of `group` that the via's op output reaches through the group's own dynamics."""
    reads, injected, _ = state_structure(analysis, group, *relation_sources(via))  # a via has a contraction
    carried = set(injected)
    changed = True
    while changed:
        changed = False
        for s, read in reads.items():
            if s not in carried and carried.intersection(read):
                carried.add(s)
                changed = True
    return tuple(sorted(carried))


def unit_classes(analysis: Analysis, group, via, values) -> UnitClasses:
    """The units of `group` split by identical linear dynamics `(D, F)` of the via's input, seen at the
    compile-time weights and at perturbed ones (so units equal only by the initial values of a trained
    time constant are kept apart). A nonlinear group is one class (its mean stands for it)."""
    unit_shape = _unit_shape(analysis, group)
    everything = (np.ones(unit_shape, bool),), (0,)
    if not group.lti:
        return UnitClasses(*everything, exact=False)
    signatures = [_signatures(analysis, group, via, look) for look in (values, _perturbed(analysis, values))]
    table = np.concatenate(signatures, axis=1)  # (units, ...)
    first: dict[bytes, int] = {}
    labels = np.array([first.setdefault(row.tobytes(), unit) for unit, row in enumerate(table)])
    representatives = tuple(dict.fromkeys(labels.tolist()))
    if len(representatives) > MAX_CLASSES:
        return UnitClasses(*everything, exact=False)
    masks = tuple((labels == r).reshape(unit_shape) for r in representatives)
    return UnitClasses(masks, representatives, exact=True)


def group_units(analysis: Analysis, group) -> int:
    """The number of units of `group` (its neurons, the batch axis excluded)."""
    return int(np.prod(_unit_shape(analysis, group), dtype=int))


def _one_class(analysis: Analysis, group) -> UnitClasses:
    """Every unit of `group` in one class (a resolved stage keeps its units apart in the trace instead)."""
    return UnitClasses((np.ones(_unit_shape(analysis, group), bool),), (0,), exact=False)


def _unit_shape(analysis: Analysis, group) -> tuple[int, ...]:
    return tuple(group.shape[1:]) if analysis.batch_size is not None else tuple(group.shape)


def _signatures(analysis: Analysis, group, via, values) -> np.ndarray:
    """Per unit, its `D` and `F` over the batch entries: `(units, B·(S·S + S))`."""
    d, (f,) = derive.transition_derivatives(analysis, group, [via], values)
    n_units = group_units(analysis, group)
    rows = []
    for part in (np.asarray(d), np.asarray(f)):
        batch = part.shape[0] if analysis.batch_size is not None else 1
        part = part.reshape((batch, n_units, -1))
        rows.append(np.transpose(part, (1, 0, 2)).reshape((n_units, -1)))
    return np.concatenate(rows, axis=1)


def _perturbed(analysis: Analysis, values):
    """The step's values with every weight leaf changed by up to `PERTURBATION` of itself."""
    rng = np.random.default_rng(0)
    leaves = list(values.leaves)
    for index, leaf in enumerate(analysis.captured.leaves):
        if leaf.role == "weight":
            value = np.asarray(leaves[index])
            noise = rng.uniform(-PERTURBATION, PERTURBATION, value.shape)
            leaves[index] = (value * (1 + noise) + noise * 1e-3).astype(value.dtype)
    return derive.forward(analysis, values.inputs, leaves)
