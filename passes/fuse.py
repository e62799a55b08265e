"""Fuse dynamics, derivatives, trace updates and gradients into ONE step.

Consumes: an `Analysis`, an algorithm and its options. Produces: a `Plan` (which relations get which
trace, which cross-group credits apply, and diagnostics for everything left out) and the pure
evaluator `fused_step(plan, loss, weights, state, inputs, target)`; `jax.make_jaxpr` of that evaluator
is the fused program (nothing here builds equations by hand).

Traces (DESIGN.md §2), per traced relation `k` into group `A` with `S` states:

* d_rtrl / e_prop: `ε_k` (..., n_pre, n_post, S) — dense `dot_general(u, W)` relations;
  `ε ← D ε + F ⊗ u`, gradient `Σ δ·ε`; e_prop optionally low-pass filters the trace with `kappa`.
* es_d_rtrl: `ε^u_k` (the op input's layout) and `ε^f_k` (..., S):
  `ε^u ← α ε^u + u`, `ε^f ← α D ε^f + (1-α) F`, gradient `(∂y(ε^u, W)/∂W)ᵀ (δ·ε^f) / (1-α^{t+1})`
  (any op, via its own VJP: sparse weights keep their shape).
* cross-group credit through a linear time-invariant group `R` (decay `λ`, one state) fed by relation
  `k'` whose input reads `A`'s new values: `q ← λ q + P·ε` beside the trace; its gradient term is
  `((∂y_k'/∂u)ᵀ (δ^R F^R)) · q`.

Sharp edges: the direct terms `∂L_t/∂W` (instantaneous readouts) and `∂L_t/∂h_{t-1}·ε_{t-1}` are
always added; a traced relation whose group's credit cannot reach the loss gets a diagnostic.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fusetrace.analysis import Analysis
from fusetrace.errors import CompileError, four_part

from . import derive
from .relations import Relation

ALGORITHMS = ("d_rtrl", "es_d_rtrl", "e_prop")


@dataclasses.dataclass(frozen=True)
class Credit:
    """Cross-group credit: relation `source` (into group A) reaches LTI group `group` through `via`."""

    source: int  # relation index
    via: int  # relation index of the readout relation k'
    group: str
    decay: float


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity (a static jit field)
class Plan:
    algorithm: str
    traced: tuple[int, ...]  # relation indices that get a trace
    credits: tuple[Credit, ...]
    notes: dict  # weight path -> tuple of diagnostics
    decay: float  # es_d_rtrl's α
    kappa: float | None  # e_prop's optional trace filter

    def key(self, relation_index: int) -> str:
        return f"r{relation_index}"


def _dense_layout(analysis: Analysis, relation: Relation) -> bool:
    """Is the relation `y = dot_general(u, W)` with u (..., I), W (I, N), y (..., N)?"""
    contraction = analysis.facts.contractions[relation.contraction]
    eqn = contraction.eqn
    if eqn.primitive.name != "dot_general" or contraction.weight_operand != 1 or relation.tail_perm is not None:
        return False
    (contract_u, contract_w), (batch_u, batch_w) = eqn.params["dimension_numbers"]
    u_shape, w_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    leaf = analysis.captured.leaves[relation.weight_leaf]
    return (not batch_u and not batch_w and len(w_shape) == 2 and tuple(contract_w) == (0,)
            and tuple(contract_u) == (len(u_shape) - 1,) and tuple(leaf.shape) == tuple(w_shape))


def make_plan(analysis: Analysis, algorithm: str, values, *, decay: float = 0.9, kappa: float | None = None) -> Plan:
    if algorithm not in ALGORITHMS:
        raise CompileError(four_part(
            what=f"unknown algorithm {algorithm!r}", where="fusetrace.compile(..., algorithm=...)",
            why=f"fusetrace implements {', '.join(ALGORITHMS)}", fix="pick one of those names"))
    if not 0.0 <= decay < 1.0:
        raise CompileError(four_part(
            what=f"decay={decay} is outside [0, 1)", where="fusetrace.compile(..., decay=...)",
            why="es_d_rtrl's smoothing factor α weighs the past by α^k; α ≥ 1 never forgets",
            fix="use a value such as 0.9 or 0.99"))
    notes: dict[str, list[str]] = {}
    traced = []
    for index, relation in enumerate(analysis.relations):
        if relation.status != "traced":
            continue
        if algorithm != "es_d_rtrl" and not _dense_layout(analysis, relation):
            notes.setdefault(relation.weight, []).append(
                f"{algorithm} keeps per-weight traces only for dense dot_general(u, W) relations; "
                f"`{relation.op}` gets no trace (its gradient is zero here): use es_d_rtrl, which handles any op")
            continue
        traced.append(index)
    credits = _credits(analysis, traced, values, notes)
    return Plan(algorithm, tuple(traced), credits, {k: tuple(v) for k, v in notes.items()}, decay, kappa)


def _credits(analysis: Analysis, traced, values, notes) -> tuple[Credit, ...]:
    relations = analysis.relations
    credits = []
    for via in traced:
        readout = relations[via]
        group = analysis.group_named(readout.group)
        for source_group in readout.pre_new:
            sources = [k for k in traced if relations[k].group == source_group]
            reason = None
            if not group.lti or group.n_states != 1:
                reason = f"group `{group.name}` is not a one-state linear time-invariant group"
            else:
                d, _ = derive.transition_derivatives(analysis, group, [], values)
                flat = np.asarray(d).ravel()
                if not np.allclose(flat, flat[0], rtol=0, atol=0):
                    reason = f"group `{group.name}` has no single decay factor (per-unit decays differ)"
            for k in sources:
                if reason is None:
                    credits.append(Credit(source=k, via=via, group=group.name, decay=float(flat[0])))
                else:
                    notes.setdefault(relations[k].weight, []).append(
                        f"credit reaching the loss through `{readout.weight}` into {reason}: that path is "
                        "dropped (the gradient is approximate)")
    return tuple(credits)


def init_traces(analysis: Analysis, plan: Plan) -> dict:
    batch = () if analysis.batch_size is None else (analysis.batch_size,)
    traces = {}
    for index in plan.traced:
        relation = analysis.relations[index]
        group = analysis.group_named(relation.group)
        contraction = analysis.facts.contractions[relation.contraction]
        leaf = analysis.captured.leaves[relation.weight_leaf]
        dtype = leaf.dtype
        if plan.algorithm == "es_d_rtrl":
            traces[plan.key(index)] = {
                "pre": jnp.zeros(contraction.pre_var.aval.shape, dtype),
                "post": jnp.zeros(group.shape + (group.n_states,), dtype),
            }
        else:
            n_pre, n_post = leaf.shape
            traces[plan.key(index)] = {"eps": jnp.zeros(batch + (n_pre, n_post, group.n_states), dtype)}
            if plan.kappa is not None:
                traces[plan.key(index)]["filtered"] = jnp.zeros(batch + (n_pre, n_post, group.n_states), dtype)
    for credit in plan.credits:
        source = analysis.relations[credit.source]
        key = f"q{credit.source}_{credit.via}"
        if plan.algorithm == "es_d_rtrl":
            traces[key] = jnp.zeros(analysis.group_named(source.group).shape, analysis.captured.leaves[source.weight_leaf].dtype)
        else:
            n_pre, n_post = analysis.captured.leaves[source.weight_leaf].shape
            traces[key] = jnp.zeros(batch + (n_pre, n_post), analysis.captured.leaves[source.weight_leaf].dtype)
    return traces


def _group_delta(group, delta: dict) -> jax.Array:
    return derive.stack_states([delta[leaf] for leaf in group.leaves])


def fused_step(analysis: Analysis, plan: Plan, loss_of_outputs, weights: dict, leaves: list, traces: dict,
               step: jax.Array, inputs: list):
    """One fused step on mantissas: `(new_leaves, new_traces, outputs, loss, grads by weight leaf)`."""
    relations = analysis.relations
    leaves = list(leaves)
    for leaf, value in weights.items():
        leaves[leaf] = value
    values = derive.forward(analysis, inputs, leaves)
    weight_leaves = sorted(weights)
    loss, delta_new, delta_prev, direct = derive.learning_signals(analysis, values, loss_of_outputs, weight_leaves)
    grads = {leaf: direct[leaf] for leaf in weight_leaves}
    by_group: dict[str, list[int]] = {}
    for index in plan.traced:
        by_group.setdefault(relations[index].group, []).append(index)
    new_traces = dict(traces)
    derivs = {}
    for name, indices in by_group.items():
        group = analysis.group_named(name)
        d, f = derive.transition_derivatives(analysis, group, [relations[i] for i in indices], values)
        derivs[name] = (d, f)
        for index in indices:
            relation = relations[index]
            update = _es_update if plan.algorithm == "es_d_rtrl" else _dense_update
            new_traces[plan.key(index)], grad = update(
                analysis, plan, relation, values, d, f[relation.contraction], traces[plan.key(index)],
                _group_delta(group, delta_new), _group_delta(group, delta_prev), step)
            grads[relation.weight_leaf] = grads[relation.weight_leaf] + grad
    for credit in plan.credits:
        new_traces, grads = _apply_credit(analysis, plan, credit, values, derivs, delta_new, new_traces, grads, step)
    return values.new_leaves, new_traces, values.outputs, loss, grads


def _dense_update(analysis, plan, relation, values, d, f, trace, delta, delta_prev, step):
    u = values.u[relation.contraction]
    eps_prev = trace["eps"]
    eps = jnp.einsum("...nst,...int->...ins", d, eps_prev) + u[..., :, None, None] * f[..., None, :, :]
    new = {"eps": eps}
    used, used_prev = eps, eps_prev
    if plan.kappa is not None:
        used_prev = trace["filtered"]
        used = plan.kappa * used_prev + eps
        new["filtered"] = used
    grad = jnp.einsum("...ns,...ins->in", delta, used) + jnp.einsum("...ns,...ins->in", delta_prev, used_prev)
    return new, grad


def _es_update(analysis, plan, relation, values, d, f, trace, delta, delta_prev, step):
    alpha = plan.decay
    u = values.u[relation.contraction]
    pre = alpha * trace["pre"] + u
    post = alpha * jnp.einsum("...st,...t->...s", d, trace["post"]) + (1 - alpha) * f
    correction = 1 - alpha ** (step.astype(post.dtype) + 1)
    prev_correction = jnp.where(step > 0, 1 - alpha ** step.astype(post.dtype), 1.0)
    cotangent = derive.to_op_layout(relation, jnp.sum(delta * post, axis=-1)) / correction
    grad = derive.weight_vjp(analysis, relation.contraction, values, pre, cotangent)
    cotangent_prev = derive.to_op_layout(relation, jnp.sum(delta_prev * trace["post"], axis=-1)) / prev_correction
    grad = grad + derive.weight_vjp(analysis, relation.contraction, values, trace["pre"], cotangent_prev)
    return {"pre": pre, "post": post}, grad


def _apply_credit(analysis, plan, credit, values, derivs, delta_new, traces, grads, step):
    relations = analysis.relations
    source, via = relations[credit.source], relations[credit.via]
    source_group = analysis.group_named(source.group)
    readout_group = analysis.group_named(credit.group)
    _, f_readout = derivs[credit.group]
    signal = jnp.sum(_group_delta(readout_group, delta_new) * f_readout[via.contraction], axis=-1)
    carried = derive.credit(analysis, via.contraction, values, derive.to_op_layout(via, signal))  # (..., n_post of A)
    sensitivity = derive.pre_sensitivity(analysis, via.contraction, source_group, values)  # (..., N, S)
    key = f"q{credit.source}_{credit.via}"
    traces = dict(traces)
    if plan.algorithm == "es_d_rtrl":
        post = traces[plan.key(credit.source)]["post"]
        q = credit.decay * traces[key] + jnp.sum(sensitivity * post, axis=-1)
        correction = 1 - plan.decay ** (step.astype(q.dtype) + 1)
        cotangent = derive.to_op_layout(source, carried * q) / correction
        grad = derive.weight_vjp(analysis, source.contraction, values, traces[plan.key(credit.source)]["pre"], cotangent)
    else:
        trace = traces[plan.key(credit.source)]
        eps = trace["filtered"] if plan.kappa is not None else trace["eps"]
        q = credit.decay * traces[key] + jnp.einsum("...ns,...ins->...in", sensitivity, eps)
        grad = jnp.einsum("...n,...in->in", carried, q)
    traces[key] = q
    grads = dict(grads)
    grads[source.weight_leaf] = grads[source.weight_leaf] + grad
    return traces, grads
