"""A learner over a whole sequence: `Learner.scan`, the fused step in `lax.scan`, gradients summed.

Consumes: a `Learner`, its params and state, inputs and targets with a leading time axis, an optional
per-step loss mask. Produces the final state and a `ScanResult`: the outputs and losses stacked over
time and the sum of the per-step gradients — equal to summing `Learner.step`'s (tested to float64
rounding). A step whose loss is masked out forms no gradient (`Learner.step(..., gradient=False)`: the
states and traces advance alone), so its gradient costs nothing; its loss is still reported.

Deferred contraction (es_d_rtrl). Summed over steps, es_d_rtrl's per-step weight products
`Σ_t (∂y(ε^u_t, W)/∂W)ᵀ c_t` are one contraction over the time and batch axes together: for a dense
weight one GEMM with inner dimension k·B instead of k rank-B updates, each of which reads and writes
the whole weight-shaped gradient. So the steps keep their factors `(ε^u_t, c_t)` — O(B·(I + N)) per
relation and step — in a buffer of `chunk` steps, contracted once per chunk
(`derive.weight_vjp_over_time`); a binary CSR product whose rows are the presynaptic neurons keeps
each step's spikes and cotangents instead and is contracted event by event (`passes.events`: one pass
over the connections per chunk, then the outgoing connections of each step's spikes). The chunk is
chosen so that the buffer stays under `DEFERRED_BYTES` (`Learner.deferred_bytes` reports a step's share).
Everything else of a step (d_rtrl's traces, per-neuron parameters, instantaneous readouts) is summed step
by step. The gradient sum lives in the scan's carry, so memory does not grow with the sequence.

With a loss mask the sequence runs in three spans (`_masked`): the steps before the first that forms a
gradient and after the last advance the states and traces alone, with no per-step branch; only the span
between them asks, step by step, whether a gradient is formed (a recall window of a trial pays for the
branch and the products on its own steps only). Deferred, that span is contracted in chunks of at most
`MASKED_CHUNK` steps, the span's tail shorter than a chunk step by step: the buffer holds the steps of
the span, not the sequence's.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .errors import CompileError, four_part
from .passes import derive, events, factorised

DEFERRED_BYTES = 1 << 28  # the largest buffer of deferred factors (256 MiB) before a chunk is contracted
# the default chunk within a masked sequence's learning span (whose length is only known when it runs: its
# tail shorter than a chunk takes its products step by step). Measured: docs/benchmarks.md, "Sequences"
MASKED_CHUNK = 64


class ScanResult(eqx.Module):
    """What `Learner.scan` returns beside the final state.

    Attributes:
        output: the outputs of every step, stacked over time (the structure of one step's output).
        loss: the per-step losses, shape (time,).
        grads: the sum of the per-step gradients (the structure and units of `Learner.params`).
    """

    output: Any
    loss: jax.Array
    grads: dict


def _length(tree) -> int:
    lengths = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(tree) if jnp.ndim(leaf)}
    if len(lengths) != 1:
        raise CompileError(
            four_part(
                what=f"the sequence's leaves have lengths {sorted(lengths) or 'none'} along their first axis",
                where="Learner.scan(params, state, xs, targets, ...)",
                why="xs, targets and loss_mask are stacked over time, the time axis first",
                fix="pass arrays of one length T, time first: x_t = xs[t]",
            )
        )
    return lengths.pop()


def _mask(loss_mask, steps: int) -> jax.Array:
    mask = jnp.ones((steps,), bool) if loss_mask is None else jnp.asarray(loss_mask) != 0
    if mask.shape != (steps,):
        raise CompileError(
            four_part(
                what=f"loss_mask has shape {mask.shape}",
                where="Learner.scan(..., loss_mask=...)",
                why="it says, per step, whether that step's loss forms a gradient",
                fix=f"pass one value per step: shape ({steps},)",
            )
        )
    return mask


def deferrable(learner) -> bool:
    """Whether the learner's weight products can be deferred: es_d_rtrl, and every factorised relation's op
    reads nothing that changes from step to step but its input and weight (so one evaluation of the op
    stands for all the steps of a chunk). A binary CSR product's deferred products are one loop over the
    chunk's steps and batch entries (`derive.connection_products`)."""
    if learner.plan.algorithm != "es_d_rtrl":
        return False
    contractions = _product_contractions(learner)
    return bool(contractions) and all(derive.step_invariant_operands(learner.analysis, c.index) for c in contractions)


def _product_contractions(learner) -> list:
    """The contractions of the traced relations that form weight products (not element-wise parameters)."""
    analysis = learner.analysis
    relations = [analysis.relations[i] for i in learner.plan.traced if not analysis.relations[i].elementwise]
    return [analysis.facts.contractions[r.contraction] for r in relations]


def deferral_pays(learner) -> bool:
    """Whether deferring is the default (`chunk=None`). Not when the learner is unbatched and every deferred
    product is a binary CSR product contracted as pairs of factors (not event by event: `passes.events`),
    whose deferred contraction is the same one pass over the connections per step, only slower in the
    chunk's loop (measured, generated connectome, 50-step chunks, es_d_rtrl: 2.50 against 1.33 ms per step
    at 20,000 neurons; 25.9 against 18.1 at 138,639; batched, B = 16, the two are within 3%). Event by
    event, the same connectomes take 1.00 and 9.8 ms per step deferred (benchmarks.md)."""
    if learner.analysis.batch_size is not None or event_driven(learner):
        return True
    return not all(derive.one_pass_csr(c.eqn) for c in _product_contractions(learner))


def deferred_bytes(learner) -> int:
    """Bytes one step adds to the buffer of deferred factors (0 when nothing is deferred)."""
    if not deferrable(learner):
        return 0
    analysis, plan = learner.analysis, learner.plan
    total = 0
    for index in plan.traced:
        relation = analysis.relations[index]
        if relation.elementwise:
            continue
        contraction = analysis.facts.contractions[relation.contraction]
        itemsize = np.dtype(analysis.captured.leaves[relation.weight_leaf].dtype).itemsize
        sizes = (contraction.pre_var.aval.size, contraction.out_var.aval.size)
        if events.eligible(analysis, plan, index):  # the activity mask (bool), cotangents for now and prev
            total += sizes[0] + sizes[1] * itemsize * 2
            continue
        components = factorised.n_products(plan, analysis, index)  # pairs of factors per step
        total += sum(sizes) * itemsize * 2 * components  # this step's factors, and last step's (for δ_prev terms)
    return total


def event_driven(learner) -> list[str]:
    """The weights whose deferred products are contracted event by event (`passes.events`)."""
    if not deferrable(learner):
        return []
    return [learner.analysis.relations[i].weight for i in events.relations(learner.analysis, learner.plan)]


def scan(learner, params: dict, state: dict, xs, targets, *, loss_mask=None, constants=None, chunk=None):
    """`(final state, ScanResult)` of `learner` over the steps of `xs` (see `Learner.scan`)."""
    steps = _length((xs, targets) if loss_mask is None else (xs, targets, loss_mask))
    mask = None if loss_mask is None else _mask(loss_mask, steps)  # None: every step learns (no branch)
    zeros = jax.tree.map(jnp.zeros_like, params)
    defer = deferrable(learner) and chunk != 0 and (chunk is not None or deferral_pays(learner))
    size = (chunk or max(1, min(steps, DEFERRED_BYTES // max(deferred_bytes(learner), 1)))) if defer else 0
    if mask is not None:
        state, grads, outputs, losses = _masked(
            learner, params, state, xs, targets, mask, constants, min(size, chunk or MASKED_CHUNK, steps)
        )
        return state, ScanResult(outputs, losses, grads)
    if not defer:  # a weight product at every step
        (state, grads), (outputs, losses) = _steps(learner, params, (state, zeros), xs, targets, None, constants)
        return state, ScanResult(outputs, losses, grads)
    carry, outputs, losses = (state, zeros), [], []
    for start in range(0, steps, size):
        part_xs, part_targets, part_mask = jax.tree.map(lambda a, s=start: a[s : s + size], (xs, targets, mask))
        carry, (output, loss) = _deferred_chunk(learner, params, carry, part_xs, part_targets, part_mask, constants)
        outputs.append(output)
        losses.append(loss)
    outputs = jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)
    return carry[0], ScanResult(outputs, jnp.concatenate(losses), carry[1])


def _span(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(first, last)`: the steps `[first, last)` between the first step that forms a gradient and the last
    (`(T, T)` when none does)."""
    steps = mask.shape[0]
    found = jnp.any(mask)
    first = jnp.where(found, jnp.argmax(mask), steps)
    return first, jnp.where(found, steps - jnp.argmax(mask[::-1]), steps)


def _at(tree, start, size: int | None = None):
    """Step `start` of every leaf of a time-first `tree` (`size` None), or the `size` steps from `start`."""
    if size is None:
        return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, start, 0, keepdims=False), tree)
    return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size, 0), tree)


def _masked(learner, params, state, xs, targets, mask, constants, size: int):
    """`(state, grads, outputs, losses)` of a sequence with a loss mask, in three spans (module docstring):
    `[0, first)` and `[last, T)` advance only; `[first, last)` forms the gradients of its masked-in steps,
    deferred in chunks of `size` steps (0: products step by step). The spans' bounds are read from the
    mask when the program runs (no recompilation for another mask); outputs and losses are written into
    buffers of the sequence's length."""
    steps = mask.shape[0]
    first, last = _span(mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    x0, target0 = _at((xs, targets), 0)
    shapes = jax.eval_shape(
        lambda s: learner.step(params, s, x0, target0, gradient=False, constants=constants)[1], state
    )
    stacked = jax.tree.map(lambda s: jnp.zeros((steps, *s.shape), s.dtype), (shapes.output, shapes.loss))

    def put(buffers, values, start):  # one step's (output, loss) at `start`, or a chunk's from it
        return jax.tree.map(
            lambda b, v: lax.dynamic_update_slice_in_dim(b, v if v.ndim == b.ndim else v[None], start, 0),
            buffers,
            values,
        )

    def advance(t, carry):
        state, total, buffers = carry
        x, target = _at((xs, targets), t)
        state, res = learner.step(params, state, x, target, gradient=False, constants=constants)
        return state, total, put(buffers, (res.output, res.loss), t)

    body = _step_body(learner, params, constants, zeros, masked=True)

    def one(t, carry):
        pair, step_outputs = body(carry[:2], _at((xs, targets, mask), t))
        return *pair, put(carry[2], step_outputs, t)

    carry = lax.fori_loop(0, first, advance, (state, zeros, stacked))
    start = first
    if size:
        count = (last - first) // size

        def deferred(j, carry):
            begin = first + j * size
            part_xs, part_targets, part_mask = _at((xs, targets, mask), begin, size)
            pair, outputs = _deferred_chunk(learner, params, carry[:2], part_xs, part_targets, part_mask, constants)
            return *pair, put(carry[2], outputs, begin)

        carry = lax.fori_loop(0, count, deferred, carry)
        start = first + count * size
    carry = lax.fori_loop(start, last, one, carry)
    state, total, (outputs, losses) = lax.fori_loop(last, steps, advance, carry)
    return state, total, outputs, losses


def _per_step(mask, xs) -> jax.Array:
    """What the scan hands each step for its mask: the mask, or (none given) a placeholder it ignores."""
    return jnp.zeros((_length(xs),), bool) if mask is None else mask


def _steps(learner, params, carry, xs, targets, mask, constants):
    """Every step of the sequence, its gradient added to the carry's sum (none where `mask` is False)."""
    body = _step_body(learner, params, constants, jax.tree.map(jnp.zeros_like, params), mask is not None)
    return lax.scan(body, carry, (xs, targets, _per_step(mask, xs)))


def _step_body(learner, params, constants, zeros, masked: bool):
    """One step as a scan body: `((state, total), (x, target, forms)) -> ((state, total), (output, loss))`,
    its gradient added to `total` (where `masked`, only when `forms`; else none is formed)."""

    def body(carry, inputs):
        state, total = carry
        x, target, forms = inputs

        def learning(state):
            state, res = learner.step(params, state, x, target, constants=constants)
            return state, res.output, res.loss, res.grads

        def advancing(state):
            state, res = learner.step(params, state, x, target, gradient=False, constants=constants)
            return state, res.output, res.loss, zeros

        if not masked:
            state, output, loss, grads = learning(state)
        else:
            state, output, loss, grads = lax.cond(forms, learning, advancing, state)
        return (state, jax.tree.map(jnp.add, total, grads)), (output, loss)

    return body


def _deferred_chunk(learner, params, carry, xs, targets, mask, constants):
    """A chunk of steps whose es_d_rtrl factors are stacked, then contracted once."""
    zeros = jax.tree.map(jnp.zeros_like, params)

    def learning(state, x, target):
        state, res, products = learner._step(params, state, x, target, constants=constants, defer=True)
        return state, res.output, res.loss, res.grads, products

    x0, target0 = jax.tree.map(lambda a: a[0], (xs, targets))
    shapes = jax.eval_shape(learning, carry[0], x0, target0)[4]
    no_products = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, inputs):
        state, total = carry
        x, target, forms = inputs

        def advancing(state, x, target):  # no products; the event-driven relations' inputs still count
            state, res, deferred = learner._step(
                params, state, x, target, gradient=False, constants=constants, defer=True
            )
            return state, res.output, res.loss, zeros, {**no_products, **deferred}

        if mask is None:
            state, output, loss, grads, products = learning(state, x, target)
        else:
            state, output, loss, grads, products = lax.cond(forms, learning, advancing, state, x, target)
        return (state, jax.tree.map(jnp.add, total, grads)), (output, loss, products)

    (state, total), (outputs, losses, products) = lax.scan(body, carry, (xs, targets, _per_step(mask, xs)))
    total = learner._contract(params, state, x0, products, carry[0]["traces"], total, constants=constants)
    return (state, total), (outputs, losses)
