"""es_d_rtrl's factorised trace: a presynaptic and a postsynaptic factor per relation, O(B·(I + N·S)).

Consumes: an `Analysis`, a traced relation, the step's values, the relation's derivatives `D` and `F`
and its factors' previous values. Produces the factors' new values and, given the learning signals,
the op-layout cotangents of the step's gradient (the weight product `(∂y(ε^u, W)/∂W)ᵀ c` is taken once
per relation and presynaptic factor, by `fuse`, after every cotangent is summed — or, in a sequence,
once per chunk of steps: `sequence`).

    ε^u ← α ε^u + a·u,     ε^f ← β·D ε^f + b·F,     grad = (∂y(ε^u, W)/∂W)ᵀ (δ·ε^f) / (1 − α^{t+1})

with `(a, β, b)` by factorisation ("filtered", "averaged"). Relations whose op outputs enter their group
through one sum share one postsynaptic factor (`post_owner`). The factorisations "matched" and "low_rank"
keep a sum of K such pairs (`passes.components`); this module is the one entry point for all of them
(`init_factors`, `update_owner`, `weight_product`, the credit-chain hooks).
"""

import functools

import jax
import jax.numpy as jnp

from fusetrace.errors import CompileError, four_part

from . import components, derive
from .structure import prev_read_states

# es_d_rtrl's two factorisations of the trace ε ≈ ε^u ⊗ ε^f, as (pre gain, post decay, post gain) in
#   ε^u ← α ε^u + a·u,   ε^f ← β·D ε^f + b·F     (α the `decay`; the gradient divides by 1 − α^{t+1})
# "filtered": both factors low-pass filtered with α (pp-prop's choice): a=1, β=α, b=1−α. Its magnitude
#   comes out near (1−α)/(1−αλ) of the true one on a neuron of decay λ.
# "averaged": ε^u the bias-corrected moving average of u, ε^f the exact d_rtrl sensitivity to a constant
#   input (a=1−α, β=1, b=1); exact (equal to d_rtrl) whenever u is constant in time.
# "matched" and "low_rank": a sum of K pairs, filters matched to the group's own dynamics or the best
#   rank-r trace (`passes.components`).
FACTORISATIONS = ("filtered", "averaged", *components.COMPONENT_FACTORISATIONS)


DEFAULT_RANK = 4  # "low_rank": components per batch entry (chosen by measurement: docs/results.md)


def check_options(analysis, algorithm: str, factorisation: str, rank, traced, rank_metric=None) -> tuple[int, str]:
    """The rank and truncation norm the plan keeps (`DEFAULT_RANK` and "plain" for None). Raises
    `CompileError` for a `rank` or `rank_metric` given to another algorithm or factorisation than
    es_d_rtrl's "low_rank", a `rank` that is not a positive int, an unknown `rank_metric`, or a "low_rank"
    relation whose presynaptic input has no leading batch axis (its basis is kept per batch entry)."""
    low_rank = algorithm == "es_d_rtrl" and factorisation == "low_rank"
    for option, value in (("rank", rank), ("rank_metric", rank_metric)):
        if value is not None and not low_rank:
            raise CompileError(
                four_part(
                    what=f"{option}={value!r} with algorithm={algorithm!r}, factorisation={factorisation!r}",
                    where=f"fusetrace.compile(..., {option}=...)",
                    why="only es_d_rtrl's 'low_rank' factorisation keeps a trace of a chosen rank",
                    fix=f"drop {option}, or pass algorithm='es_d_rtrl', factorisation='low_rank'",
                )
            )
    rank_metric = "plain" if rank_metric is None else rank_metric
    if rank_metric not in components.RANK_METRICS:
        raise CompileError(
            four_part(
                what=f"rank_metric={rank_metric!r}",
                where="fusetrace.compile(..., rank_metric=...)",
                why="the low-rank truncation keeps the trace's best rank-r part in the trace's own norm "
                "('plain'), with every hidden state's block scaled to unit norm ('balanced'), or weighed by how "
                "the neurons' spikes read each state through the group's dynamics ('spike')",
                fix=f"pass one of {', '.join(map(repr, components.RANK_METRICS))}",
            )
        )
    rank = DEFAULT_RANK if rank is None else rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CompileError(
            four_part(
                what=f"rank={rank!r}",
                where="fusetrace.compile(..., rank=...)",
                why="es_d_rtrl's 'low_rank' factorisation keeps a trace of that rank per batch entry",
                fix="pass a positive int (memory grows with it: rank·(n_pre + n_post·S) per batch entry)",
            )
        )
    if not low_rank or analysis.batch_size is None:
        return rank, rank_metric
    for index in traced:
        relation = analysis.relations[index]
        if relation.elementwise:
            continue
        shape = analysis.facts.contractions[relation.contraction].pre_var.aval.shape
        if components.pre_batch_axis(analysis, relation) is None:
            raise CompileError(
                four_part(
                    what=f"factorisation='low_rank' for `{relation.weight}`",
                    where=f"its `{relation.op}`, whose input has shape {tuple(shape)}",
                    why="the low-rank basis is kept per batch entry, and no axis of the input is known to be the "
                    f"batch ({analysis.batch_size}): it is not the leading one, nor a batched state's or input's",
                    fix="use factorisation='matched' for this model",
                )
            )
    return rank, rank_metric


def has_components(plan) -> bool:
    """Whether the plan's factors carry a leading component axis (K pairs)."""
    return plan.algorithm == "es_d_rtrl" and plan.factorisation in components.COMPONENT_FACTORISATIONS


def factor_gains(factorisation: str, alpha: float) -> tuple[float, float, float]:
    if factorisation == "filtered":
        return 1.0, alpha, 1.0 - alpha
    return 1.0 - alpha, 1.0, 1.0


def factorised(algorithm: str, relation) -> bool:
    """Whether the relation's trace is es_d_rtrl's pair of factors. Element-wise parameters keep their
    exact per-neuron trace under every algorithm (it is already O(N)). A binary event op factorises too:
    its presynaptic factor filters the op's activity mask, and its gradient is formed with the op's
    value-weighted twin (`derive.op_output`). A product with one constant presynaptic element (a bias
    written as `ones @ b`, `Relation.per_neuron`) keeps its per-weight trace: it is a per-neuron trace. So
    does a relation into a small linear time-invariant group (`Relation.small_lti`, a readout): its
    per-weight trace is exact and at most `relations.SMALL_LTI` times its presynaptic factor, where one
    pair of factors is exact only when the decay is every unit's own (a readout's gradient at decay 0.99
    had cosine 0.67 against BPTT's on a trained network, docs/results.md)."""
    return algorithm == "es_d_rtrl" and not relation.elementwise and not relation.keeps_trace


def post_owner(algorithm: str, relations, index: int) -> int:
    """The relation whose es_d_rtrl postsynaptic factor this one uses: its own, or that of the relation
    whose op output enters the group summed with its own (`Relation.same_injection`: the same F)."""
    relation = relations[index]
    if not factorised(algorithm, relation) or relation.same_injection is None:
        return index
    owner = relation.same_injection
    return owner if factorised(algorithm, relations[owner]) else index


def bias_correction(decay: float, step: jax.Array, dtype) -> jax.Array:
    """`1 − α^{t+1}` at step `t` (counted from 0): the weight of the presynaptic factor's moving sum."""
    return 1 - decay ** (step.astype(dtype) + 1)


def es_post(plan, d: jax.Array, f: jax.Array, previous: jax.Array) -> jax.Array:
    """The new postsynaptic factor `ε^f ← β D ε^f + b F`."""
    _, post_decay, post_gain = factor_gains(plan.factorisation, plan.decay)
    return post_decay * derive.apply_d(d, previous) + post_gain * f


def es_update(analysis, plan, index: int, values, pre_prev, post_prev, post, signals, step):
    """The new presynaptic factor (`{"pre": ...}`) of relation `index` and, given `signals` = `(δ, δ_prev)`,
    the op-layout cotangents of this step's gradient, from the postsynaptic factor's previous and new
    values: `(factors, cotangents)`, keyed `(index, "now")` (to pair with the new presynaptic factor) and,
    when the outputs read the previous values, `(index, "prev")` (δ_prev·ε_{t-1}: with the previous one).
    The weight products `(∂y(ε^u, W)/∂W)ᵀ c` are formed by `fuse`, once per key."""
    relation = analysis.relations[index]
    alpha = plan.decay
    pre_gain, _, _ = factor_gains(plan.factorisation, alpha)
    eqn = analysis.facts.contractions[relation.contraction].eqn
    u = derive.op_input(eqn, values.u[relation.contraction], pre_prev.dtype)
    pre = alpha * pre_prev + pre_gain * u
    if signals is None:
        return {"pre": pre}, {}
    delta, delta_prev = signals
    states = range(post.shape[-1])
    signal = components.state_sum(delta, post, states)
    cotangents = {(index, "now"): now_cotangent(analysis, plan, relation, signal, step)}
    if prev_read_states(analysis, analysis.group_named(relation.group)):  # δ_prev·ε_{t-1}
        signal = components.state_sum(delta_prev, post_prev, states)
        cotangents[(index, "prev")] = prev_cotangent(analysis, plan, relation, signal, step)
    return {"pre": pre}, cotangents


def now_cotangent(analysis, plan, relation, signal: jax.Array, step) -> jax.Array:
    """The op-layout cotangent `signal / (1 − α^{t+1})` to pair with this step's presynaptic factor
    (`signal` in the group layout; with a leading component axis under "matched" / "low_rank", which
    need no bias correction)."""
    if has_components(plan):
        return components.to_op_layout(analysis, relation, signal)
    return derive.to_op_layout(relation, signal) / bias_correction(plan.decay, step, signal.dtype)


def prev_cotangent(analysis, plan, relation, signal: jax.Array, step) -> jax.Array:
    """The op-layout cotangent `signal / (1 − α^t)` of a term read from LAST step's factors (the previous
    presynaptic factor pairs with the previous postsynaptic one)."""
    if has_components(plan):
        return components.to_op_layout(analysis, relation, signal)
    correction = jnp.where(step > 0, 1 - plan.decay ** step.astype(signal.dtype), 1.0)
    return derive.to_op_layout(relation, signal) / correction


def init_factors(analysis, plan, index: int) -> dict:
    """Zero factors of relation `index`: `{"pre": ...}`, plus the postsynaptic factor (and the state of a
    "matched" / "low_rank" owner) when the relation owns it."""
    relation = analysis.relations[index]
    owner = post_owner(plan.algorithm, analysis.relations, index) == index
    if has_components(plan):
        return components.init(analysis, plan, index, owner)
    group = analysis.group_named(relation.group)
    dtype = analysis.captured.leaves[relation.weight_leaf].dtype
    factors = {"pre": jnp.zeros(analysis.facts.contractions[relation.contraction].pre_var.aval.shape, dtype)}
    if owner:
        factors["post"] = jnp.zeros((*group.shape, group.n_states), dtype)
    return factors


def update_owner(analysis, plan, owner: int, members, values, d, f, traces: dict, signals, step):
    """One step of the factors of `owner` and of the `members` sharing its postsynaptic factor (the owner
    first): `({trace key: new factors}, {(index, "now" or "prev"): op-layout cotangent})`, the cotangents
    only given `signals` = `(δ, δ_prev)` in the group layout. `d`: the group's D, `f`: the owner's F."""
    if has_components(plan):
        return components.update(analysis, plan, owner, members, values, d, f, traces, signals, step)
    previous = traces[plan.key(owner)]["post"]
    post = es_post(plan, d, f, previous)
    new, cotangents = {}, {}
    for index in members:
        key = plan.key(index)
        new[key], more = es_update(analysis, plan, index, values, traces[key]["pre"], previous, post, signals, step)
        cotangents.update(more)
    new[plan.key(owner)]["post"] = post
    return new, cotangents


def weight_product(analysis, plan, relation, values, pre, cotangent) -> jax.Array:
    """`(∂y(ε^u, W)/∂W)ᵀ c` summed over the batch (and over the components, when the factors have them)."""
    if has_components(plan):
        pre = components.components_first(analysis, relation, pre)
        return derive.weight_vjp_over_time(analysis, relation.contraction, values, pre, cotangent)
    return derive.weight_vjp(analysis, relation.contraction, values, pre, cotangent, float_input=True)


def per_step_products(analysis, plan, relation, pre: jax.Array, cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Deferred products stacked over time as one stack of single products: `pre` `(T, B, K, ...)` and
    `cotangent` `(T, K, ...)` with their component axis folded into the time axis (`pre` in the op's
    input layout)."""
    if not has_components(plan):
        return pre, cotangent
    first = jnp.swapaxes(pre, 1, 2)  # (T, K, B, ...)
    count = first.shape[0] * first.shape[1]
    stacked = components.in_input_layout(analysis, relation, jnp.reshape(first, (count, *first.shape[2:])))
    return stacked, jnp.reshape(cotangent, (count, *cotangent.shape[2:]))


def n_products(plan, analysis, index: int) -> int:
    """Weight products per step of relation `index` (the number of components)."""
    if not has_components(plan):
        return 1
    return components.n_components(analysis, plan, post_owner(plan.algorithm, analysis.relations, index))


def chain_shape(analysis, plan, owner: int) -> tuple[int, ...]:
    """The shape of a credit-chain trace of the factorised relation `owner`: its group's neuron layout
    (per component)."""
    if has_components(plan):
        return components.chain_shape(analysis, plan, owner)
    return tuple(analysis.group_named(analysis.relations[owner].group).shape)


def chain_injection(analysis, plan, factors: dict, p: jax.Array, states) -> jax.Array:
    """What enters a credit chain from a factorised owner: `Σ_s p_s ε^f_s` over the link's `states`."""
    if has_components(plan):
        return components.chain_injection(analysis, plan, factors, p, states)
    return components.state_sum(p, factors["post"], states)


def chain_signal(analysis, plan, factors: dict, pulled: dict, q: dict) -> jax.Array:
    """The group-layout signal a credit chain's gradient term pairs with the owner's presynaptic factor:
    `Σ_s pull(δ)_s · q_s` (with the owner's `factors` of the same step)."""
    if has_components(plan):
        return components.chain_signal(analysis, plan, factors, pulled, q)
    return functools.reduce(jnp.add, [pulled[s] * q[s] for s in pulled])


def align_chains(analysis, plan, old: dict, new: dict) -> dict:
    """`old` traces as the credit chains must read them after this step's own updates (`new`): rotated
    into the new basis under "low_rank", unchanged otherwise."""
    if not has_components(plan):
        return old
    return components.align_chains(analysis, plan, old, new)


_METRIC_NOTE = {
    "plain": "",
    "balanced": ", truncated with every hidden state's block of the trace scaled to unit norm ('balanced')",
    "spike": ", truncated in the norm of how the neurons' spikes read each state through the group's "
    "dynamics ('spike')",
}


def _metric_note(analysis, plan, owner: int) -> str:
    norm = components.truncation_norm(analysis, plan, owner)
    note = _METRIC_NOTE[norm]
    if norm != plan.rank_metric and plan.rank_metric != "plain":
        why = "one state: every norm is the plain one" if norm == "plain" else "no spike"
        note += f" ('{plan.rank_metric}' asked; the group has {why})"
    return note


def describe(analysis, plan, index: int) -> str:
    """The line `explain` prints for a factorised relation: which factorisation, with what."""
    if plan.factorisation == "low_rank":
        owner = post_owner(plan.algorithm, analysis.relations, index)
        k = components.n_components(analysis, plan, owner)
        return (
            f"es_d_rtrl keeps its trace as the best rank-{k} approximation per batch entry ('low_rank' factors, "
            f"rank {plan.rank}{'' if k == plan.rank else f' capped at {k}, the largest the trace can have'}"
            f"{_metric_note(analysis, plan, owner)}): exact while the trace's rank stays within it"
        )
    if plan.factorisation == "matched":
        return (
            "es_d_rtrl factorises its trace with presynaptic filters matched to the group's own dynamics "
            "('matched' factors, one per state): exact for a linear time-invariant group"
        )
    return f"es_d_rtrl factorises its trace ('{plan.factorisation}' factors, decay {plan.decay})"


def memory_note(plan) -> str:
    """How the trace memory of `plan` grows, for `summary()`: empty unless es_d_rtrl."""
    if plan.algorithm != "es_d_rtrl":
        return ""
    if plan.factorisation == "low_rank":
        pairs = f"r = {plan.rank} pairs of factors (capped per relation at min(n_pre, N·S))"
        if plan.rank_metric != "plain":
            pairs += f", '{plan.rank_metric}' truncation"
        if plan.rank_metric == "spike":
            pairs += " with an S×S metric per neuron (in a spiking group of several states)"
    elif plan.factorisation == "matched":
        pairs = "S pairs of factors (one filter per state)"
    else:
        pairs = "one pair of factors"
    return f" (es_d_rtrl '{plan.factorisation}': {pairs} per relation, O(B·(I + N·S)) each)"


def trace_shapes(analysis, plan, index: int) -> tuple[tuple[int, ...], ...]:
    """The shapes of relation `index`'s factors (for `summary()`): none is n_pre × n_post."""
    return tuple(tuple(x.shape) for x in init_factors(analysis, plan, index).values())


def dense_trace(analysis, plan, traces: dict, key: str, index: int, step) -> jax.Array:
    """The per-weight trace the factors stand for, `(batch, n_pre, n_post, S)` (or, for a credit chain
    `key`, one array per carried state stacked last): `ε^u ⊗ ε^f / (1 − α^{t+1})`. For tests and
    diagnosis only (it is the n_pre × n_post array the factorisation avoids); `step` is the step counter
    before the step that produced `traces`."""
    owner = post_owner(plan.algorithm, analysis.relations, index)
    if has_components(plan):
        return components.dense_trace(analysis, plan, traces, key, index, owner)
    pre = traces[plan.key(index)]["pre"]
    post = traces[plan.key(owner)]["post"] if key == plan.key(index) else jnp.stack(list(traces[key]), axis=-1)
    scale = 1 / bias_correction(plan.decay, step, pre.dtype)
    return scale * pre[:, :, None, None] * post[:, None, :, :]
