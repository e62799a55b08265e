"""The GIF design (braintrace's DMS experiment, rebuilt from brainpy.state parts): the reference network of
evidence accumulation since issue 16 (docs/tasks.md), and the peer's DMS network in `benchmarks/`.

One population of brainpy.state `Gif` neurons with a long adaptation current, input and recurrent spikes
through one exponential synapse, and a leaky readout of each neuron's standardised distance to its
threshold, `standardize(V − V_th)` across the neurons, instead of its spikes.
"""

from typing import Any

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax

from .base import current_projection, ms, mv


def _q(value: float, unit) -> u.Quantity:
    return u.Quantity(value, unit=unit)


class GifNetwork(brainstate.nn.Module):
    """`n_rec` `Gif` neurons (τ 100 ms; an adaptation current I2 lowered by 1 mA per spike, decaying with a
    τ drawn per neuron from U(100, 2,250) ms; soft reset; threshold 1 mV), input and recurrent spikes
    through one exponential synapse (τ 100 ms; input weights Kaiming scale 6, recurrent scale 2), and a
    leaky readout (τ 10 ms, Kaiming scale 6) of `standardize(V − V_th)` across the neurons: the settings
    of braintrace's recorded DMS runs (chaobrain/braintrace-snn-experiments,
    `task-rsnn-long-term-dependency.py`). `update(x_t)` returns the readout (batch, n_out).

    `Gif`'s other two states do not move at these settings (A1 = 0 keeps I1 at 0; a = b = 0 keep V_th
    at 1 mV); fusetrace traces them all. The weights are drawn in this order: the adaptation time
    constants, the recurrent, input and readout weights."""

    def __init__(self, n_in: int, n_rec: int, n_out: int):
        super().__init__()
        tau_i2 = brainstate.random.uniform(100.0, 2250.0, (n_rec,)) * u.ms
        self.neurons = self._neurons(n_rec, tau_i2)
        self.rec = current_projection(n_rec, self.neurons, n_rec, ms(100.0), scale=2.0)
        self.inp = current_projection(n_in, self.neurons, n_rec, ms(100.0), scale=6.0)
        self.out = bps.LeakyRateReadout(n_rec, n_out, tau=ms(10.0), w_init=braintools.init.KaimingNormal(scale=6.0))

    def _neurons(self, n_rec: int, tau_i2) -> bps.Neuron:
        return bps.Gif(
            n_rec,
            R=_q(1.0, u.ohm),
            tau=ms(100.0),
            V_rest=mv(0.0),
            V_reset=mv(0.0),
            V_th_inf=mv(1.0),
            V_th_reset=mv(0.0),
            V_th_initializer=braintools.init.Constant(mv(1.0)),
            a=_q(0.0, u.kHz),  # per ms
            b=_q(0.0, u.kHz),
            k2=1.0 / tau_i2,
            A2=_q(-1.0, u.mA),
            V_initializer=braintools.init.Constant(mv(0.0)),
        )

    def potential(self):
        """`V − V_th`, unitless: what the readout standardises."""
        neurons: Any = self.neurons  # a `Gif` (its states are not on `bps.Neuron`)
        return u.get_mantissa(neurons.V.value - neurons.V_th.value)

    def update(self, x):
        self.rec(self.neurons.get_spike())
        self.inp(x)
        self.neurons()
        return self.out(jax.nn.standardize(self.potential(), axis=-1))
