"""Small brainpy.state networks whose weights are written as users write them (issue 18): transformed
before their op, applied more than once, or read in several places. Nothing here imports fusetrace.

Each builder takes no argument; `build(name, batch_size, seed)` seeds, builds and initialises. `N_IN`
float spikes per step; the readout is a `LeakyRateReadout` (exact regime for d_rtrl through it).
"""

import brainpy
import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

N_IN, N, N_OUT = 4, 6, 3
V0 = braintools.init.Normal(0.5 * u.mV, 0.3 * u.mV)
ZERO = braintools.init.Constant(0.0 * u.mA)


def _kaiming(shape, scale=3.0):
    return braintools.init.KaimingNormal(scale=scale)(shape)


def _syn(n=N):
    return bps.Expon(n, tau=3.0 * u.ms, g_initializer=ZERO)


class Transformed(brainstate.nn.Module):
    """LIF + Expon + leaky readout; the input weight `w` reaches the op through `kind`:
    "dale" (`abs(w) * sign`), "mask" (`w * mask`), "norm" (`g * w / ‖w‖` per column, g trained too),
    "softplus" (`softplus(w)`), "low_rank" (`u @ v`, both trained), "plain" (`w`)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.neuron = bps.LIF(N, V_th=1.0 * u.mV, tau=5.0 * u.ms, V_initializer=V0)
        self.syn = _syn()
        rng = np.random.default_rng(5)
        if kind == "low_rank":
            self.u = brainstate.ParamState(_kaiming((N_IN, 2), 2.0))
            self.v = brainstate.ParamState(_kaiming((2, N), 2.0))
        else:
            self.w = brainstate.ParamState(_kaiming((N_IN, N)))
        self.sign = jnp.asarray(np.where(np.arange(N_IN) == 1, -1.0, 1.0))[:, None]  # one inhibitory input
        self.mask = jnp.asarray(rng.random((N_IN, N)) < 0.7, dtype=float)
        if kind == "norm":
            self.g = brainstate.ParamState(jnp.full((N,), 2.0))
        self.out = bps.LeakyRateReadout(N, N_OUT, tau=4.0 * u.ms)

    def weight(self):
        """The effective weight from the current parameter values."""
        names = {"low_rank": ("u", "v"), "norm": ("w", "g")}.get(self.kind, ("w",))
        return self.weight_from({name: getattr(self, name).value for name in names})

    def weight_from(self, p: dict):
        """The effective weight as a pure function of the parameters `p` (by attribute name)."""
        if self.kind == "dale":
            return jnp.abs(p["w"]) * self.sign
        if self.kind == "mask":
            return p["w"] * self.mask
        if self.kind == "norm":
            return p["g"] * p["w"] / jnp.linalg.norm(p["w"], axis=0)
        if self.kind == "softplus":
            return jax.nn.softplus(p["w"]) - 0.5
        if self.kind == "low_rank":
            return p["u"] @ p["v"]
        return p["w"]

    def update(self, x):
        g = self.syn(x @ self.weight() * u.mA)
        return self.out(self.neuron(g))


class SharedLinear(brainstate.nn.Module):
    """One `Linear` applied to the same input into two populations (`a`, `b`), both read out."""

    def __init__(self):
        super().__init__()
        self.fc = brainstate.nn.Linear(N_IN, N, w_init=braintools.init.KaimingNormal(scale=3.0), b_init=None)
        self.a = bps.LIF(N, V_th=1.0 * u.mV, tau=5.0 * u.ms, V_initializer=V0)
        self.b = bps.LIF(N, V_th=1.0 * u.mV, tau=8.0 * u.ms, V_initializer=V0)
        self.syn_a, self.syn_b = _syn(), bps.Expon(N, tau=6.0 * u.ms, g_initializer=ZERO)
        self.out = bps.LeakyRateReadout(2 * N, N_OUT, tau=4.0 * u.ms)

    def update(self, x):
        current = self.fc(x) * u.mA
        spikes_a = self.a(self.syn_a(current))
        spikes_b = self.b(self.syn_b(current))
        return self.out(jnp.concatenate([spikes_a, spikes_b], axis=-1))


class TiedWeights(brainstate.nn.Module):
    """One weight matrix used by two ops on different inputs into two populations (weight tying)."""

    def __init__(self):
        super().__init__()
        self.w = brainstate.ParamState(_kaiming((N_IN, N)))
        self.a = bps.LIF(N, V_th=1.0 * u.mV, tau=5.0 * u.ms, V_initializer=V0)
        self.b = bps.LIF(N, V_th=1.0 * u.mV, tau=8.0 * u.ms, V_initializer=V0)
        self.syn_a, self.syn_b = _syn(), bps.Expon(N, tau=6.0 * u.ms, g_initializer=ZERO)
        self.out = bps.LeakyRateReadout(2 * N, N_OUT, tau=4.0 * u.ms)

    def update(self, x):
        spikes_a = self.a(self.syn_a(x @ self.w.value * u.mA))
        spikes_b = self.b(self.syn_b(x[..., ::-1] @ self.w.value * u.mA))
        return self.out(jnp.concatenate([spikes_a, spikes_b], axis=-1))


class TwoSubsteps(brainstate.nn.Module):
    """Two neuron sub-steps per `update`, the input current applied in both."""

    def __init__(self):
        super().__init__()
        self.fc = brainstate.nn.Linear(N_IN, N, w_init=braintools.init.KaimingNormal(scale=3.0), b_init=None)
        self.neuron = bps.LIF(N, V_th=1.0 * u.mV, tau=5.0 * u.ms, V_initializer=V0)
        self.out = bps.LeakyRateReadout(N, N_OUT, tau=4.0 * u.ms)

    def update(self, x):
        current = self.fc(x) * u.mA
        self.neuron(current)
        return self.out(self.neuron(current))


class Threshold(brainpy.state.LIF):
    """An LIF whose threshold is a trained per-neuron parameter, read by the spike function and the reset."""

    def __init__(self, n):
        super().__init__(n, V_th=1.0 * u.mV, tau=5.0 * u.ms, V_initializer=V0)
        self.theta = brainstate.ParamState(jnp.linspace(0.8, 1.2, n))

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        threshold = self.theta.value * u.mV
        return self.spk_fun((V - threshold) / (threshold - self.V_reset))

    def update(self, x=0.0 * u.mA):
        last_v = self.V.value
        threshold = self.theta.value * u.mV
        v = last_v - (threshold - self.V_reset) * self.get_spike(last_v)
        v = brainstate.nn.exp_euler_step(
            lambda v: (-v + self.V_rest + self.R * self.sum_current_inputs(x, v)) / self.tau, v
        )
        self.V.value = v
        return self.get_spike(v)


class TrainedThreshold(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = brainstate.nn.Linear(N_IN, N, w_init=braintools.init.KaimingNormal(scale=3.0), b_init=None)
        self.neuron = Threshold(N)
        self.syn = _syn()
        self.out = bps.LeakyRateReadout(N, N_OUT, tau=4.0 * u.ms)

    def update(self, x):
        return self.out(self.neuron(self.syn(self.fc(x) * u.mA)))


BUILDERS = {
    "plain": lambda: Transformed("plain"),
    "dale": lambda: Transformed("dale"),
    "mask": lambda: Transformed("mask"),
    "norm": lambda: Transformed("norm"),
    "softplus": lambda: Transformed("softplus"),
    "low_rank": lambda: Transformed("low_rank"),
    "shared_linear": SharedLinear,
    "tied": TiedWeights,
    "two_substeps": TwoSubsteps,
    "threshold": TrainedThreshold,
}


def build(name: str, batch_size: int | None, seed: int = 0):
    brainstate.random.seed(seed)
    model = BUILDERS[name]()
    brainstate.nn.init_all_states(model, batch_size=batch_size)
    return model
