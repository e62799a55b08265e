"""Fuse dynamics, derivatives, trace updates and gradients into ONE step.

Consumes: an `Analysis`, an algorithm and its options. Produces: a `Plan` (which relations get which
trace, which cross-group credits apply, and diagnostics for everything left out) and the pure
evaluator `fused_step(plan, loss, weights, state, inputs, target)`; `jax.make_jaxpr` of that evaluator
is the fused program (nothing here builds equations by hand).

Traces (DESIGN.md §2), per traced relation `k` into group `A` with `S` states:

* d_rtrl / e_prop: `ε_k` per weight element and state, laid out by `layout` (dense, per-synapse or
  shared): `ε ← D ε + F ⊗ u`, gradient `Σ δ·ε`; e_prop optionally low-pass filters the trace with
  `kappa`.
* es_d_rtrl: `ε^u_k` (the op input's layout) and `ε^f_k` (..., S):
  `ε^u ← α ε^u + a·u`, `ε^f ← β D ε^f + b F`, gradient `(∂y(ε^u, W)/∂W)ᵀ (δ·ε^f) / (1-α^{t+1})`
  (any op, via its own VJP: sparse weights keep their shape); `(a, β, b)` by factorisation (below).
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
from .layout import layout_kind, make_layout, trace_shape

ALGORITHMS = ("d_rtrl", "es_d_rtrl", "e_prop")
# es_d_rtrl's two factorisations of the trace ε ≈ ε^u ⊗ ε^f, as (pre gain, post decay, post gain) in
#   ε^u ← α ε^u + a·u,   ε^f ← β·D ε^f + b·F     (α the `decay`; the gradient divides by 1 − α^{t+1})
# "filtered": both factors low-pass filtered with α (pp-prop's choice): a=1, β=α, b=1−α. Its magnitude
#   comes out near (1−α)/(1−αλ) of the true one on a neuron of decay λ.
# "averaged": ε^u the bias-corrected moving average of u, ε^f the exact d_rtrl sensitivity to a constant
#   input (a=1−α, β=1, b=1); exact (equal to d_rtrl) whenever u is constant in time.
FACTORISATIONS = ("filtered", "averaged")


def _factor_gains(factorisation: str, alpha: float) -> tuple[float, float, float]:
    if factorisation == "filtered":
        return 1.0, alpha, 1.0 - alpha
    return 1.0 - alpha, 1.0, 1.0


@dataclasses.dataclass(frozen=True)
class Credit:
    """Cross-group credit: relation `source` (into group A) reaches LTI group `group` through `via`."""

    source: int  # relation index
    via: int  # relation index of the readout relation k'
    group: str
    decay: float
    link: object = dataclasses.field(compare=False, repr=False)  # the var aligned with the source's group

    @property
    def key(self) -> str:
        return f"q{self.source}_{self.via}"


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity (a static jit field)
class Plan:
    algorithm: str
    traced: tuple[int, ...]  # relation indices that get a trace
    same_step: tuple[int, ...]  # relation indices that get their same-step gradient only (with a note)
    credits: tuple[Credit, ...]
    notes: dict  # weight path -> tuple of diagnostics
    decay: float  # es_d_rtrl's α
    factorisation: str  # es_d_rtrl's factorisation, one of FACTORISATIONS
    kappa: float | None  # e_prop's optional trace filter
    feedback: dict  # contraction index -> fixed random matrix (e_prop's random feedback), else empty

    def key(self, relation_index: int) -> str:
        return f"r{relation_index}"


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
) -> Plan:
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
    credits = _credits(analysis, traced, values, notes)
    _note_unreachable(analysis, traced, credits, notes)
    matrices = _feedback_matrices(analysis, algorithm, credits, values, feedback, feedback_seed)
    notes_by_weight = {k: tuple(v) for k, v in notes.items()}
    return Plan(
        algorithm, tuple(traced), tuple(same_step), credits, notes_by_weight, decay, factorisation, kappa, matrices
    )


SAME_STEP = (
    "gets its same-step gradient only (∂L_t/∂W through this step's new hidden values; its "
    "effect on later steps is dropped)"
)


def _first_lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _feedback_matrices(analysis, algorithm, credits, values, feedback, seed) -> dict:
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
    readouts = {c.via for c in credits} | {
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


def _credits(analysis: Analysis, traced, values, notes) -> tuple[Credit, ...]:
    relations = analysis.relations
    credits = []
    for via in traced:
        readout = relations[via]
        group = analysis.group_named(readout.group)
        for source_group, link in readout.pre_links:
            sources = [k for k in traced if relations[k].group == source_group]
            decay, reason = _single_decay(analysis, group, values)
            for k in sources:
                if reason is None:
                    credits.append(Credit(source=k, via=via, group=group.name, decay=decay, link=link))
                else:
                    notes.setdefault(relations[k].weight, []).append(
                        f"credit reaching the loss through `{readout.weight}` into {reason}: that path is "
                        "dropped (the gradient is approximate)"
                    )
    return tuple(credits)


def _note_unreachable(analysis: Analysis, traced, credits, notes) -> None:
    """A diagnostic for each traced weight whose group's credit cannot reach the loss: the outputs
    read none of its states and no cross-group credit starts from it."""
    captured = analysis.captured
    read = {
        i
        for v in captured.jaxpr.jaxpr.outvars[: captured.n_outputs]
        for (k, i) in analysis.facts.propagation.of(v)
        if k in ("new", "hidden")
    }
    for relation in analysis.relations:  # an instantaneous readout of a group's values reads the group
        if relation.status == "instantaneous" and relation.contraction is not None:
            pre_fact = analysis.facts.contractions[relation.contraction].pre_fact
            read |= {i for (k, i) in pre_fact if k in ("new", "hidden")}
    credited = {c.source for c in credits}
    for index in traced:
        relation = analysis.relations[index]
        group = analysis.group_named(relation.group)
        if index in credited or read.intersection(group.leaves) or relation.weight in notes:
            continue
        notes.setdefault(relation.weight, []).append(
            f"group `{group.name}` reaches the loss only along paths that carry no credit back to it (its new "
            "states are not read by the output, nor through a linear readout of them): this weight gets a zero "
            "gradient"
        )


def _single_decay(analysis, group, values) -> tuple[float, str | None]:
    """`(λ, None)` when `group` is a one-state LTI group with one decay factor for every unit, else
    `(nan, reason)`."""
    if not group.lti or group.n_states != 1:
        return float("nan"), f"group `{group.name}` is not a one-state linear time-invariant group"
    d, _ = derive.transition_derivatives(analysis, group, [], values)
    flat = np.asarray(d).ravel()
    if not np.all(flat == flat[0]):
        return float("nan"), f"group `{group.name}` has no single decay factor (per-unit decays differ)"
    return float(flat[0]), None


def _kind(analysis, relation) -> str:
    kind = layout_kind(analysis, relation)
    assert kind is not None, "make_plan traces only relations with a layout"
    return kind


def init_traces(analysis: Analysis, plan: Plan) -> dict:
    traces = {}
    for index in plan.traced:
        relation = analysis.relations[index]
        group = analysis.group_named(relation.group)
        leaf = analysis.captured.leaves[relation.weight_leaf]
        dtype = leaf.dtype
        if _factorised(plan, relation):
            contraction = analysis.facts.contractions[relation.contraction]
            traces[plan.key(index)] = {
                "pre": jnp.zeros(contraction.pre_var.aval.shape, dtype),
                "post": jnp.zeros((*group.shape, group.n_states), dtype),
            }
        else:
            # one array per state (not a stacked state axis): XLA's CPU fusions run several times faster
            shape = trace_shape(analysis, relation, _kind(analysis, relation))
            zeros = tuple(jnp.zeros(shape, dtype) for _ in range(group.n_states))
            traces[plan.key(index)] = {"eps": zeros}
            if plan.kappa is not None:
                traces[plan.key(index)]["filtered"] = zeros
    for credit in plan.credits:
        source = analysis.relations[credit.source]
        dtype = analysis.captured.leaves[source.weight_leaf].dtype
        if _factorised(plan, source):
            shape = analysis.group_named(source.group).shape
        else:
            shape = trace_shape(analysis, source, _kind(analysis, source))
        traces[credit.key] = jnp.zeros(shape, dtype)
    return traces


def _factorised(plan: Plan, relation) -> bool:
    """Whether the relation's trace is es_d_rtrl's pair of factors. Element-wise parameters keep their
    exact per-neuron trace under every algorithm (it is already O(N)). A binary event op factorises too:
    its presynaptic factor filters the op's activity mask, and its gradient is formed with the op's
    value-weighted twin (`derive.op_output`)."""
    return plan.algorithm == "es_d_rtrl" and not relation.elementwise


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
):
    """One fused step on mantissas: `(new_leaves, new_traces, outputs, loss, grads by weight leaf)`.

    `gradient=False` advances states and traces only: no learning signal, no gradient (`grads` is None).
    Exact where the step's loss is identically zero (between read-outs), since then every gradient term
    of the step is zero."""
    relations = analysis.relations
    leaves = list(leaves)
    for leaf, value in weights.items():
        leaves[leaf] = value
    values = derive.forward(analysis, inputs, leaves)
    if not gradient:  # only the traces move (the cross-group credit traces included)
        new_traces, _, _, _ = _update_traces(analysis, plan, values, traces, step, None)
        for credit in plan.credits:
            new_traces = _advance_credit(analysis, plan, credit, values, new_traces)
        return values.new_leaves, new_traces, values.outputs, loss_of_outputs(list(values.outputs)), None
    weight_leaves = sorted(weights)
    loss, delta_new, delta_prev, direct = derive.learning_signals(
        analysis, values, loss_of_outputs, weight_leaves, plan.feedback
    )
    grads = {leaf: direct[leaf] for leaf in weight_leaves}
    new_traces, derivs, terms, cotangents = _update_traces(
        analysis, plan, values, traces, step, (delta_new, delta_prev)
    )
    for leaf, grad in terms:
        grads[leaf] = grads[leaf] + grad
    for index in plan.same_step:
        relation = relations[index]
        grads[relation.weight_leaf] = grads[relation.weight_leaf] + derive.same_step_grad(
            analysis, values, relation, delta_new
        )
    for credit in plan.credits:
        new_traces, grads, cotangent = _apply_credit(
            analysis, plan, credit, values, derivs, delta_new, new_traces, grads, step
        )
        if cotangent is not None:
            cotangents[credit.source] = cotangents[credit.source] + cotangent
    for index, cotangent in cotangents.items():  # (∂y(ε^u, W)/∂W)ᵀ Σ cotangents: one product per weight
        relation = relations[index]
        pre = new_traces[plan.key(index)]["pre"]
        grads[relation.weight_leaf] = grads[relation.weight_leaf] + derive.weight_vjp(
            analysis, relation.contraction, values, pre, cotangent, float_input=True
        )
    return values.new_leaves, new_traces, values.outputs, loss, grads


def _update_traces(analysis: Analysis, plan: Plan, values, traces: dict, step, signals):
    """Every traced relation's new trace, group by group. Given `signals` = `(δ_new, δ_prev)` by hidden
    leaf, also its gradient: `(new_traces, derivs by group, [(weight leaf, gradient term)], cotangents)`,
    the cotangents being es_d_rtrl's op-layout ones, for ONE weight product per relation at the end."""
    relations = analysis.relations
    by_group: dict[str, list[int]] = {}
    for index in plan.traced:
        by_group.setdefault(relations[index].group, []).append(index)
    new_traces, derivs, terms, cotangents = dict(traces), {}, [], {}
    for name, indices in by_group.items():
        group = analysis.group_named(name)
        d, f_list = derive.transition_derivatives(analysis, group, [relations[i] for i in indices], values)
        f = dict(zip(indices, f_list, strict=True))
        derivs[name] = (d, f)
        group_signals = None if signals is None else tuple(_group_delta(group, delta) for delta in signals)
        for index in indices:
            relation = relations[index]
            update = _es_update if _factorised(plan, relation) else _per_weight_update
            new_traces[plan.key(index)], grad, cotangent = update(
                analysis, plan, relation, values, d, f[index], traces[plan.key(index)], group_signals, step
            )
            if grad is not None:
                terms.append((relation.weight_leaf, grad))
            if cotangent is not None:
                cotangents[index] = cotangent
    return new_traces, derivs, terms, cotangents


def _contract(layout, signal, trace, states=None) -> jax.Array | None:
    """`Σ_s gather(signal_s) · trace_s` over `states` (default all), per batch entry, in the trace's
    layout; None when `states` is empty. `trace` holds one array per state."""
    total = None
    for s in range(signal.shape[-1]) if states is None else states:
        term = layout.gather(signal[..., s]) * trace[s]
        total = term if total is None else total + term
    return total


def _structure(analysis: Analysis, relation) -> tuple[dict[int, tuple[int, ...]], tuple[int, ...], bool]:
    """What the step's structure makes zero, so the big trace arrays are read only where needed:
    `(reads, injected, prev_read)` — for each state s the states t with `D[s, t]` not identically zero,
    the states whose `F` is not identically zero, and whether the output reads the group's previous
    values (else `δ_prev ≡ 0`). From the dependency facts, closed over the group's own new values."""
    facts, group = analysis.facts, analysis.group_named(relation.group)
    leaves = list(group.leaves)
    direct = [facts.new_fact(leaf) for leaf in leaves]
    reads = [{t for t, other in enumerate(leaves) if ("hidden", other) in fact} for fact in direct]
    source = ("weight", relation.weight_leaf) if relation.elementwise else ("relation", relation.contraction)
    injected = [source in fact for fact in direct]
    changed = True
    while changed:  # a new value read by another new value: inherit its dependencies
        changed = False
        for s, fact in enumerate(direct):
            for r, other in enumerate(leaves):
                if ("new", other) in fact and r != s:
                    before = (len(reads[s]), injected[s])
                    reads[s] |= reads[r]
                    injected[s] = injected[s] or injected[r]
                    changed = changed or before != (len(reads[s]), injected[s])
    outputs = analysis.captured.jaxpr.jaxpr.outvars[: analysis.captured.n_outputs]
    prev_read = any(("hidden", leaf) in facts.propagation.of(v) for v in outputs for leaf in leaves)
    return (
        {s: tuple(sorted(reads[s])) for s in range(len(leaves))},
        tuple(s for s in range(len(leaves)) if injected[s]),
        prev_read,
    )


def _per_weight_update(analysis, plan, relation, values, d, f, trace, signals, step):
    """d_rtrl / e_prop: the new per-weight trace and, given `signals` = `(δ, δ_prev)`, its gradient."""
    layout = make_layout(_kind(analysis, relation), analysis, relation, values)
    reads, injected, prev_read = _structure(analysis, relation)
    eps_prev = trace["eps"]
    eps = []
    for s in range(d.shape[-1]):
        value = _contract(layout, d[..., s, :], eps_prev, reads[s])
        if s in injected:
            value = layout.inject(f[..., s]) if value is None else value + layout.inject(f[..., s])
        eps.append(jnp.zeros_like(eps_prev[s]) if value is None else value)
    eps = tuple(eps)
    new = {"eps": eps}
    used, used_prev = eps, eps_prev
    if plan.kappa is not None:
        used_prev = trace["filtered"]
        used = tuple(plan.kappa * p + e for p, e in zip(used_prev, eps, strict=True))
        new["filtered"] = used
    if signals is None:
        return new, None, None
    delta, delta_prev = signals
    total = _contract(layout, delta, used)
    assert total is not None, "a group has at least one state"
    previous = _contract(layout, delta_prev, used_prev) if prev_read else None
    if previous is not None:
        total = total + previous
    return new, layout.reduce(total), None


def _es_update(analysis, plan, relation, values, d, f, trace, signals, step):
    """es_d_rtrl: the new factors and, given `signals` = `(δ, δ_prev)`, the op-layout cotangent of this
    step's gradient (plus the δ_prev term, formed here)."""
    alpha = plan.decay
    pre_gain, post_decay, post_gain = _factor_gains(plan.factorisation, alpha)
    eqn = analysis.facts.contractions[relation.contraction].eqn
    u = derive.op_input(eqn, values.u[relation.contraction], trace["pre"].dtype)
    pre = alpha * trace["pre"] + pre_gain * u
    post = post_decay * jnp.einsum("...st,...t->...s", d, trace["post"]) + post_gain * f
    if signals is None:
        return {"pre": pre, "post": post}, None, None
    delta, delta_prev = signals
    correction = 1 - alpha ** (step.astype(post.dtype) + 1)
    cotangent = derive.to_op_layout(relation, jnp.sum(delta * post, axis=-1)) / correction
    grad = None
    if _structure(analysis, relation)[2]:  # the output reads the previous values: δ_prev·ε_{t-1}
        prev_correction = jnp.where(step > 0, 1 - alpha ** step.astype(post.dtype), 1.0)
        cotangent_prev = derive.to_op_layout(relation, jnp.sum(delta_prev * trace["post"], axis=-1)) / prev_correction
        grad = derive.weight_vjp(analysis, relation.contraction, values, trace["pre"], cotangent_prev, float_input=True)
    return {"pre": pre, "post": post}, grad, cotangent


def _credit_q(analysis, plan, credit, values, traces) -> jax.Array:
    """The credit trace's new value: `q ← λ q + P·ε` (P the sensitivity of the readout's input to the
    source group's new values), with ε the source's factor `ε^f` or its per-weight trace."""
    source = analysis.relations[credit.source]
    source_group = analysis.group_named(source.group)
    sensitivity = derive.pre_sensitivity(analysis, credit.link, source_group, values)  # (..., N, S)
    trace = traces[plan.key(credit.source)]
    if _factorised(plan, source):
        return credit.decay * traces[credit.key] + jnp.sum(sensitivity * trace["post"], axis=-1)
    eps = trace["filtered"] if plan.kappa is not None else trace["eps"]
    layout = make_layout(_kind(analysis, source), analysis, source, values)
    facts = analysis.facts.propagation.of(credit.link)
    states = [s for s, leaf in enumerate(source_group.leaves) if ("new", leaf) in facts]  # others: ∂u/∂h ≡ 0
    contracted = _contract(layout, sensitivity, eps, states)
    return credit.decay * traces[credit.key] + (0.0 if contracted is None else contracted)


def _advance_credit(analysis, plan, credit, values, traces) -> dict:
    return {**traces, credit.key: _credit_q(analysis, plan, credit, values, traces)}


def _apply_credit(analysis, plan, credit, values, derivs, delta_new, traces, grads, step):
    relations = analysis.relations
    source, via = relations[credit.source], relations[credit.via]
    readout_group = analysis.group_named(credit.group)
    _, f_readout = derivs[credit.group]
    signal = jnp.sum(_group_delta(readout_group, delta_new) * f_readout[credit.via], axis=-1)
    carried = derive.credit(
        analysis, via.contraction, values, derive.to_op_layout(via, signal), plan.feedback.get(via.contraction)
    )  # in the layout of the readout's presynaptic input
    pre_var = analysis.facts.contractions[via.contraction].pre_var
    carried = derive.pullback(analysis, values, credit.link, pre_var, carried)  # (..., neurons of the source)
    q = _credit_q(analysis, plan, credit, values, traces)
    traces = {**traces, credit.key: q}
    cotangent = None
    if _factorised(plan, source):  # its weight product is taken once, with the trace's own cotangent
        correction = 1 - plan.decay ** (step.astype(q.dtype) + 1)
        cotangent = derive.to_op_layout(source, carried * q) / correction
        grad = None
    else:
        layout = make_layout(_kind(analysis, source), analysis, source, values)
        grad = layout.reduce(layout.gather(carried) * q)
    grads = dict(grads)
    if grad is not None:
        grads[source.weight_leaf] = grads[source.weight_leaf] + grad
    return traces, grads, cotangent
