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

On the CPU the whole sum is one call of a Numba kernel that updates the gradient in place (`_one_pass`,
`_kernel`): it forms `c̃` itself, the steps in reverse, so each step's gathers read one filtered row that
stays in cache; from `THREADED_FROM` connections it splits the rows over Numba's threads; it prefetches
the connections of the spiking rows a few ahead. Elsewhere, `c̃` is a reverse `lax.scan`, the first part
`derive.connection_products` and the steps brainevent's plasticity kernel (`update_csr_on_binary_pre`) one
call per step (`_per_step`). At whole-brain scale on this project's 2-core CPU the kernel takes about 1.0 ms per step
of a 50-step chunk (2.7 for the serial kernel without prefetching that read a filtered cotangent XLA had
stacked; benchmarks/connectome_side_by_side.py, docs/benchmarks.md).
"""

import functools
from collections.abc import Callable

import brainevent
import jax
import jax.numpy as jnp
import numpy as np
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
    gain, _, _ = factorised.factor_gains(plan.factorisation, plan.decay)
    invals = list(values.operands[contraction])
    _, indices, indptr = invals[:3]
    pre, post = derive.csr_endpoints(eqn, analysis, invals)

    def rows(stack):  # (T, n) or (T, n, B) -> (T, B, n)
        return jax.vmap(lambda value: derive.csr_rows_of(value, eqn))(stack)

    now = rows(now)
    dtype = jnp.result_type(start, now)
    prev = jnp.zeros((0, *now.shape[1:]), dtype) if prev is None else rows(prev).astype(dtype)
    into = jnp.zeros(indices.shape, dtype) if into is None else into.astype(dtype)
    operands = (
        into,
        indices,
        indptr,
        derive.csr_rows_of(start, eqn).astype(dtype),  # (batch, presynaptic)
        now.astype(dtype),  # (steps, batch, postsynaptic)
        prev,  # the same, or no step
        rows(inputs) != 0,  # (steps, batch, presynaptic)
        jnp.asarray([plan.decay, gain], dtype),
    )
    per_step = functools.partial(_per_step, pre=pre, post=post, shape=tuple(eqn.params["shape"]))
    one_pass = functools.partial(_one_pass, threaded=indices.shape[0] >= THREADED_FROM)
    grad = lax.platform_dependent(*operands, cpu=one_pass, default=per_step)
    return grad.astype(derive.weight_of(analysis, values, contraction).dtype)


def _per_step(into, indices, indptr, start, now, prev, spikes, scalars, *, pre, post, shape) -> jax.Array:
    """`contract`'s sum by XLA and brainevent: the backward filter `c̃` as a scan, one pass for the term of
    the factor before the chunk, then brainevent's plasticity kernel once per step and batch entry."""
    alpha, gain = scalars[0], scalars[1]
    first = 0.0
    if prev.shape[0]:
        now = now.at[:-1].add(prev[1:])
        first = prev[0]

    def back(later, c):
        filtered = c + alpha * later
        return filtered, filtered

    _, filtered = lax.scan(back, jnp.zeros_like(now[0]), now, reverse=True)
    first = alpha * filtered[0] + first  # (batch, postsynaptic)
    grad = into + derive.connection_products(start[None], first[None], pre, post)
    spikes = jnp.reshape(spikes, (-1, spikes.shape[-1]))  # (steps · batch, presynaptic)
    filtered = jnp.reshape(gain * filtered, (-1, filtered.shape[-1]))  # (steps · batch, postsynaptic)

    def add(i, total):
        return brainevent.update_csr_on_binary_pre(total, indices, indptr, spikes[i], filtered[i], shape=shape)

    return lax.fori_loop(0, spikes.shape[0], add, grad)


def _one_pass(into, indices, indptr, start, now, prev, spikes, scalars, *, threaded: bool) -> jax.Array:
    """`contract`'s sum by one call of a Numba kernel (CPU only) that adds it to `into` in place, on
    Numba's threads or on one."""
    call = brainevent.numba_kernel(
        _kernel(threaded), outs=jax.ShapeDtypeStruct(into.shape, into.dtype), input_output_aliases={0: 0}
    )
    return call(into, indices, indptr, start, now, prev, spikes, scalars)


# How many spiking rows ahead `_kernel` asks the memory for a row's connections (indices and gradient). On
# a random graph of the whole brain's size (`python benchmarks/event_fusion.py --kernel --prefetch K`, 4,000
# spikes per step, 50-step chunks, this project's 2-core CPU) the whole call took 1.99 ms per step at 4 rows
# ahead against 2.83 without (one thread), 1.16 against 1.50 on two threads; a first sweep of a plain loop
# gave 2.3 ms at 1 row ahead, 2.0–2.2 at 2–8, 3.2 at 16.
PREFETCH_ROWS = 4
# From how many connections the kernel splits its rows over Numba's threads: on that graph (15 M) two
# threads took 1.16 against 1.99 ms per step; a small graph's work is shorter than handing it to threads,
# and the threaded kernel takes 4.7 s to compile against 1.5 (per dtype, per process).
THREADED_FROM = 1_000_000


@functools.cache
def _kernel(threaded: bool):
    """The Numba kernel of `_one_pass` (compiled on first use, per dtype). With `α, a = scalars`, the steps
    t = T-1, ..., 0 in turn, and `c̃_T = 0`:

        c̃_t = now_t + prev_{t+1} + α c̃_{t+1},     out[k] += a c̃_t[j]  for k = (i, j), spikes_t[i];

    then `out[k] += start[i] (α c̃_0[j] + prev_0[j])` (each batch entry on its own).

    `threaded` (and Numba's threading layer safe to launch from concurrent threads, `_threadsafe`: XLA may
    run two contractions at once): the rows are split into as many parts as Numba has threads, of about
    equal connection counts. Each thread filters the whole cotangent for itself (O(T·B·N), its gathers
    read every postsynaptic entry) and adds its rows' sums: no two threads write one entry, and each
    entry's terms are added in the same order whatever the split, so the result does not depend on the
    number of threads. A step's spiking rows lie at random in the connection arrays, a few cache lines
    each, so the loop asks for the lines of the row `PREFETCH_ROWS` ahead while it works on this one
    (`_prefetch`)."""
    import numba

    prefetch = _prefetch()
    ahead = PREFETCH_ROWS
    threaded = threaded and _threadsafe()

    @numba.njit(cache=False, parallel=threaded)
    def kernel(grad, indices, indptr, start, now, prev, spikes, scalars, out):  # `out` is `grad`'s buffer
        alpha, gain = scalars[0], scalars[1]
        steps, batch, n_post = now.shape
        n_rows = indptr.shape[0] - 1
        total = indptr[n_rows]
        parts = numba.get_num_threads() if threaded else 1
        for part in numba.prange(parts):
            lo = 0 if part == 0 else min(np.searchsorted(indptr, total * part // parts), n_rows)
            hi = n_rows if part == parts - 1 else min(np.searchsorted(indptr, total * (part + 1) // parts), n_rows)
            rows = np.empty(max(hi - lo, 0), np.int32)
            filtered = np.zeros((batch, n_post), now.dtype)
            for t in range(steps - 1, -1, -1):
                for b in range(batch):
                    for j in range(n_post):
                        filtered[b, j] = now[t, b, j] + alpha * filtered[b, j]
                    if t + 1 < prev.shape[0]:
                        for j in range(n_post):
                            filtered[b, j] += prev[t + 1, b, j]
                    n = 0
                    for i in range(lo, hi):
                        if spikes[t, b, i]:
                            rows[n] = i
                            n += 1
                    for r in range(n):
                        if ahead and r + ahead < n:
                            later = rows[r + ahead]
                            for k in range(indptr[later], indptr[later + 1], 16):
                                prefetch(indices, k)
                                prefetch(out, k)
                        i = rows[r]
                        for k in range(indptr[i], indptr[i + 1]):
                            out[k] += gain * filtered[b, indices[k]]
            for b in range(batch):
                for j in range(n_post):
                    filtered[b, j] = alpha * filtered[b, j] + (prev[0, b, j] if prev.shape[0] else 0)
                for i in range(lo, hi):
                    scale = start[b, i]
                    if scale != 0:
                        for k in range(indptr[i], indptr[i + 1]):
                            out[k] += scale * filtered[b, indices[k]]

    return kernel


@functools.cache
def _threadsafe() -> bool:
    """Whether Numba's threading layer takes parallel launches from concurrent threads (TBB or OpenMP; its
    fallback, the workqueue layer, aborts the process). The layer is chosen at the first parallel launch,
    so this launches a tiny one."""
    import numba

    @numba.njit(parallel=True)
    def probe(values):
        for i in numba.prange(values.shape[0]):
            values[i] += 1.0

    probe(np.zeros(2))
    # `numba.threading_layer` is documented API that numba's `__all__` leaves out
    return numba.threading_layer() in ("tbb", "omp")  # pyright: ignore[reportPrivateImportUsage]


def _prefetch() -> Callable[..., None]:
    """A Numba function `prefetch(array, k)` that asks the memory for the cache line of `array[k]` (a 1-D
    array; LLVM's `llvm.prefetch`, read, kept in every cache level): it returns at once and never
    faults, so the row after next can be requested before it is read."""
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, array, k):
        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            pointer = ir.IntType(8).as_pointer()
            int32 = ir.IntType(32)
            function = builder.module.declare_intrinsic(
                "llvm.prefetch", [pointer], ir.FunctionType(ir.VoidType(), [pointer, int32, int32, int32])
            )
            address = builder.bitcast(builder.gep(data, [args[1]]), pointer)
            builder.call(function, [address, int32(0), int32(3), int32(1)])
            return context.get_dummy_value()

        return types.void(array, k), codegen

    return prefetch


def relations(analysis: Analysis, plan) -> list[int]:
    """The traced relations of the plan contracted event by event (`eligible`)."""
    return [index for index in plan.traced if eligible(analysis, plan, index)]


def activity(analysis: Analysis, plan, values) -> dict:
    """`{relation index: its op input's activity mask (bool)}` this step, for every relation of the plan
    contracted event by event."""
    return {index: values.u[analysis.relations[index].contraction] != 0 for index in relations(analysis, plan)}
