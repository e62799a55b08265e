"""What the chosen algorithm does with each weight: trace shape and bytes, exact or approximate, and why.

Consumes: an `Analysis` and a `Plan`. Produces one `WeightReport` per weight leaf (in leaf order), shown
by `Learner.summary()` and `Learner.explain(path)`.

Exactness (float64 algebra, one-step windows), per relation:
* instantaneous: exact (the same-step gradient is the whole gradient);
* traced under d_rtrl / e_prop (or an element-wise parameter under any algorithm): exact when the
  receiving group lies on no loop of the group graph (an edge A -> B for every weight op into B whose
  presynaptic input reads A's values) and no credit path of it is dropped (a plan note); otherwise
  approximate — the per-neuron traces drop the cross-neuron terms of the loop;
* traced under es_d_rtrl: approximate (the trace is factorised into presynaptic and postsynaptic factors),
  except into a small linear time-invariant group (a readout, `Relation.small_lti`) or a per-neuron
  relation, which keep d_rtrl's per-weight trace and are exact as under d_rtrl;
* same-step only, or dropped: approximate, with the plan's note.
"""

import dataclasses

import numpy as np

from . import factorised
from .fuse import Plan, chain_trace_shape
from .layout import layout_kind, trace_shape
from .relations import SMALL_LTI
from .structure import looping_groups


@dataclasses.dataclass(frozen=True)
class WeightReport:
    path: str
    treatment: str  # "trace", "same-step", "instantaneous", "unused"
    trace_shapes: tuple[tuple[int, ...], ...]
    trace_bytes: int
    exact: bool
    why: str
    name: str = ""  # the user's name of the weight (`fusetrace.naming`); `Learner.report()` fills it in

    def line(self) -> str:
        counted: dict[tuple[int, ...], int] = {}
        for shape in self.trace_shapes:
            counted[shape] = counted.get(shape, 0) + 1
        shapes = (
            " + ".join(f"{n} x ({'x'.join(map(str, shape)) or 'scalar'})" for shape, n in counted.items()) or "none"
        )
        verdict, name = "exact" if self.exact else "approximate", self.name or self.path
        return f"{name}: {self.treatment}; trace {shapes} ({self.trace_bytes} bytes); {verdict}: {self.why}"


def _traces(analysis, plan: Plan, index: int) -> tuple[tuple[int, ...], ...]:
    relation = analysis.relations[index]
    group = analysis.group_named(relation.group)
    chained = tuple(chain_trace_shape(analysis, plan, n)[0] for n in plan.chains if n.owner == index for _ in n.states)
    if factorised.factorised(plan.algorithm, relation):
        return (*factorised.trace_shapes(analysis, plan, index), *chained)
    kind = layout_kind(analysis, relation)
    assert kind is not None, "the plan traces only relations with a layout"
    return (trace_shape(analysis, relation, kind),) * group.n_states + chained  # one array per state


def weight_reports(analysis, plan: Plan) -> tuple[WeightReport, ...]:
    looping = looping_groups(analysis)
    reports = []
    leaves = analysis.captured.leaves
    by_weight: dict[int, list[int]] = {}  # every weight leaf a relation's op reads, in leaf order
    for index, relation in enumerate(analysis.relations):
        for leaf in relation.weight_leaves:
            by_weight.setdefault(leaf, []).append(index)
    for leaf_index in sorted(by_weight):
        indices, leaf = by_weight[leaf_index], leaves[leaf_index]
        kept = ""
        path = leaf.path
        relations = [analysis.relations[i] for i in indices]
        itemsize = np.dtype(leaf.dtype).itemsize
        filed = [i for i in indices if i in plan.traced and analysis.relations[i].weight_leaf == leaf_index]
        shapes = tuple(s for i in filed for s in _traces(analysis, plan, i))  # a shared trace counts once
        nbytes = sum(int(np.prod(s, dtype=int)) for s in shapes) * itemsize
        reasons = [note for relation in relations for note in plan.notes.get(relation.weight, ())]
        views = [r.view for r in relations if r.view and r.weight_leaf == leaf_index]
        remarks = [_chain_rule(analysis, r, leaf_index) for r in relations if r.transformed and not r.view]
        if views:
            remarks.append(_parts(leaves[leaf_index].path, views))
        for i, relation in zip(indices, relations, strict=True):
            if i not in plan.traced:
                continue
            if plan.algorithm == "es_d_rtrl" and relation.small_lti:
                group = analysis.group_named(relation.group)
                kept = (
                    f"es_d_rtrl keeps its per-weight trace, not a pair of factors: group `{relation.group}` is linear "
                    f"time-invariant and small ({group.n_neurons} neurons x {group.n_states} states, at most "
                    f"{SMALL_LTI}: a readout), where that trace is exact"
                )
            if factorised.factorised(plan.algorithm, relation):
                reasons.append(factorised.describe(analysis, plan, i))
                owner = factorised.post_owner(plan.algorithm, analysis.relations, i)
                if owner != i:
                    reasons.append(
                        f"its postsynaptic factor is `{analysis.relations[owner].weight}`'s (both op outputs enter "
                        "the group through one sum)"
                    )
            if relation.crossings:
                leaves = analysis.captured.leaves
                crossed = ", ".join(
                    dict.fromkeys(
                        f"`{leaves[analysis.facts.contractions[c].weight_leaf].path}`" for c in relation.crossings
                    )
                )
                reasons.append(
                    f"its op output also reaches group `{relation.group}` through {crossed} (a gate read by the "
                    "cell's other weight): the trace keeps that path's diagonal — each neuron's own gate through "
                    "the weight's diagonal element — and drops its cross-neuron part"
                )
            if relation.group in looping:
                reasons.append(
                    f"group `{relation.group}` lies on a loop through weights (its values come back to it through "
                    "weight ops): the per-neuron trace drops the cross-neuron terms"
                )
        if any(i in plan.traced for i in indices):
            treatment = "trace"
        elif any(i in plan.same_step for i in indices):
            treatment = "same-step"
        elif all(r.status == "instantaneous" for r in relations):
            treatment = "instantaneous"
        else:
            treatment = "unused"
        if reasons:
            why = "; ".join(dict.fromkeys(reasons + remarks + ([kept] if kept else [])))
        elif treatment == "instantaneous":
            why = "it reaches the output with no hidden state in between (the same-step gradient is all of it)"
        elif treatment == "unused":
            why = "the step does not use it (its gradient is zero)"
        else:
            why = kept or f"{plan.algorithm}'s per-neuron trace is the true sensitivity here (no loop through weights)"
            why = "; ".join(dict.fromkeys([why, *remarks]))
        reports.append(WeightReport(path, treatment, shapes, nbytes, not reasons, why))
    return tuple(reports)


def _parts(path: str, views: list[str]) -> str:
    """The remark on a weight whose ops read parts of it: the gates of a split product, the rows of each
    piece of a concatenated input (`passes.gates`)."""
    parts = ", ".join(f"`{path}`{view}" for view in dict.fromkeys(views))
    return (
        f"its ops read it in parts ({parts}: the gates of a split "
        "product, or the pieces of a concatenated input); each part is traced as a weight of its own and its "
        "gradient put back in place (exact wherever each part's trace is)"
    )


def _chain_rule(analysis, relation, leaf_index: int) -> str:
    """The remark on a weight whose op reads a transform of it (not an approximation: the chain rule)."""
    others = [analysis.captured.leaves[i].path for i in relation.weight_leaves if i != leaf_index]
    with_others = f" together with {', '.join(f'`{p}`' for p in others)}" if others else ""
    shared = "" if relation.weight_leaf == leaf_index else f" (its trace is listed under `{relation.weight}`)"
    return (
        f"its `{relation.op}` reads a transform of it{with_others}: the trace follows the op's effective weight and "
        f"the gradient is pulled back through the transform (the chain rule, exact wherever the effective weight's "
        f"trace is){shared}"
    )
