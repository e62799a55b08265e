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

with `x ⊗ c` the connection-wise product `x[pre(k)]·c[post(k)]`: ONE pass over the connections per chunk,
plus, per step, an update of the outgoing connections of the neurons that spiked. The per-step work is
the number of synaptic events — the forward's own — instead of a pass over every connection: the
backward-filtered cotangent `c̃` moves the trace's memory from the presynaptic side, where it makes every
entry non-zero, to the postsynaptic one.

On the CPU both parts are one call of a Numba kernel that updates the gradient in place (`_one_pass`):
the steps in order, so each step's gathers read one cotangent row that stays in cache. Elsewhere, the
first part is `derive.connection_products` and the steps are brainevent's plasticity kernel
(`update_csr_on_binary_pre`) one call per step (`_per_step`). At whole-brain scale on the CPU the one
call takes about three quarters of the time of the two (benchmarks/connectome_side_by_side.py, docs/benchmarks.md):
no connection-sized temporary, and no slice temporaries per spiking row.
"""

import functools

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
    analysis: Analysis, plan, index: int, values, start: jax.Array, inputs: jax.Array, now: jax.Array, prev, into=None
) -> jax.Array:
    """The chunk's gradient of relation `index` (its op's weight layout, one entry per connection), added
    to `into` when given (a gradient sum of that layout, updated in place: no connection-sized zeros and
    no second pass to add them up).

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
    spikes = rows(inputs)
    spikes = jnp.reshape(spikes, (-1, spikes.shape[-1])) != 0  # (steps · batch, presynaptic)
    start = derive.csr_rows_of(start, eqn)  # (batch, presynaptic)
    first = alpha * filtered[0] + first  # (batch, postsynaptic)
    filtered = jnp.reshape(gain * filtered, (-1, filtered.shape[-1]))  # (steps · batch, postsynaptic)
    dtype = jnp.result_type(start, first, filtered)
    into = jnp.zeros(indices.shape, dtype) if into is None else into.astype(dtype)
    operands = (into, indices, indptr, start.astype(dtype), first.astype(dtype), spikes, filtered.astype(dtype))
    per_step = functools.partial(_per_step, pre=pre, post=post, shape=tuple(eqn.params["shape"]))
    grad = lax.platform_dependent(*operands, cpu=_one_pass, default=per_step)
    return grad.astype(derive.weight_of(analysis, values, contraction).dtype)


def _per_step(into, indices, indptr, start, first, spikes, filtered, *, pre, post, shape) -> jax.Array:
    """`contract`'s sum by XLA and brainevent: one pass for the first term, then brainevent's plasticity
    kernel once per step (row of `spikes`)."""
    grad = into + derive.connection_products(start[None], first[None], pre, post)

    def add(i, total):
        return brainevent.update_csr_on_binary_pre(total, indices, indptr, spikes[i], filtered[i], shape=shape)

    return lax.fori_loop(0, spikes.shape[0], add, grad)


def _one_pass(into, indices, indptr, start, first, spikes, filtered) -> jax.Array:
    """`contract`'s sum by one call of a Numba kernel (CPU only) that adds it to `into` in place."""
    call = brainevent.numba_kernel(
        _kernel(), outs=jax.ShapeDtypeStruct(into.shape, into.dtype), input_output_aliases={0: 0}
    )
    return call(into, indices, indptr, start, first, spikes, filtered)


@functools.cache
def _kernel():
    """The Numba kernel of `_one_pass` (compiled on first use, per dtype): `out[k] += Σ_b start[b, i]
    first[b, j] + Σ_{e: spikes[e, i]} filtered[e, j]` for every connection k = (i, j), the events `e`
    in order."""
    import numba

    @numba.njit(cache=False)
    def kernel(grad, indices, indptr, start, first, spikes, filtered, out):  # `out` is `grad`'s buffer
        for b in range(start.shape[0]):
            for i in range(start.shape[1]):
                scale = start[b, i]
                if scale != 0:
                    for k in range(indptr[i], indptr[i + 1]):
                        out[k] += scale * first[b, indices[k]]
        for e in range(spikes.shape[0]):
            for i in range(spikes.shape[1]):
                if spikes[e, i]:
                    for k in range(indptr[i], indptr[i + 1]):
                        out[k] += filtered[e, indices[k]]

    return kernel


def relations(analysis: Analysis, plan) -> list[int]:
    """The traced relations of the plan contracted event by event (`eligible`)."""
    return [index for index in plan.traced if eligible(analysis, plan, index)]


def activity(analysis: Analysis, plan, values) -> dict:
    """`{relation index: its op input's activity mask (bool)}` this step, for every relation of the plan
    contracted event by event."""
    return {index: values.u[analysis.relations[index].contraction] != 0 for index in relations(analysis, plan)}
