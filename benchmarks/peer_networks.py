"""braintrace's own DMS network, rebuilt from brainpy.state parts, for the learning benchmark (issue 16, item
3b): `fusetrace train --task dms --network benchmarks.peer_networks:gif_dms_network` (from the repository
root), and its braintrace twin in `benchmarks/learning.py`.
"""

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax

from fusetrace.tasks.base import begin_network, ms
from fusetrace.tasks.dms import DMSNetwork
from fusetrace.tasks.evidence import evidence_network
from fusetrace.tasks.gif import GifNetwork


class GifDMSNetwork(GifNetwork):
    """braintrace's DMS recipe (chaobrain/braintrace-snn-experiments, `task-rsnn-long-term-dependency.py`,
    the settings of its recorded runs) at its sizes: `fusetrace.tasks.GifNetwork` with 100 inputs, 200
    `Gif` neurons and 2 outputs (the design and its settings are documented there)."""

    def __init__(self, n_in: int = 100, n_rec: int = 200, n_out: int = 2):
        super().__init__(n_in, n_rec, n_out)


class TwoStateGif(bps.Neuron):
    """brainpy.state's `Gif` with the settings of `GifDMSNetwork`, written with the two states that move:
    `V` and the adaptation current `I2`. There `I1` stays 0 (A1 = 0, R1 = 0) and `V_th` stays at
    V_th_inf (a = b = 0, V_th_reset < V_th_inf, V_reset = 0), and neither depends on a weight; here the
    threshold is the constant `V_th`. Each step does `Gif.update`'s arithmetic on the other two states
    in its order (soft reset `V − V_th · s` and `I2 + A2 · s` with the previous step's spike, then one
    exponential-Euler step of each), so the trajectory and every gradient are `Gif`'s (tested in
    tests/test_peer_networks.py).

    Why it exists: braintrace refuses `Gif` ("only one hidden state in a single equation", naming `V`
    and `V_th`), so its `pp_prop` can run the peer's DMS recipe only on this neuron, as the peer's own
    experiment does with a two-state GIF of its own."""

    def __init__(self, n: int, tau_i2):
        super().__init__(n, spk_fun=braintools.surrogate.ReluGrad(), spk_reset="soft")
        self.tau, self.tau_i2, self.V_th, self.A2, self.R = ms(100.0), tau_i2, 1.0 * u.mV, -1.0 * u.mA, 1.0 * u.ohm

    def init_state(self, batch_size: int | None = None, **kwargs):
        zero = braintools.init.Constant(0.0 * u.mV)
        self.V = brainstate.HiddenState(braintools.init.param(zero, self.varshape, batch_size))
        current = braintools.init.Constant(0.0 * u.mA)
        self.I2 = brainstate.HiddenState(braintools.init.param(current, self.varshape, batch_size))

    def reset_state(self, batch_size: int | None = None, **kwargs):
        self.V.value = u.math.zeros_like(self.V.value)
        self.I2.value = u.math.zeros_like(self.I2.value)

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun((V - self.V_th) / self.V_th)

    def update(self, x=0.0 * u.mA):
        spike = self.get_spike()
        i2 = self.I2.value + spike * self.A2
        v = self.V.value - self.V_th * spike
        i2 = brainstate.nn.exp_euler_step(lambda i: -i / self.tau_i2, i2)
        v = brainstate.nn.exp_euler_step(lambda v: (-v + self.R * (i2 + self.sum_current_inputs(x, v))) / self.tau, v)
        self.V.value = self.sum_delta_inputs(v)
        self.I2.value = i2
        return self.get_spike()


class TwoStateGifNetwork(GifDMSNetwork):
    """`GifDMSNetwork` on `TwoStateGif`: the same network, draws and gradients, in a form braintrace can
    compile (its `pp_prop` column in `benchmarks/learning.py`, issue 16 item 3b)."""

    def _neurons(self, n_rec: int, tau_i2) -> bps.Neuron:
        return TwoStateGif(n_rec, tau_i2)

    def potential(self):
        return u.get_mantissa(self.neurons.V.value - self.neurons.V_th)


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


def gif_evidence_network(seed: int | None = None) -> GifNetwork:
    """The GIF network sized for evidence accumulation (40 inputs, 100 `Gif` neurons, 2 outputs): the
    task's reference network since issue 16 (`fusetrace.tasks.evidence_network`, the same draws), kept
    under this name for the commands of the runs made before it became the reference."""
    return evidence_network(seed=seed)


def two_state_gif_dms_network(seed: int | None = None) -> TwoStateGifNetwork:
    """`TwoStateGifNetwork` (DMS sizes): `gif_dms_network` in a form braintrace compiles."""
    begin_network(1.0, seed)
    return TwoStateGifNetwork()


def two_state_gif_evidence_network(seed: int | None = None) -> TwoStateGifNetwork:
    """`TwoStateGifNetwork` (evidence sizes): `gif_evidence_network` in a form braintrace compiles."""
    begin_network(1.0, seed)
    return TwoStateGifNetwork(n_in=40, n_rec=100, n_out=2)
