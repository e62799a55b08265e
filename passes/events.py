"""Event-driven deferred contraction: es_d_rtrl's binary CSR products summed over a chunk of steps.

Consumes: one factorised relation whose op is a binary CSR product with the presynaptic neurons as its
rows (`spikes @ W`, one weight per connection) and, for a chunk of steps t0..t1, the presynaptic factor
before the chunk `ε^u_{t0-1}`, the op's activity masks `u_t` and the op-layout cotangents `c_t` (paired
with `ε^u_t`) and, where the outputs read last step's values, `c'_t` (paired with `ε^u_{t-1}`).
Produces `Σ_t (∂y(ε^u_t, W)/∂W)ᵀ c_t + (∂y(ε^u_{t-1}, W)/∂W)ᵀ c'_t` for every connection — what
summing the per-step products gives, in another order.

The presynaptic factor is a filtered spike train, `ε^u_t = α ε^u_{t-1} + a·u_t`, so the sum is

    ε^u_{t0-1} ⊗ (α c̃_{t0} + c'_{t0})  +  a Σ_k u_k ⊗ c̃_k,
    c̃_k = C_k + α c̃_{k+1} (c̃_{t1+1} = 0),   C_k = c_k + c'_{k+1} (c'_{t1+1} = 0),

with `x ⊗ c` the connection-wise product `x[pre(k)]·c[post(k)]`: ONE pass over the connections per chunk
(`derive.connection_products`), plus, per step, an update of the outgoing connections of the neurons
that spiked (brainevent's `update_csr_on_binary_pre`, the plasticity kernel). The per-step work is the
number of synaptic events — the forward's own — instead of a pass over every connection: the
backward-filtered cotangent `c̃` moves the trace's memory from the presynaptic side, where it makes every
entry non-zero, to the postsynaptic one.
"""

import brainevent
import jax
import jax.numpy as jnp
from jax import lax

from fusetrace.analysis import Analysis

from . import derive, factorised


def eligible(analysis: Analysis, plan, index: int) -> bool:
    """Whether relation `index`'s deferred products are contracted event by event: es_d_rtrl with one
    presynaptic factor ("filtered" or "averaged"), a binary CSR op with one weight per connection whose
    rows are the presynaptic neurons (its outgoing connections are contiguous) and whose structure is
    the same at every step, and no batch split over devices (`derive.batch_groups`)."""
    relation = analysis.relations[index]
    if not factorised.factorised(plan.algorithm, relation) or factorised.has_components(plan):
        return False
    eqn = analysis.facts.contractions[relation.contraction].eqn
    return (
        derive.one_pass_csr(eqn)
        and bool(eqn.params.get("transpose"))
        and derive.step_invariant_operands(analysis, relation.contraction)
        and not derive.batch_split()
    )


def contract(
    analysis: Analysis, plan, index: int, values, start: jax.Array, inputs: jax.Array, now: jax.Array, prev
) -> jax.Array:
    """The chunk's gradient of relation `index` (its op's weight layout, one entry per connection).

    `start`: the presynaptic factor before the chunk (the op's input layout); `inputs`: the op inputs'
    activity masks, stacked over the chunk's steps; `now` / `prev`: the op-layout cotangents paired with
    this step's / last step's presynaptic factor, stacked likewise (`prev` None when the outputs read no
    previous value). A step that forms no gradient has zero cotangents, but its input still counts."""
    relation = analysis.relations[index]
    contraction = relation.contraction
    eqn = analysis.facts.contractions[contraction].eqn
    alpha = plan.decay
    gain, _, _ = factorised.factor_gains(plan.factorisation, alpha)
    invals = list(values.operands[contraction])
    _, indices, indptr = invals[:3]
    pre, post = derive.csr_endpoints(eqn, analysis, invals)

    def rows(stack):  # (T, n) or (T, n, B) -> (T, B, n)
        return jax.vmap(lambda value: derive.csr_rows_of(value, eqn))(stack)

    cts = rows(now)
    first = 0.0
    if prev is not None:
        prevs = rows(prev)
        cts = cts.at[:-1].add(prevs[1:])
        first = prevs[0]

    def back(later, c):
        filtered = c + alpha * later
        return filtered, filtered

    _, filtered = lax.scan(back, jnp.zeros_like(cts[0]), cts, reverse=True)
    grad = derive.connection_products(
        derive.csr_rows_of(start, eqn)[None], (alpha * filtered[0] + first)[None], pre, post
    )
    spikes = rows(inputs)
    spikes = jnp.reshape(spikes, (-1, spikes.shape[-1])) != 0
    filtered = jnp.reshape(gain * filtered, (-1, filtered.shape[-1]))

    def add(i, total):
        return brainevent.update_csr_on_binary_pre(
            total, indices, indptr, spikes[i], filtered[i], shape=tuple(eqn.params["shape"])
        )

    grad = lax.fori_loop(0, spikes.shape[0], add, grad)
    return grad.astype(derive.weight_of(analysis, values, contraction).dtype)


def relations(analysis: Analysis, plan) -> list[int]:
    """The traced relations of the plan contracted event by event (`eligible`)."""
    return [index for index in plan.traced if eligible(analysis, plan, index)]


def activity(analysis: Analysis, plan, values) -> dict:
    """`{relation index: its op input's activity mask (bool)}` this step, for every relation of the plan
    contracted event by event."""
    return {index: values.u[analysis.relations[index].contraction] != 0 for index in relations(analysis, plan)}
