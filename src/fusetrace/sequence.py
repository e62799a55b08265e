"""A learner over a whole sequence: `Learner.scan`, the fused step in one `lax.scan`, gradients summed.

Consumes: a `Learner`, its params and state, inputs and targets with a leading time axis, an optional
per-step loss mask. Produces the final state and a `ScanResult`: the outputs and losses stacked over
time and the sum of the per-step gradients — equal to summing `Learner.step`'s (tested to float64
rounding). A step whose loss is masked out forms no gradient (`Learner.step(..., gradient=False)`: the
states and traces advance alone), so its gradient costs nothing; its loss is still reported.

The gradient sum lives in the scan's carry (no per-step gradient is stored), so memory does not grow
with the sequence.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from .errors import CompileError, four_part


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


def _length(xs) -> int:
    lengths = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(xs) if jnp.ndim(leaf)}
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


def scan(learner, params: dict, state: dict, xs, targets, *, loss_mask=None, constants: dict | None = None):
    """`(final state, ScanResult)` of `learner` over the steps of `xs` (see `Learner.scan`)."""
    steps = _length((xs, targets) if loss_mask is None else (xs, targets, loss_mask))
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
    zeros = jax.tree.map(jnp.zeros_like, params)

    def body(carry, inputs):
        state, total = carry
        x, target, forms = inputs

        def learning(state):
            state, res = learner.step(params, state, x, target, constants=constants)
            return state, res.output, res.loss, res.grads

        def advancing(state):
            state, res = learner.step(params, state, x, target, gradient=False, constants=constants)
            return state, res.output, res.loss, zeros

        if loss_mask is None:
            state, output, loss, grads = learning(state)
        else:
            state, output, loss, grads = lax.cond(forms, learning, advancing, state)
        total = jax.tree.map(jnp.add, total, grads)
        return (state, total), (output, loss)

    (state, grads), (outputs, losses) = lax.scan(body, (state, zeros), (xs, targets, mask))
    return state, ScanResult(outputs, losses, grads)
