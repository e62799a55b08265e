"""braintrace's own DMS network, rebuilt from brainpy.state parts, for the learning benchmark (issue 16, item
3b): `fusetrace train --task dms --network benchmarks.peer_networks:gif_dms_network` (from the repository
root), and its braintrace twin in `benchmarks/learning.py`.
"""

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax

from fusetrace.tasks.base import begin_network, current_projection, ms
from fusetrace.tasks.dms import DMSNetwork


class GifDMSNetwork(brainstate.nn.Module):
    """braintrace's DMS recipe (chaobrain/braintrace-snn-experiments, `alif_working_memory/
    task-rsnn-long-term-dependency.py`, the settings of its recorded runs) built from brainpy.state parts:
    200 `Gif` neurons (τ 100 ms; an adaptation current I2 lowered by 1 mA per spike, decaying with a τ drawn
    per neuron from U(100, 2250) ms; soft reset; threshold 1 mV), input and recurrent spikes through one
    exponential synapse (τ 100 ms; input weights Kaiming scale 6, recurrent scale 2), and a leaky readout
    (τ 10 ms, Kaiming scale 6) of `standardize(V − V_th)` across the neurons. `update(x_t)` returns the
    readout."""

    def __init__(self, n_in: int = 100, n_rec: int = 200, n_out: int = 2):
        super().__init__()
        tau_i2 = brainstate.random.uniform(100.0, 2250.0, (n_rec,)) * u.ms
        self.neurons = bps.Gif(
            n_rec,
            R=1.0 * u.ohm,
            tau=ms(100.0),
            V_rest=0.0 * u.mV,
            V_reset=0.0 * u.mV,
            V_th_inf=1.0 * u.mV,
            V_th_reset=0.0 * u.mV,
            V_th_initializer=braintools.init.Constant(1.0 * u.mV),
            a=0.0 / u.ms,
            b=0.0 / u.ms,
            k2=1.0 / tau_i2,
            A2=-1.0 * u.mA,
            V_initializer=braintools.init.Constant(0.0 * u.mV),
        )
        self.rec = current_projection(n_rec, self.neurons, n_rec, ms(100.0), scale=2.0)
        self.inp = current_projection(n_in, self.neurons, n_rec, ms(100.0), scale=6.0)
        self.out = bps.LeakyRateReadout(n_rec, n_out, tau=ms(10.0), w_init=braintools.init.KaimingNormal(scale=6.0))

    def update(self, x):
        self.rec(self.neurons.get_spike())
        self.inp(x)
        self.neurons()
        potential = u.get_mantissa(self.neurons.V.value - self.neurons.V_th.value)
        return self.out(jax.nn.standardize(potential, axis=-1))


def gif_dms_network(seed: int | None = None) -> GifDMSNetwork:
    """`GifDMSNetwork` for `fusetrace train --task dms --network benchmarks.peer_networks:gif_dms_network`."""
    begin_network(1.0, seed)
    return GifDMSNetwork()


class GifSpikeReadout(GifDMSNetwork):
    """`GifDMSNetwork` with the reference DMS network's readout: a `LeakyRateReadout` (τ 20 ms) of the new
    spikes instead of `standardize(V − V_th)` (which of the two networks' differences matters, issue 16)."""

    def __init__(self, n_in: int = 100, n_rec: int = 200, n_out: int = 2):
        super().__init__(n_in, n_rec, n_out)
        self.out = bps.LeakyRateReadout(n_rec, n_out, tau=ms(20.0))

    def update(self, x):
        self.rec(self.neurons.get_spike())
        self.inp(x)
        return self.out(self.neurons())


class AlifPotentialReadout(DMSNetwork):
    """The reference DMS network (`tasks.dms_network`: ALIF neurons) with the peer's readout: a leaky readout
    (τ 10 ms, Kaiming scale 6) of `standardize(V − V_th − β·a)`, each neuron's distance to its adaptive
    threshold, across the neurons."""

    def __init__(self, n_in: int = 100, n_rec: int = 200, n_out: int = 2):
        super().__init__(n_in, n_rec, n_out)
        self.out = bps.LeakyRateReadout(n_rec, n_out, tau=ms(10.0), w_init=braintools.init.KaimingNormal(scale=6.0))

    def update(self, x):
        self.rec(self.neurons.get_spike())
        self.inp(x)
        self.neurons()
        neurons = self.neurons
        distance = neurons.V.value - neurons.V_th - neurons.beta * neurons.a.value
        return self.out(jax.nn.standardize(u.get_mantissa(distance), axis=-1))


def gif_spike_readout_dms_network(seed: int | None = None) -> GifSpikeReadout:
    """`GifSpikeReadout` for `fusetrace train --task dms --network
    benchmarks.peer_networks:gif_spike_readout_dms_network`."""
    begin_network(1.0, seed)
    return GifSpikeReadout()


def alif_potential_readout_dms_network(seed: int | None = None) -> AlifPotentialReadout:
    """`AlifPotentialReadout` for `fusetrace train --task dms --network
    benchmarks.peer_networks:alif_potential_readout_dms_network`."""
    begin_network(1.0, seed)
    return AlifPotentialReadout()


def gif_evidence_network(seed: int | None = None) -> GifDMSNetwork:
    """The GIF network with the potential readout, sized for evidence accumulation (40 inputs, 100 `Gif`
    neurons, 2 outputs): `fusetrace train --task evidence --network
    benchmarks.peer_networks:gif_evidence_network` (issue 16: does the design that lets es_d_rtrl learn
    DMS carry over?)."""
    begin_network(1.0, seed)
    return GifDMSNetwork(n_in=40, n_rec=100, n_out=2)
