"""Regularisers for `fusetrace.compile(..., regularizer=...)`: functions of the model read right after
its step, whose gradient reaches the weights online through the same traces as the loss."""

from collections.abc import Callable, Sequence
from typing import Any

import brainpy.state as bps
import brainstate
import brainunit as u
import jax
import jax.numpy as jnp

from .errors import CompileError, four_part


def neurons_of(model: brainstate.nn.Module) -> list[bps.Neuron]:
    """Every brainpy.state `Neuron` population in `model`, once each, in `model.nodes()` order."""
    found: list[bps.Neuron] = []
    nodes: Any = model.nodes(bps.Neuron)  # a dict of path -> node (typed loosely upstream)
    for node in nodes.values():
        if all(node is not seen for seen in found):
            found.append(node)
    return found


def _all_neuron_spikes(model: brainstate.nn.Module) -> list:
    return [neuron.get_spike() for neuron in neurons_of(model)]


def firing_rate_regularizer(
    target_hz: float = 10.0,
    strength: float = 1.0,
    spikes: Callable[[brainstate.nn.Module], Sequence[Any]] | None = None,
) -> Callable[[brainstate.nn.Module], jax.Array]:
    """A regulariser that pulls each neuron's firing rate towards `target_hz`.

    Per step it adds `strength · Σ_b mean_n (z_t[b, n] − r)²`, with `z_t` the step's new spikes (through
    their surrogate gradient) and `r = target_hz · dt` the target spike probability per step; summed over
    the batch like the reference tasks' losses. Since `E[z_t − r]` is the rate error, its expected
    gradient is that of the rate penalty `(rate − target)²` (e-prop's firing-rate regularisation) without
    keeping a running rate.

    Arguments:
        target_hz: the target rate in Hz (≥ 0).
        strength: the weight of the penalty (≥ 0).
        spikes: `spikes(model)` -> the spike arrays to regularise (default: `get_spike()` of every
            brainpy.state `Neuron` in the model).

    Returns:
        `regularizer(model) -> scalar`, for `fusetrace.compile(..., regularizer=...)`.

    Examples:
        ```python
        reg = fusetrace.firing_rate_regularizer(target_hz=10.0, strength=0.1)
        learner = fusetrace.compile(net, x0, loss=loss, batch_size=16, regularizer=reg)
        ```
    """
    for name, value in (("target_hz", target_hz), ("strength", strength)):
        if not value >= 0:
            raise CompileError(
                four_part(
                    what=f"{name}={value}",
                    where="fusetrace.firing_rate_regularizer(...)",
                    why="a rate and a penalty weight are non-negative",
                    fix=f"pass {name} ≥ 0",
                )
            )
    select = spikes or _all_neuron_spikes

    def regularizer(model: brainstate.nn.Module) -> jax.Array:
        arrays = [u.get_mantissa(z) for z in select(model)]
        if not arrays:
            raise CompileError(
                four_part(
                    what="the firing-rate regulariser found no spikes",
                    where=f"{type(model).__name__}",
                    why="it reads `get_spike()` of every brainpy.state Neuron, and the model has none",
                    fix="pass spikes=lambda net: [...] naming the spike arrays to regularise",
                )
            )
        rate = target_hz * u.get_magnitude(u.Quantity(brainstate.environ.get_dt()).to_decimal(u.second))
        total = jnp.zeros(())
        for z in arrays:
            total = total + jnp.sum(jnp.mean((z - rate) ** 2, axis=-1))
        return strength * total

    return regularizer
