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
from jax import lax

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
    shares: int | None = None  # es_d_rtrl: the source whose q this credit's equals (same postsynaptic factor)

    @property
    def key(self) -> str:
        return f"q{self.source}_{self.via}"

    @property
    def q_key(self) -> str:
        """Where its credit trace q lives (another credit's, when it shares it)."""
        return self.key if self.shares is None else f"q{self.shares}_{self.via}"


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
    credits = _credits(analysis, algorithm, traced, values, notes)
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


def _credits(analysis: Analysis, algorithm: str, traced, values, notes) -> tuple[Credit, ...]:
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
                    owner = post_owner(algorithm, relations, k)
                    shares = owner if owner != k and owner in sources else None
                    credits.append(Credit(k, via, group.name, decay, link, shares))
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


def post_owner(algorithm: str, relations, index: int) -> int:
    """The relation whose es_d_rtrl postsynaptic factor this one uses: its own, or that of the relation
    whose op output enters the group summed with its own (`Relation.same_injection`: the same F)."""
    relation = relations[index]
    if algorithm != "es_d_rtrl" or relation.elementwise or relation.same_injection is None:
        return index
    return relation.same_injection


def init_traces(analysis: Analysis, plan: Plan) -> dict:
    traces = {}
    for index in plan.traced:
        relation = analysis.relations[index]
        group = analysis.group_named(relation.group)
        leaf = analysis.captured.leaves[relation.weight_leaf]
        dtype = leaf.dtype
        if _factorised(plan, relation):
            contraction = analysis.facts.contractions[relation.contraction]
            traces[plan.key(index)] = {"pre": jnp.zeros(contraction.pre_var.aval.shape, dtype)}
            if post_owner(plan.algorithm, analysis.relations, index) == index:
                traces[plan.key(index)]["post"] = jnp.zeros((*group.shape, group.n_states), dtype)
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
        traces[credit.q_key] = jnp.zeros(shape, dtype)
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
        owners = {i: post_owner(plan.algorithm, relations, i) for i in indices}
        needs_f = [i for i in indices if owners[i] == i]  # a shared postsynaptic factor needs one F
        d, f_list = derive.transition_derivatives(analysis, group, [relations[i] for i in needs_f], values)
        f = dict(zip(needs_f, f_list, strict=True))
        derivs[name] = (d, f)
        group_signals = None if signals is None else tuple(_group_delta(group, delta) for delta in signals)
        posts = {}  # owner -> (previous, new) postsynaptic factor
        for index in indices:
            relation = relations[index]
            if not _factorised(plan, relation):
                new_traces[plan.key(index)], grad, cotangent = _per_weight_update(
                    analysis, plan, relation, values, d, f[index], traces[plan.key(index)], group_signals, step
                )
            else:
                owner = owners[index]
                if owner == index:
                    previous = traces[plan.key(index)]["post"]
                    posts[index] = (previous, _es_post(plan, d, f[index], previous))
                post_prev, post = posts[owner]
                new_traces[plan.key(index)], grad, cotangent = _es_update(
                    analysis,
                    plan,
                    relation,
                    values,
                    traces[plan.key(index)]["pre"],
                    post_prev,
                    post,
                    group_signals,
                    step,
                )
                if owner == index:
                    new_traces[plan.key(index)]["post"] = posts[index][1]
            if grad is not None:
                terms.append((relation.weight_leaf, grad))
            if cotangent is not None:
                cotangents[index] = cotangent
    return new_traces, derivs, terms, cotangents


def _contract(layout, signal, trace, states) -> jax.Array | None:
    """`Σ_s gather(signal_s) · trace_s` over `states`, per batch entry, in the trace's layout; None when
    `states` is empty. `signal` and `trace` hold one array per state."""
    total = None
    for s in states:
        term = layout.gather(signal[s]) * trace[s]
        total = term if total is None else total + term
    return total


def _per_state(x: jax.Array) -> tuple[jax.Array, ...]:
    """`x (..., S)` as S arrays `(...)`. Passed through a barrier, each becomes a contiguous array for the
    trace arithmetic to read at every weight element; a strided slice of `x` there was not vectorised."""
    return tuple(x[..., s] for s in range(x.shape[-1]))


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
    read = _output_sources(analysis)
    prev_read = any(("hidden", leaf) in read for leaf in leaves)
    return (
        {s: tuple(sorted(reads[s])) for s in range(len(leaves))},
        tuple(s for s in range(len(leaves)) if injected[s]),
        prev_read,
    )


def _per_weight_update(analysis, plan, relation, values, d, f, trace, signals, step):
    """d_rtrl / e_prop: the new per-weight trace and, given `signals` = `(δ, δ_prev)`, its gradient.

    The trace is memory-bound (a dense one is `B · n_pre · n_post` per state), so each array should be
    overwritten in place (with the state donated), not copied: the states are updated one at a time, each
    after every state whose update reads its old array (`_update_order`), and optimisation barriers hold
    XLA to that order and keep it from recomputing a new array from an overwritten old one inside the
    gradient. The per-neuron factors are settled first (one contiguous array per state, `_per_state`): else
    XLA recomputes them, or reads them strided, at every weight element."""
    layout = make_layout(_kind(analysis, relation), analysis, relation, values)
    reads, injected, prev_read = _structure(analysis, relation)
    d = tuple(_per_state(d[..., s, :]) for s in range(d.shape[-1]))  # d[s][t] = D_st
    f, signals = _per_state(f), None if signals is None else tuple(map(_per_state, signals))
    d, f, signals = lax.optimization_barrier((d, f, signals))
    old = dict(enumerate(trace["eps"]))  # the old arrays still to be read
    filtered = trace.get("filtered")
    previous = None
    if signals is not None and prev_read:  # δ_prev·ε_{t-1}, formed before the old arrays are overwritten
        used_prev = old if filtered is None else dict(enumerate(filtered))
        previous = layout.reduce([(signals[1][s], used) for s, used in used_prev.items()])
        previous, old, filtered = lax.optimization_barrier((previous, old, filtered))
    order = _update_order(reads)
    eps = {}
    for k, s in enumerate(order):
        value = _contract(layout, d[s], old, reads[s])
        if s in injected:
            value = layout.inject(f[s]) if value is None else value + layout.inject(f[s])
        if not any(s in reads[r] for r in order[k + 1 :]):
            del old[s]
        value = jnp.zeros_like(trace["eps"][s]) if value is None else value
        eps[s], old = lax.optimization_barrier((value, old))
    new = {"eps": tuple(eps[s] for s in range(len(order)))}
    used = new["eps"]
    if plan.kappa is not None:
        used = tuple(plan.kappa * p + e for p, e in zip(filtered, used, strict=True))
        new["filtered"] = used
    read = _read_states(analysis, relation)
    if signals is None or not read:
        return new, previous, None
    settled = lax.optimization_barrier([used[s] for s in read])
    grad = layout.reduce([(signals[0][s], e) for s, e in zip(read, settled, strict=True)])
    return new, grad if previous is None else grad + previous, None


def _read_states(analysis: Analysis, relation) -> tuple[int, ...]:
    """The states of the relation's group whose new values the outputs read, directly or through a
    contraction's input (an instantaneous readout): `δ_new ≡ 0` for the others, whose credit reaches the
    loss only through other groups' states (the cross-group credit)."""
    read = _output_sources(analysis)
    return tuple(s for s, leaf in enumerate(analysis.group_named(relation.group).leaves) if ("new", leaf) in read)


def _output_sources(analysis: Analysis) -> set:
    """The sources the step's outputs read, directly or through a contraction's input (a readout of this
    step's or of the previous step's values)."""
    facts = analysis.facts
    outputs = analysis.captured.jaxpr.jaxpr.outvars[: analysis.captured.n_outputs]
    pending = [source for v in outputs for source in facts.propagation.of(v)]
    seen = set()
    while pending:
        source = pending.pop()
        if source in seen:
            continue
        seen.add(source)
        if source[0] == "relation":  # a contraction's output: its input's sources
            pending.extend(facts.contractions[source[1]].pre_fact)
    return seen


def _update_order(reads: dict[int, tuple[int, ...]]) -> list[int]:
    """The states in an order where each comes after every other state whose update reads its old trace,
    so that its new trace can overwrite the old one in place. States that read each other in a cycle
    keep their index order (XLA then copies an array)."""
    order, left = [], sorted(reads)
    while left:
        ready = [s for s in left if not any(s in reads[r] for r in left if r != s)]
        order.append((ready or left)[0])
        left.remove(order[-1])
    return order


def _es_post(plan: Plan, d, f, previous) -> jax.Array:
    """es_d_rtrl's new postsynaptic factor `ε^f ← β D ε^f + b F`."""
    _, post_decay, post_gain = _factor_gains(plan.factorisation, plan.decay)
    return post_decay * jnp.einsum("...st,...t->...s", d, previous) + post_gain * f


def _es_update(analysis, plan, relation, values, pre_prev, post_prev, post, signals, step):
    """es_d_rtrl: the new presynaptic factor (`{"pre": ...}`) and, given `signals` = `(δ, δ_prev)`, the
    op-layout cotangent of this step's gradient (plus the δ_prev term, formed here), from the
    postsynaptic factor's previous and new values."""
    alpha = plan.decay
    pre_gain, _, _ = _factor_gains(plan.factorisation, alpha)
    eqn = analysis.facts.contractions[relation.contraction].eqn
    u = derive.op_input(eqn, values.u[relation.contraction], pre_prev.dtype)
    pre = alpha * pre_prev + pre_gain * u
    if signals is None:
        return {"pre": pre}, None, None
    delta, delta_prev = signals
    correction = 1 - alpha ** (step.astype(post.dtype) + 1)
    cotangent = derive.to_op_layout(relation, jnp.sum(delta * post, axis=-1)) / correction
    grad = None
    if _structure(analysis, relation)[2]:  # the output reads the previous values: δ_prev·ε_{t-1}
        prev_correction = jnp.where(step > 0, 1 - alpha ** step.astype(post.dtype), 1.0)
        cotangent_prev = derive.to_op_layout(relation, jnp.sum(delta_prev * post_prev, axis=-1)) / prev_correction
        grad = derive.weight_vjp(analysis, relation.contraction, values, pre_prev, cotangent_prev, float_input=True)
    return {"pre": pre}, grad, cotangent


def _credit_q(analysis, plan, credit, values, traces) -> jax.Array:
    """The credit trace's new value: `q ← λ q + P·ε` (P the sensitivity of the readout's input to the
    source group's new values), with ε the source's factor `ε^f` or its per-weight trace."""
    source = analysis.relations[credit.source]
    if not _factorised(plan, source):
        return _per_weight_credit(analysis, plan, credit, values, traces, None)[0]
    sensitivity = derive.pre_sensitivity(analysis, credit.link, analysis.group_named(source.group), values)
    post = traces[plan.key(post_owner(plan.algorithm, analysis.relations, credit.source))]["post"]
    return credit.decay * traces[credit.q_key] + jnp.sum(sensitivity * post, axis=-1)


def _per_weight_credit(analysis, plan, credit, values, traces, carried) -> tuple[jax.Array, jax.Array | None]:
    """A per-weight credit trace's new value `q ← λ q + P·ε` and, given the `carried` credit (neuron layout),
    its gradient `Σ_b gather(carried)·q`, with the barriers of `_per_weight_update` (q is overwritten in
    place; the gradient reads it once it is settled)."""
    source = analysis.relations[credit.source]
    source_group = analysis.group_named(source.group)
    sensitivity = derive.pre_sensitivity(analysis, credit.link, source_group, values)  # (..., N, S)
    trace = traces[plan.key(credit.source)]
    eps = trace["filtered"] if plan.kappa is not None else trace["eps"]
    layout = make_layout(_kind(analysis, source), analysis, source, values)
    facts = analysis.facts.propagation.of(credit.link)
    states = [s for s, leaf in enumerate(source_group.leaves) if ("new", leaf) in facts]  # others: ∂u/∂h ≡ 0
    sensitivity, carried = lax.optimization_barrier((_per_state(sensitivity), carried))  # computed once
    contracted = _contract(layout, sensitivity, eps, states)
    q = credit.decay * traces[credit.key] + (0.0 if contracted is None else contracted)
    if carried is None:
        return q, None
    q = lax.optimization_barrier(q)
    return q, layout.reduce([(carried, q)])


def _advance_credit(analysis, plan, credit, values, traces) -> dict:
    if credit.shares is not None:  # its q is another credit's, advanced already
        return traces
    return {**traces, credit.key: _credit_q(analysis, plan, credit, values, traces)}


def _apply_credit(analysis, plan, credit, values, derivs, delta_new, traces, grads, step):
    relations = analysis.relations
    source, via = relations[credit.source], relations[credit.via]
    readout_group = analysis.group_named(credit.group)
    _, f_readout = derivs[credit.group]
    signal = jnp.sum(
        _group_delta(readout_group, delta_new) * f_readout[post_owner(plan.algorithm, relations, credit.via)], axis=-1
    )
    carried = derive.credit(
        analysis, via.contraction, values, derive.to_op_layout(via, signal), plan.feedback.get(via.contraction)
    )  # in the layout of the readout's presynaptic input
    pre_var = analysis.facts.contractions[via.contraction].pre_var
    carried = derive.pullback(analysis, values, credit.link, pre_var, carried)  # (..., neurons of the source)
    cotangent = None
    if _factorised(plan, source):  # its weight product is taken once, with the trace's own cotangent
        # a shared q was advanced by the credit that owns it (credits run in source order)
        q = traces[credit.q_key] if credit.shares is not None else _credit_q(analysis, plan, credit, values, traces)
        correction = 1 - plan.decay ** (step.astype(q.dtype) + 1)
        cotangent = derive.to_op_layout(source, carried * q) / correction
        grad = None
    else:
        q, grad = _per_weight_credit(analysis, plan, credit, values, traces, carried)
    traces = {**traces, credit.q_key: q}
    grads = dict(grads)
    if grad is not None:
        grads[source.weight_leaf] = grads[source.weight_leaf] + grad
    return traces, grads, cotangent
