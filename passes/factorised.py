"""es_d_rtrl's factorised trace: a presynaptic and a postsynaptic factor per relation, O(B·(I + N·S)).

Consumes: an `Analysis`, a traced relation, the step's values, the relation's derivatives `D` and `F`
and its factors' previous values. Produces the factors' new values and, given the learning signals,
the op-layout cotangents of the step's gradient (the weight product `(∂y(ε^u, W)/∂W)ᵀ c` is taken once
per relation and presynaptic factor, by `fuse`, after every cotangent is summed — or, in a sequence,
once per chunk of steps: `sequence`).

    ε^u ← α ε^u + a·u,     ε^f ← β·D ε^f + b·F,     grad = (∂y(ε^u, W)/∂W)ᵀ (δ·ε^f) / (1 − α^{t+1})

with `(a, β, b)` by factorisation (`FACTORISATIONS`). Relations whose op outputs enter their group
through one sum share one postsynaptic factor (`post_owner`).
"""

import jax
import jax.numpy as jnp

from . import derive
from .structure import prev_read_states

# es_d_rtrl's two factorisations of the trace ε ≈ ε^u ⊗ ε^f, as (pre gain, post decay, post gain) in
#   ε^u ← α ε^u + a·u,   ε^f ← β·D ε^f + b·F     (α the `decay`; the gradient divides by 1 − α^{t+1})
# "filtered": both factors low-pass filtered with α (pp-prop's choice): a=1, β=α, b=1−α. Its magnitude
#   comes out near (1−α)/(1−αλ) of the true one on a neuron of decay λ.
# "averaged": ε^u the bias-corrected moving average of u, ε^f the exact d_rtrl sensitivity to a constant
#   input (a=1−α, β=1, b=1); exact (equal to d_rtrl) whenever u is constant in time.
FACTORISATIONS = ("filtered", "averaged")


def factor_gains(factorisation: str, alpha: float) -> tuple[float, float, float]:
    if factorisation == "filtered":
        return 1.0, alpha, 1.0 - alpha
    return 1.0 - alpha, 1.0, 1.0


def factorised(algorithm: str, relation) -> bool:
    """Whether the relation's trace is es_d_rtrl's pair of factors. Element-wise parameters keep their
    exact per-neuron trace under every algorithm (it is already O(N)). A binary event op factorises too:
    its presynaptic factor filters the op's activity mask, and its gradient is formed with the op's
    value-weighted twin (`derive.op_output`)."""
    return algorithm == "es_d_rtrl" and not relation.elementwise


def post_owner(algorithm: str, relations, index: int) -> int:
    """The relation whose es_d_rtrl postsynaptic factor this one uses: its own, or that of the relation
    whose op output enters the group summed with its own (`Relation.same_injection`: the same F)."""
    relation = relations[index]
    if algorithm != "es_d_rtrl" or relation.elementwise or relation.same_injection is None:
        return index
    return relation.same_injection


def bias_correction(decay: float, step: jax.Array, dtype) -> jax.Array:
    """`1 − α^{t+1}` at step `t` (counted from 0): the weight of the presynaptic factor's moving sum."""
    return 1 - decay ** (step.astype(dtype) + 1)


def es_post(plan, d: jax.Array, f: jax.Array, previous: jax.Array) -> jax.Array:
    """The new postsynaptic factor `ε^f ← β D ε^f + b F`."""
    _, post_decay, post_gain = factor_gains(plan.factorisation, plan.decay)
    return post_decay * jnp.einsum("...st,...t->...s", d, previous) + post_gain * f


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
    cotangents = {(index, "now"): now_cotangent(plan, relation, jnp.sum(delta * post, axis=-1), step)}
    if prev_read_states(analysis, analysis.group_named(relation.group)):  # δ_prev·ε_{t-1}
        signal = jnp.sum(delta_prev * post_prev, axis=-1)
        cotangents[(index, "prev")] = prev_cotangent(plan, relation, signal, step)
    return {"pre": pre}, cotangents


def now_cotangent(plan, relation, signal: jax.Array, step) -> jax.Array:
    """The op-layout cotangent `signal / (1 − α^{t+1})` to pair with this step's presynaptic factor
    (`signal` in the group layout)."""
    return derive.to_op_layout(relation, signal) / bias_correction(plan.decay, step, signal.dtype)


def prev_cotangent(plan, relation, signal: jax.Array, step) -> jax.Array:
    """The op-layout cotangent `signal / (1 − α^t)` of a term read from LAST step's factors (the previous
    presynaptic factor pairs with the previous postsynaptic one)."""
    correction = jnp.where(step > 0, 1 - plan.decay ** step.astype(signal.dtype), 1.0)
    return derive.to_op_layout(relation, signal) / correction
