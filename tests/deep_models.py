"""Small brainpy.state networks whose credit reaches the loss through other groups (deep credit).

Nothing here imports fusetrace. Each builder takes `(batch_size, seed)` and returns an initialised
model; `N_IN` inputs per step, float spikes. Used by tests/test_deep_credit.py and
benchmarks/fidelity.py.

Linear time-invariant paths (d_rtrl / e_prop must be exact through them):
  `per_unit_tau`, `trainable_tau` (scalar or per unit), `previous_spikes`, `readouts_in_series`.
A linear loop: `linear_loop` (a LIF layer read by a linear recurrent rate population); `LinearLoop(rounds=k)`
is the same model with its loop unrolled k rounds (the definition of `loop_hops` / `own_loop_hops`).
Nonlinear paths: `deep` (2-3 feed-forward spiking layers, LIF or ALIF, Expon or DualExpon, leaky or
instantaneous readout), `spiking_output`, `ei` (E and I populations, I reads E's new spikes, E reads I's
previous ones; dense or EventFixedProb), `stacked_recurrent`; `Ring(populations)`: any number of
populations in a loop (the program-size test grows it). Exact under d_rtrl / e_prop where the only
nonlinear stage is a small last one (`SMALL_LAST`: kept per unit); approximate through a nonlinear group
in the middle of a path or a wide last one (`two_layer_wide_linear`).
"""

import brainpy  # noqa: F401  (brainpy.state lives inside brainpy >= 2.9)
import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp

N_IN = 4
V0 = braintools.init.Normal(0.5 * u.mV, 0.3 * u.mV)
ZERO = braintools.init.Constant(0.0 * u.mA)


def neuron(n: int, alif: bool = False, tau=5.0 * u.ms):
    if alif:
        return bps.ALIF(n, V_th=1.0 * u.mV, tau=tau, tau_a=20.0 * u.ms, beta=0.3 * u.mV, V_initializer=V0)
    return bps.LIF(n, V_th=1.0 * u.mV, tau=tau, V_initializer=V0)


def current(n_in: int, n: int, post, syn: str = "expon", scale: float = 3.0):
    comm = brainstate.nn.Linear(n_in, n, w_init=braintools.init.KaimingNormal(scale=scale, unit=u.mA), b_init=None)
    if syn == "expon":
        desc = bps.Expon.desc(n, tau=3.0 * u.ms, g_initializer=ZERO)
    else:
        desc = bps.DualExpon.desc(n, tau_decay=4.0 * u.ms, tau_rise=1.0 * u.ms, g_initializer=ZERO)
    return bps.AlignPostProj(comm=comm, syn=desc, out=bps.CUBA.desc(scale=1.0), post=post)


class TauReadout(brainstate.nn.Module):
    """`r ← exp(−dt/τ) r + x W` with τ a trained `ParamState` (a scalar, or one per output), in units of dt."""

    def __init__(self, n_in: int, n_out: int, tau):
        super().__init__()
        self.n_out = n_out
        self.weight = brainstate.ParamState(braintools.init.KaimingNormal()((n_in, n_out)))
        self.tau = brainstate.ParamState(jnp.asarray(tau, dtype=float))

    def init_state(self, batch_size=None, **kwargs):
        self.r = brainstate.HiddenState(braintools.init.param(braintools.init.Constant(0.0), (self.n_out,), batch_size))

    def update(self, x):
        self.r.value = jnp.exp(-1.0 / self.tau.value) * self.r.value + x @ self.weight.value
        return self.r.value


class OneLayer(brainstate.nn.Module):
    """One LIF layer read by `readout`: "per_unit_tau", "trainable_tau", "trainable_tau_per_unit",
    "previous_spikes" (the readout reads last step's spikes) or "series" (two leaky readouts in series)."""

    def __init__(self, readout: str, n: int = 8, n_out: int = 3):
        super().__init__()
        self.readout = readout
        self.neuron = neuron(n)
        self.inp = current(N_IN, n, self.neuron)
        if readout == "per_unit_tau":
            self.out = bps.LeakyRateReadout(n, n_out, tau=jnp.linspace(2.0, 8.0, n_out) * u.ms)
        elif readout == "trainable_tau":
            self.out = TauReadout(n, n_out, 4.0)
        elif readout == "trainable_tau_per_unit":
            self.out = TauReadout(n, n_out, jnp.linspace(2.0, 8.0, n_out))
        else:
            self.out = bps.LeakyRateReadout(n, n_out, tau=4.0 * u.ms)
        if readout == "series":
            self.out2 = bps.LeakyRateReadout(n_out, 2, tau=6.0 * u.ms)

    def update(self, x):
        if self.readout == "previous_spikes":
            output = self.out(self.neuron.get_spike())
            self.inp(x)
            self.neuron(0.0 * u.mA)
            return output
        self.inp(x)
        output = self.out(self.neuron(0.0 * u.mA))
        return self.out2(output) if self.readout == "series" else output


class Deep(brainstate.nn.Module):
    """Feed-forward spiking layers `l0 -> l1 (-> l2)`, each read by the next through a current projection,
    the last one read by a leaky or an instantaneous readout. `alif`: odd layers are ALIF."""

    def __init__(self, sizes=(8, 6), readout="leaky", alif=False, syn="expon", n_out=3):
        super().__init__()
        self.depth = len(sizes)
        pre = N_IN
        for k, n in enumerate(sizes):
            post = neuron(n, alif=alif and k % 2 == 1)
            setattr(self, f"l{k}", post)
            setattr(self, f"p{k}", current(pre, n, post, syn=syn))
            pre = n
        leaky = readout == "leaky"
        self.out = bps.LeakyRateReadout(pre, n_out, tau=4.0 * u.ms) if leaky else brainstate.nn.Linear(pre, n_out)

    def update(self, x):
        for k in range(self.depth):
            getattr(self, f"p{k}")(x)
            x = getattr(self, f"l{k}")(0.0 * u.mA)
        return self.out(x)


class SpikingOutput(brainstate.nn.Module):
    """A hidden LIF layer read by a spiking output population; the loss reads the output spikes."""

    def __init__(self, n: int = 8, n_out: int = 3):
        super().__init__()
        self.hidden = neuron(n)
        self.inp = current(N_IN, n, self.hidden)
        self.output = neuron(n_out)
        self.proj = current(n, n_out, self.output)

    def update(self, x):
        self.inp(x)
        self.proj(self.hidden(0.0 * u.mA))
        return self.output(0.0 * u.mA)


class EI(brainstate.nn.Module):
    """The textbook E/I network: I reads E's new spikes (`EI`), E reads I's previous spikes (`IE`, inhibitory)
    and its own (`EE`), the input drives E, a leaky readout reads E. `conn`: "dense" or "sparse"
    (`EventFixedProb` for the recurrent projections)."""

    def __init__(self, conn: str = "dense", n_exc: int = 8, n_inh: int = 4, n_out: int = 3):
        super().__init__()
        self.E, self.I = neuron(n_exc), neuron(n_inh)
        self.inp = current(N_IN, n_exc, self.E)

        def proj(n_pre, n_post, post, scale, sign):
            if conn == "dense":
                init = braintools.init.KaimingNormal(scale=scale, unit=u.mA)
                comm = brainstate.nn.Linear(n_pre, n_post, w_init=init, b_init=None)
            else:
                init = braintools.init.Uniform(0.5 * scale * u.mA, 1.5 * scale * u.mA)
                comm = brainstate.nn.EventFixedProb(n_pre, n_post, conn_num=0.5, seed=1, conn_weight=init)
            syn = bps.Expon.desc(n_post, tau=3.0 * u.ms, g_initializer=ZERO)
            return bps.AlignPostProj(comm=comm, syn=syn, out=bps.CUBA.desc(scale=sign), post=post)

        self.EI = proj(n_exc, n_inh, self.I, 3.0, 1.0)
        self.IE = proj(n_inh, n_exc, self.E, 2.0, -1.0)
        self.EE = proj(n_exc, n_exc, self.E, 1.0, 1.0)
        self.out = bps.LeakyRateReadout(n_exc, n_out, tau=4.0 * u.ms)

    def update(self, x):
        inhibition, excitation = self.I.get_spike(), self.E.get_spike()
        self.IE(inhibition)
        self.EE(excitation)
        self.inp(x)
        spikes = self.E(0.0 * u.mA)
        self.EI(spikes)
        self.I(0.0 * u.mA)
        return self.out(spikes)


class LinearLoop(brainstate.nn.Module):
    """A LIF layer read by a linear rate population with its own recurrent weights,
    `r ← 0.8 r + s W_in + r_prev W_rec`, read by a `Linear`. With `rounds=k` the loop is unrolled into
    `k + 1` copies of the population, copy `j` driven by copy `j − 1`'s previous values through the same
    `W_rec` and the readout reading their sum: its gradient is the full model's truncated after `k`
    rounds of the loop (the definition of `loop_hops=k`; exact under a loss linear in the output, whose
    learning signal does not depend on the forward values the truncation changes)."""

    DECAY = 0.8

    def __init__(self, rounds: int | None = None, n: int = 6, n_rate: int = 20, n_out: int = 3):
        super().__init__()
        self.n_rate, self.copies = n_rate, 1 if rounds is None else rounds + 1
        self.looped = rounds is None
        self.neuron = neuron(n)
        self.inp = current(N_IN, n, self.neuron)
        self.w_in = brainstate.nn.Linear(n, n_rate, w_init=braintools.init.KaimingNormal(), b_init=None)
        self.w_rec = brainstate.nn.Linear(n_rate, n_rate, w_init=braintools.init.KaimingNormal(scale=0.1), b_init=None)
        self.out = brainstate.nn.Linear(n_rate, n_out, w_init=braintools.init.KaimingNormal(), b_init=None)

    def init_state(self, batch_size=None, **kwargs):
        for j in range(self.copies):
            value = braintools.init.param(braintools.init.Constant(0.0), (self.n_rate,), batch_size)
            setattr(self, f"r{j}", brainstate.HiddenState(value))

    def update(self, x):
        self.inp(x)
        spikes = self.neuron(0.0 * u.mA)
        rates = [getattr(self, f"r{j}") for j in range(self.copies)]
        previous = [r.value for r in rates]
        loop = self.w_rec(previous[0]) * (1.0 if self.looped else 0.0)  # (unrolled: read, so BPTT sees W_rec)
        rates[0].value = self.DECAY * previous[0] + self.w_in(spikes) + loop
        for j in range(1, self.copies):
            rates[j].value = self.DECAY * previous[j] + self.w_rec(previous[j - 1])
        return self.out(sum(r.value for r in rates))


class StackedRecurrent(brainstate.nn.Module):
    """Two recurrent LIF layers in a stack (each reads its own previous spikes), then a leaky readout."""

    def __init__(self, n1: int = 8, n2: int = 6, n_out: int = 3):
        super().__init__()
        self.l0, self.l1 = neuron(n1), neuron(n2)
        self.p0, self.r0 = current(N_IN, n1, self.l0), current(n1, n1, self.l0, scale=1.0)
        self.p1, self.r1 = current(n1, n2, self.l1), current(n2, n2, self.l1, scale=1.0)
        self.out = bps.LeakyRateReadout(n2, n_out, tau=4.0 * u.ms)

    def update(self, x):
        self.r0(self.l0.get_spike())
        self.r1(self.l1.get_spike())
        self.p0(x)
        self.p1(self.l0(0.0 * u.mA))
        return self.out(self.l1(0.0 * u.mA))


class NormalisedReadout(brainstate.nn.Module):
    """One LIF layer whose leaky readout reads `standardize(V − V_th)` across the layer's neurons (the
    readout of braintrace's DMS experiment): an input that mixes the neurons it reads."""

    def __init__(self, n: int = 8, n_out: int = 3):
        super().__init__()
        self.neuron = neuron(n)
        self.inp = current(N_IN, n, self.neuron)
        self.out = bps.LeakyRateReadout(n, n_out, tau=4.0 * u.ms)

    def update(self, x):
        self.inp(x)
        self.neuron(0.0 * u.mA)
        potential = u.get_mantissa(self.neuron.V.value - self.neuron.V_th)
        return self.out(jax.nn.standardize(potential, axis=-1))


class Ring(brainstate.nn.Module):
    """`populations` LIF populations in a ring: population k reads population k−1's spikes of the previous
    step and the input, a leaky readout reads every population's new spikes."""

    def __init__(self, populations: int, n: int = 4, n_out: int = 2):
        super().__init__()
        self.populations = populations
        for k in range(populations):
            setattr(self, f"pop{k}", neuron(n))
            setattr(self, f"inp{k}", current(N_IN, n, getattr(self, f"pop{k}")))
            setattr(self, f"ring{k}", current(n, n, getattr(self, f"pop{k}")))
        self.out = bps.LeakyRateReadout(populations * n, n_out, tau=4.0 * u.ms)

    def update(self, x):
        pops = [getattr(self, f"pop{k}") for k in range(self.populations)]
        for k in range(self.populations):
            getattr(self, f"ring{k}")(pops[k - 1].get_spike())
            getattr(self, f"inp{k}")(x)
        return self.out(jnp.concatenate([pop(0.0 * u.mA) for pop in pops], axis=-1))


BUILDERS = {
    "per_unit_tau": lambda: OneLayer("per_unit_tau"),
    "trainable_tau": lambda: OneLayer("trainable_tau"),
    "trainable_tau_per_unit": lambda: OneLayer("trainable_tau_per_unit"),
    "previous_spikes": lambda: OneLayer("previous_spikes"),
    "readouts_in_series": lambda: OneLayer("series"),
    "two_layer_leaky": lambda: Deep((8, 6), "leaky"),
    "two_layer_linear": lambda: Deep((8, 6), "linear"),
    "two_layer_wide_linear": lambda: Deep((8, 20), "linear"),  # a last layer too wide to keep per unit
    "two_layer_alif_dualexpon": lambda: Deep((8, 6), "leaky", alif=True, syn="dualexpon"),
    "three_layer_leaky": lambda: Deep((8, 6, 5), "leaky"),
    "three_layer_alif_linear": lambda: Deep((8, 6, 5), "linear", alif=True),
    "spiking_output": SpikingOutput,
    "ei_dense": lambda: EI("dense"),
    "ei_sparse": lambda: EI("sparse"),
    "stacked_recurrent": StackedRecurrent,
    "linear_loop": LinearLoop,
    "normalised_readout": NormalisedReadout,
}
LTI = ("per_unit_tau", "trainable_tau", "trainable_tau_per_unit", "previous_spikes", "readouts_in_series")
# a nonlinear group (or a mixing link) as the last stage of every credit path, small enough to keep per unit
SMALL_LAST = ("two_layer_linear", "spiking_output", "normalised_readout")


def build(name: str, batch_size: int | None, seed: int = 0):
    """The model `name` of `BUILDERS`, built with `seed` and initialised for `batch_size`."""
    brainstate.random.seed(seed)
    model = BUILDERS[name]()
    brainstate.nn.init_all_states(model, batch_size=batch_size)
    return model
