"""Fuse dynamics, derivatives, trace updates and gradients into ONE step.

Consumes: an `Analysis`, an algorithm and its options. Produces: a `Plan` (which relations get which
trace, which credit chains carry their credit downstream, and diagnostics for everything left out) and
the pure evaluator `fused_step(plan, loss, weights, state, inputs, target)`; `jax.make_jaxpr` of that
evaluator is the fused program (nothing here builds equations by hand).

Traces (DESIGN.md §2), per traced relation `k` into group `A` with `S` states:

* d_rtrl / e_prop: `ε_k` per weight element and state (`per_weight`, laid out by `layout`):
  `ε ← D ε + F ⊗ u`, gradient `Σ δ·ε`; e_prop optionally low-pass filters the trace with `kappa`.
* es_d_rtrl: a presynaptic and a postsynaptic factor (`factorised`), gradient through the op's own VJP.
* credit beyond `A`: the chains of `chains` (through linear time-invariant groups exactly, through
  nonlinear ones approximately), advanced and read by `credit`.

This module only orders the work: forward values, learning signals, each group's derivatives and its
relations' traces, the chains, then one weight product per factorised relation. Each part runs under a
`jax.named_scope` (`SCOPES`), so the fused program's equations (and XLA's ops in a profile) say which part
they come from.

Sharp edges: the direct terms `∂L_t/∂W` (instantaneous readouts) and `∂L_t/∂h_{t-1}·ε_{t-1}` are
always added; a traced relation whose group's credit cannot reach the loss gets a diagnostic.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fusetrace.analysis import Analysis
from fusetrace.errors import CompileError, four_part

from . import credit, derive, events, factorised, per_weight
from .chains import DEFAULT_LOOP_HOPS, DEFAULT_OWN_LOOP_HOPS, Node, group_units, plan_chains
from .factorised import FACTORISATIONS
from .layout import layout_kind, trace_shape
from .structure import output_sources

ALGORITHMS = ("d_rtrl", "es_d_rtrl", "e_prop")
SCOPES = (  # the named scopes of the fused step's parts, in the order they run
    "forward",
    "learning_signal",
    "derivatives",
    "traces",
    "credit_chains",
    "same_step",
    "weight_products",
)
DEFAULT_CREDIT_DEPTH = 4  # downstream groups a credit chain may cross


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity (a static jit field)
class Plan:
    algorithm: str
    traced: tuple[int, ...]  # relation indices that get a trace
    same_step: tuple[int, ...]  # relation indices that get their same-step gradient only (with a note)
    chains: tuple[Node, ...]  # credit chain nodes, parents first (`passes.chains`)
    notes: dict  # weight path -> tuple of diagnostics
    decay: float  # es_d_rtrl's α
    factorisation: str  # es_d_rtrl's factorisation, one of FACTORISATIONS
    kappa: float | None  # e_prop's optional trace filter
    feedback: dict  # contraction index -> fixed random matrix (e_prop's random feedback), else empty
    depth: int = DEFAULT_CREDIT_DEPTH  # the longest credit chain, in downstream groups
    rank: int = factorised.DEFAULT_RANK  # es_d_rtrl "low_rank": the trace's rank per batch entry
    hops: int = DEFAULT_LOOP_HOPS  # rounds a chain follows a downstream group's own recurrent weights
    own_hops: int = DEFAULT_OWN_LOOP_HOPS  # rounds it follows the weight's own group's recurrent weights
    rank_metric: str = "plain"  # es_d_rtrl "low_rank": the truncation's norm (components.RANK_METRICS)

    def key(self, relation_index: int) -> str:
        return f"r{relation_index}"


def _check_options(algorithm: str, decay: float, factorisation: str, depth: int, hops: int, own_hops: int) -> None:
    if algorithm not in ALGORITHMS:
        raise CompileError(
            four_part(
                what=f"unknown algorithm {algorithm!r}",
                where="fusetrace.compile(..., algorithm=...)",
                why=f"fusetrace implements {', '.join(ALGORITHMS)}",
                fix="pick one of those names",
            )
        )
    if not 0.0 <= decay < 1.0:
        raise CompileError(
            four_part(
                what=f"decay={decay} is outside [0, 1)",
                where="fusetrace.compile(..., decay=...)",
                why="es_d_rtrl's smoothing factor α weighs the past by α^k; α ≥ 1 never forgets",
                fix="use a value such as 0.9 or 0.99",
            )
        )
    if factorisation not in FACTORISATIONS:
        raise CompileError(
            four_part(
                what=f"unknown factorisation {factorisation!r}",
                where="fusetrace.compile(..., factorisation=...)",
                why=f"es_d_rtrl factorises its trace as one of {', '.join(FACTORISATIONS)}",
                fix="pick one of those names (docs/concepts.md compares them)",
            )
        )
    rounds = "it counts the rounds a credit chain follows {} own recurrent weights (0: none)"
    counts = (  # (option, value, default, what it counts)
        (
            "credit_depth",
            depth,
            DEFAULT_CREDIT_DEPTH,
            "it counts the downstream groups a weight's credit chain may cross (0: none)",
        ),
        ("loop_hops", hops, DEFAULT_LOOP_HOPS, rounds.format("a downstream group's")),
        ("own_loop_hops", own_hops, DEFAULT_OWN_LOOP_HOPS, rounds.format("the weight's own group's")),
    )
    for option, value, default, why in counts:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CompileError(
                four_part(
                    what=f"{option}={value!r}",
                    where=f"fusetrace.compile(..., {option}=...)",
                    why=why,
                    fix=f"pass a non-negative int (default {default})",
                )
            )


def make_plan(
    analysis: Analysis,
    algorithm: str,
    values,
    *,
    decay: float = 0.9,
    factorisation: str = "filtered",
    kappa: float | None = None,
    feedback: str = "symmetric",
    feedback_seed: int = 0,
    depth: int = DEFAULT_CREDIT_DEPTH,
    rank: int | None = None,
    hops: int = DEFAULT_LOOP_HOPS,
    own_hops: int = DEFAULT_OWN_LOOP_HOPS,
    rank_metric: str | None = None,
) -> Plan:
    _check_options(algorithm, decay, factorisation, depth, hops, own_hops)
    notes: dict[str, list[str]] = {}
    traced, same_step = [], []
    for index, relation in enumerate(analysis.relations):
        if relation.status == "excluded" and relation.op != "none":
            same_step.append(index)
            notes.setdefault(relation.weight, []).append(
                f"{SAME_STEP}; no trace because {_first_lower(relation.reason)}"
            )
        if relation.status != "traced":
            continue
        if algorithm != "es_d_rtrl" and layout_kind(analysis, relation) is None:
            same_step.append(index)
            notes.setdefault(relation.weight, []).append(
                f"{SAME_STEP}; no trace because {algorithm} has no per-weight trace layout for this "
                f"`{relation.op}` relation (not a dense dot_general(u, W) nor a per-synapse product); es_d_rtrl "
                "traces any op"
            )
            continue
        traced.append(index)
    rank, rank_metric = factorised.check_options(analysis, algorithm, factorisation, rank, traced, rank_metric)
    chains, chain_notes = plan_chains(analysis, algorithm, traced, values, depth, hops, own_hops)
    for index in traced:
        owner = factorised.post_owner(algorithm, analysis.relations, index)
        for note in chain_notes.get(owner, ()):
            notes.setdefault(analysis.relations[index].weight, []).append(note)
    _note_unreachable(analysis, algorithm, traced, chains, notes)
    matrices = _feedback_matrices(analysis, algorithm, chains, values, feedback, feedback_seed)
    notes_by_weight = {k: tuple(dict.fromkeys(v)) for k, v in notes.items()}
    return Plan(
        algorithm,
        tuple(traced),
        tuple(same_step),
        chains,
        notes_by_weight,
        decay,
        factorisation,
        kappa,
        matrices,
        depth,
        rank,
        hops,
        own_hops,
        rank_metric,
    )


SAME_STEP = (
    "gets its same-step gradient only (∂L_t/∂W through this step's new hidden values; its "
    "effect on later steps is dropped)"
)


def _first_lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _feedback_matrices(analysis, algorithm, chains, values, feedback, seed) -> dict:
    """Fixed random matrices for the readout relations (those the learning signal crosses), drawn with
    the readout weight's shape, dtype and standard deviation."""
    if feedback not in ("symmetric", "random"):
        raise CompileError(
            four_part(
                what=f"feedback={feedback!r}",
                where="fusetrace.compile(..., feedback=...)",
                why="e_prop's learning signal goes back through the readout weights ('symmetric') or through "
                "fixed random matrices ('random')",
                fix="use 'symmetric' or 'random'",
            )
        )
    if feedback == "symmetric":
        return {}
    if algorithm != "e_prop":
        raise CompileError(
            four_part(
                what=f"random feedback is an e_prop option, not one of {algorithm}",
                where="fusetrace.compile(..., feedback='random')",
                why="only e_prop replaces the feedback weights",
                fix="use algorithm='e_prop' or drop feedback",
            )
        )
    readouts = {stage.via for node in chains for stage in node.stages} | {
        i for i, r in enumerate(analysis.relations) if r.status == "instantaneous" and r.contraction is not None
    }
    matrices = {}
    key = jax.random.PRNGKey(seed)
    for index in sorted(readouts):
        relation = analysis.relations[index]
        contraction = analysis.facts.contractions[relation.contraction]
        if (
            contraction.eqn.invars[contraction.weight_operand]
            is not analysis.captured.jaxpr.jaxpr.invars[analysis.captured.n_inputs + relation.weight_leaf]
        ):
            raise CompileError(
                four_part(
                    what=f"random feedback for `{relation.weight}`",
                    where=f"its `{relation.op}`",
                    why="the op reads a transformed view of the weight, so a replacement matrix has no defined layout",
                    fix="use feedback='symmetric' for this model",
                )
            )
        weight = values.leaves[relation.weight_leaf]
        key, sub = jax.random.split(key)
        matrices[relation.contraction] = jnp.std(weight) * jax.random.normal(sub, weight.shape, weight.dtype)
    return matrices


def _note_unreachable(analysis: Analysis, algorithm: str, traced, chains, notes) -> None:
    """A diagnostic for each traced weight whose group's credit cannot reach the loss: the outputs read
    none of its states (directly or through an instantaneous readout) and no credit chain starts from it."""
    read = {i for kind, i in output_sources(analysis) if kind in ("new", "hidden")}
    chained = {node.owner for node in chains}
    for index in traced:
        relation = analysis.relations[index]
        group = analysis.group_named(relation.group)
        owner = factorised.post_owner(algorithm, analysis.relations, index)
        if owner in chained or read.intersection(group.leaves) or relation.weight in notes:
            continue
        notes.setdefault(relation.weight, []).append(
            f"group `{group.name}` reaches the loss only along paths that carry no credit back to it (its new "
            "states are not read by the output, nor through a linear readout of them): this weight gets a zero "
            "gradient"
        )


def init_traces(analysis: Analysis, plan: Plan) -> dict:
    traces = {}
    for index in plan.traced:
        relation = analysis.relations[index]
        group = analysis.group_named(relation.group)
        dtype = analysis.captured.leaves[relation.weight_leaf].dtype
        if factorised.factorised(plan.algorithm, relation):
            traces[plan.key(index)] = factorised.init_factors(analysis, plan, index)
        else:
            # one array per state (not a stacked state axis): XLA's CPU fusions run several times faster
            shape = trace_shape(analysis, relation, per_weight.kind_of(analysis, relation))
            zeros = tuple(jnp.zeros(shape, dtype) for _ in range(group.n_states))
            traces[plan.key(index)] = {"eps": zeros}
            if plan.kappa is not None:
                traces[plan.key(index)]["filtered"] = zeros
    for node in plan.chains:
        shape, dtype = chain_trace_shape(analysis, plan, node)
        traces[node.key] = tuple(jnp.zeros(shape, dtype) for _ in node.states)
    return traces


def chain_trace_shape(analysis: Analysis, plan: Plan, node: Node) -> tuple[tuple[int, ...], Any]:
    """`(shape, dtype)` of each array of a chain node's trace: its owner's per-state trace slice (or, for a
    factorised owner, its group's neuron layout)."""
    owner = analysis.relations[node.owner]
    dtype = analysis.captured.leaves[owner.weight_leaf].dtype
    if factorised.factorised(plan.algorithm, owner):
        shape = factorised.chain_shape(analysis, plan, node.owner)
    else:
        shape = trace_shape(analysis, owner, per_weight.kind_of(analysis, owner))
    if node.resolved:  # one slice per unit of the last stage
        shape = (*shape, group_units(analysis, analysis.group_named(node.stage.group)))
    return tuple(shape), dtype


def _group_delta(group, delta: dict) -> jax.Array:
    return derive.stack_states([delta[leaf] for leaf in group.leaves])


def fused_step(
    analysis: Analysis,
    plan: Plan,
    loss_of_outputs,
    weights: dict,
    leaves: list,
    traces: dict,
    step: jax.Array,
    inputs: list,
    *,
    gradient: bool = True,
    defer: bool = False,
):
    """One fused step on mantissas: `(new_leaves, new_traces, outputs, loss, grads by weight leaf)`.

    `gradient=False` advances states and traces only: no learning signal, no gradient (`grads` is None).
    Exact where the step's loss is identically zero (between read-outs), since then every gradient term
    of the step is zero. `defer=True`: es_d_rtrl's weight products are not formed; `grads` is then
    `(grads without them, deferred)`, for `sequence` to contract over many steps at once: `deferred["pairs"]`
    maps `(relation, "now" or "prev")` to `(presynaptic factor, op-layout cotangent)`
    (`derive.weight_vjp_over_time`); for the relations contracted event by event (`events`),
    `deferred["events"]` maps the same keys to the cotangent alone and `deferred["inputs"]` each relation
    to its op's activity mask — the one entry also there under `gradient=False` (`(None, deferred)`)."""
    relations = analysis.relations
    leaves = list(leaves)
    for leaf, value in weights.items():
        leaves[leaf] = value
    with jax.named_scope("forward"):
        values = derive.forward(analysis, inputs, leaves)
    cache: dict = {}  # per-step derivatives the chains share
    if not gradient:  # only the traces move (the credit chains' included)
        own, _, _ = _update_traces(analysis, plan, values, traces, step, None, cache)
        with jax.named_scope("credit_chains"):
            aligned = factorised.align_chains(analysis, plan, traces, own)
            new_traces = credit.advance(analysis, plan, values, aligned, own, cache)
        idle = (None, {"inputs": events.activity(analysis, plan, values)}) if defer else None
        return values.new_leaves, new_traces, values.outputs, loss_of_outputs(list(values.outputs)), idle
    weight_leaves = sorted(weights)
    with jax.named_scope("learning_signal"):
        loss, delta_new, delta_prev, direct = derive.learning_signals(
            analysis, values, loss_of_outputs, weight_leaves, plan.feedback
        )
    own, terms, cotangents = _update_traces(analysis, plan, values, traces, step, (delta_new, delta_prev), cache)
    with jax.named_scope("credit_chains"):
        aligned = factorised.align_chains(analysis, plan, traces, own)
        new_traces = credit.advance(analysis, plan, values, aligned, own, cache)
        chain_terms, chain_cotangents = credit.gradients(
            analysis, plan, values, (delta_new, delta_prev), traces, new_traces, step, cache
        )
    terms += chain_terms
    for key, cotangent in chain_cotangents.items():
        cotangents[key] = cotangents[key] + cotangent if key in cotangents else cotangent
    with jax.named_scope("same_step"):
        terms += [(i, derive.same_step_grad(analysis, values, relations[i], delta_new)) for i in plan.same_step]
    products = {  # es_d_rtrl: (∂y(ε^u, W)/∂W)ᵀ Σ cotangents, one weight product per relation and factor
        key: ((new_traces if key[1] == "now" else traces)[plan.key(key[0])]["pre"], cotangent)
        for key, cotangent in cotangents.items()
    }
    if defer:  # (relation, factor) -> (presynaptic factor, cotangent), or the cotangent alone (`events`)
        activity = events.activity(analysis, plan, values)
        deferred = {
            "pairs": {key: pair for key, pair in products.items() if key[0] not in activity},
            "events": {key: pair[1] for key, pair in products.items() if key[0] in activity},
            "inputs": activity,
        }
        grads = by_weight_leaf(analysis, values, {leaf: direct[leaf] for leaf in weight_leaves}, terms)
        return values.new_leaves, new_traces, values.outputs, loss, (grads, deferred)
    with jax.named_scope("weight_products"):
        for (index, _), (pre, cotangent) in products.items():
            product = factorised.weight_product(analysis, plan, relations[index], values, pre, cotangent)
            terms.append((index, product))
    grads = by_weight_leaf(analysis, values, {leaf: direct[leaf] for leaf in weight_leaves}, terms)
    return values.new_leaves, new_traces, values.outputs, loss, grads


def by_weight_leaf(analysis: Analysis, values, grads: dict, terms) -> dict:
    """`grads` (by weight leaf) plus the `(relation index, gradient)` terms: a relation whose op reads a
    transform of its weights has its gradient with respect to the effective weight, carried to the
    weights through the transforms' VJP (the chain rule; one VJP for every such relation)."""
    grads, effective = dict(grads), {}
    for index, grad in terms:
        relation = analysis.relations[index]
        if relation.transformed:
            effective[relation.contraction] = (
                grad + effective[relation.contraction] if relation.contraction in effective else grad
            )
        else:
            grads[relation.weight_leaf] = grads[relation.weight_leaf] + grad
    if effective:
        for leaf, grad in derive.to_weight_leaves(analysis, values, effective).items():
            grads[leaf] = grads[leaf] + grad
    return grads


def _update_traces(analysis: Analysis, plan: Plan, values, traces: dict, step, signals, cache: dict):
    """Every traced relation's new trace, group by group. Given `signals` = `(δ_new, δ_prev)` by hidden
    leaf, also its gradient: `(new_traces, [(relation index, gradient term)], cotangents)`, the cotangents
    being es_d_rtrl's op-layout ones, for ONE weight product per relation at the end. Each group's `D`
    and `F` go into `cache` for the credit chains through it."""
    relations = analysis.relations
    by_group: dict[str, list[int]] = {}
    for index in plan.traced:
        by_group.setdefault(relations[index].group, []).append(index)
    new_traces, terms, cotangents = dict(traces), [], {}
    for name, indices in by_group.items():
        group = analysis.group_named(name)
        owners = {i: factorised.post_owner(plan.algorithm, relations, i) for i in indices}
        # a shared postsynaptic factor needs one F; a crossing relation its own (its same-step correction)
        needs_f = [i for i in indices if owners[i] == i or relations[i].crossings]
        with jax.named_scope("derivatives"):
            d, f_list = derive.transition_derivatives(analysis, group, [relations[i] for i in needs_f], values)
        f = dict(zip(needs_f, f_list, strict=True))
        cache[(credit.DERIVATIVES, name)] = (d, f)  # the chains through this group read them too
        group_signals = None if signals is None else tuple(_group_delta(group, delta) for delta in signals)
        for index in indices:
            with jax.named_scope("traces"):
                more_traces, grad, more = _relation_trace(
                    analysis, plan, values, traces, step, index, indices, owners, d, f, group_signals
                )
            new_traces.update(more_traces)
            if signals is not None and group_signals is not None and relations[index].crossings:
                # the step's own credit, exact: the crossed products in full, not their diagonal (a factorised
                # relation forms the rest of its term through its cotangents)
                with jax.named_scope("same_step"):
                    correction = per_weight.crossing_correction(
                        analysis, values, relations[index], f[index], group_signals[0], signals[0]
                    )
                grad = correction if grad is None else grad + correction
            if grad is not None:
                terms.append((index, grad))
            cotangents.update(more)
    return new_traces, terms, cotangents


def _relation_trace(analysis: Analysis, plan: Plan, values, traces, step, index, indices, owners, d, f, signals):
    """One relation's new trace and gradient term, `({trace key: new trace}, term or None, {})`; for an
    es_d_rtrl relation that owns a postsynaptic factor, the new factors of every relation of the group
    sharing it and their op-layout cotangents (`factorised.update_owner`, keyed `(index, "now"|"prev")`),
    and nothing for the others (their owner updates them)."""
    relation, key = analysis.relations[index], plan.key(index)
    if not factorised.factorised(plan.algorithm, relation):
        new, grad = per_weight.update(analysis, plan, relation, values, d, f[index], traces[key], signals)
        return {key: new}, grad, {}
    if owners[index] != index:
        return {}, None, {}
    members = [i for i in indices if owners[i] == index]
    new, cotangents = factorised.update_owner(
        analysis, plan, index, members, values, d, f[index], traces, signals, step
    )
    return new, None, cotangents
