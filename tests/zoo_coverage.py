"""Models for the model-coverage work: one small factory per construct users write, grouped by item.

Items (the coverage issue): 1 event-driven and sparse weights, 2 convolutions, 3 control flow inside
`update`, 4 delays, 5 refractory / STP / AlignPre / ALIF / AdEx / Izhikevich neurons, 6 equations that
read several hidden states and rate-based recurrent cells, 7 paths that are not a plain weight -> tail
(weight -> weight, non-element-wise tails, weights inside loops, per-neuron parameters).

Every model is written as a user would write it, from unmodified brainpy.state / brainstate.nn modules
(upstream bugs worked around as DESIGN.md §4 says: AlignPre built by hand, STP as a pre-module), and is
tiny (at most 12 neurons, 8 inputs). Factories return a `zoo.Case` (no hand-written expected analysis:
`case.expected` is None) and are registered in `COVERAGE` as a `Model` that records:

* `regime`: "exact" — a single hidden layer fed by inputs, no recurrent weight on the gradient path and
  an instantaneous output (or a one-state leaky readout): `d_rtrl` with one-step windows must equal BPTT;
  "approximate" — the online gradient is an estimate, compared to BPTT by cosine and norm ratio;
  "error or approximate" — a construct the compiler may refuse with a clear error (a weight inside a loop
  too long to unroll) or accept with an approximate, explained gradient;
* `batch_sizes`: the batch sizes it is tested with (None = unbatched states): both for the event /
  sparse products and convolutions, whose unbatched primitives differ from the batched ones; batch 2
  only elsewhere (the unbatched path is the same code with one axis less), unbatched only where the
  model is batched wrongly upstream;
* `sequence`: how a sequence of inputs is drawn from one step's example inputs;
* `reference`: "reverse" (BPTT by reverse mode) or "forward" (forward mode, for a `while_loop` on the
  gradient path, which JAX cannot reverse-differentiate).
"""

import dataclasses
from collections.abc import Callable

import brainevent
import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

import zoo
from zoo import DT, HostRandom, _begin, _current_syn, _dense, _kaiming, _lif, _spikes

EXACT, APPROXIMATE, ERROR_OR_APPROXIMATE = "exact", "approximate", "error or approximate"


def _no_expectation(model):
    return None


def _case(name, model, inputs, batch_size, seed) -> zoo.Case:
    return zoo._case(name, model, inputs, batch_size, _no_expectation, True, seed)


def _spike_case(name, model, n_in, batch_size, seed) -> zoo.Case:
    return _case(name, model, (_spikes(n_in, batch_size),), batch_size, seed)


def _cuba(comm, neuron, shape, unit=u.mA):
    """An AlignPostProj: `comm` -> Expon (tau 5 ms, g in `unit`) -> CUBA -> `neuron`."""
    syn = bps.Expon.desc(shape, tau=5.0 * u.ms, g_initializer=braintools.init.Constant(0.0 * unit))
    return bps.AlignPostProj(comm=comm, syn=syn, out=bps.CUBA.desc(scale=1.0), post=neuron)


class Layer(brainstate.nn.Module):
    """Input spikes -> `comm` -> Expon (g in `unit`) -> CUBA -> `neuron`; returns the neuron's spikes."""

    def __init__(self, comm, neuron, shape, unit=u.mA):
        super().__init__()
        self.N = neuron
        self.inp = _cuba(comm, neuron, shape, unit)

    def update(self, x):
        self.inp(x)
        return self.N()


# --------------------------------------------------------------------------- 1. event and sparse weights


def _csr(n_pre: int, n_post: int, prob: float, seed: int) -> brainevent.CSR:
    """A random CSR connectivity (about `prob` of the pairs) with weights drawn on the host."""
    rng = np.random.RandomState(seed)
    mask = rng.rand(n_pre, n_post) < prob
    values = rng.uniform(1.0, 3.0, size=(n_pre, n_post))
    return brainevent.CSR.fromdense(jnp.asarray(mask * values, dtype=brainstate.environ.dftype()))


class EventCSR(brainstate.nn.Module):
    """A comm a user writes around a brainevent CSR matrix: the stored values are the trainable weight,
    the spikes are events (`BinaryArray`), so the product is `binary_csrmv` / `binary_csrmm`."""

    def __init__(self, n_pre: int, n_post: int, prob: float = 0.4, seed: int = 0):
        super().__init__()
        self.in_size, self.out_size = (n_pre,), (n_post,)
        self.csr = _csr(n_pre, n_post, prob, seed)
        self.weight = brainstate.ParamState(self.csr.data)

    def update(self, spikes):
        return (brainevent.BinaryArray(spikes) @ self.csr.with_data(self.weight.value)) * u.mA


def csr_event(batch_size=None, n_in=8, n=12, seed=0) -> zoo.Case:
    """Event spikes through a CSR matrix into LIF + Expon (exact regime)."""
    _begin(seed)
    model = Layer(EventCSR(n_in, n, seed=seed), _lif(n), n)
    return _spike_case("csr_event", model, n_in, batch_size, seed)


def csr_float(batch_size=None, n_in=8, n=12, seed=0) -> zoo.Case:
    """`brainstate.nn.SparseLinear` over a brainevent CSR matrix, reading float inputs (`csrmv` /
    `csrmm`): the AlignPre trace of the input spikes is the presynaptic input (exact regime)."""
    _begin(seed)
    model = AlignPreSparse(n_in, n, seed)
    return _spike_case("csr_float", model, n_in, batch_size, seed)


class AlignPreSparse(brainstate.nn.Module):
    """Hand-built AlignPre (as zoo.AlignPreNet) whose comm is a `SparseLinear` over a CSR matrix."""

    def __init__(self, n_pre, n_post, seed):
        super().__init__()
        self.pre_syn = bps.Expon(n_pre, tau=5.0 * u.ms, g_initializer=braintools.init.Constant(0.0))
        self.N = _lif(n_post)
        comm = brainstate.nn.SparseLinear(_csr(n_pre, n_post, 0.4, seed), in_size=(n_pre,))
        self.proj = bps.CurrentProj(comm=comm, out=bps.CUBA(scale=5.0 * u.mA), post=self.N)

    def update(self, x):
        self.proj(self.pre_syn(x))
        return self.N()


# --------------------------------------------------------------------------- 2. convolutions


class ConvLayer(brainstate.nn.Module):
    """Input spikes on a grid -> Conv (no bias) -> Expon -> CUBA -> LIF over channels x positions."""

    def __init__(self, conv: brainstate.nn.Module):
        super().__init__()
        shape = tuple(conv.out_size)
        self.N = _lif(shape)
        syn = bps.Expon.desc(shape, tau=5.0 * u.ms, g_initializer=braintools.init.Constant(0.0))
        self.inp = bps.AlignPostProj(comm=conv, syn=syn, out=bps.CUBA.desc(scale=1.0 * u.mA), post=self.N)

    def update(self, x):
        self.inp(x)
        return self.N()


def conv1d(batch_size=None, length=4, channels=2, out_channels=3, kernel=2, seed=0) -> zoo.Case:
    """Conv1d over (length 4, 2 channels) -> 3 positions x 3 channels of LIF (exact regime)."""
    _begin(seed)
    conv = brainstate.nn.Conv1d(
        (length, channels), out_channels, kernel, padding="VALID", w_init=_kaiming(kernel * channels, 3.0), b_init=None
    )
    model = ConvLayer(conv)
    shape = (length, channels) if batch_size is None else (batch_size, length, channels)
    return _case("conv1d", model, (_grid_spikes(shape),), batch_size, seed)


def conv2d(batch_size=None, height=2, width=4, out_channels=2, seed=0) -> zoo.Case:
    """Conv2d over a 2x4 one-channel grid, 2x2 kernel -> 1x3 positions x 2 channels of LIF (exact)."""
    _begin(seed)
    conv = brainstate.nn.Conv2d(
        (height, width, 1), out_channels, (2, 2), padding="VALID", w_init=_kaiming(4, 3.0), b_init=None
    )
    model = ConvLayer(conv)
    shape = (height, width, 1) if batch_size is None else (batch_size, height, width, 1)
    return _case("conv2d", model, (_grid_spikes(shape),), batch_size, seed)


def _grid_spikes(shape):
    """The zoo's fixed spike pattern laid out on a grid (`shape` includes the batch axis if any)."""
    return jnp.reshape(_spikes(int(np.prod(shape)), None), shape)


# --------------------------------------------------------------------------- 3. control flow in update


class NestedJit(brainstate.nn.Module):
    """The step is a `brainstate.transform.jit` of a method, which calls a `jax.jit` helper."""

    def __init__(self, n_in, n):
        super().__init__()
        self.N = _lif(n)
        self.fc = _dense(n_in, n)

    def update(self, x):
        return brainstate.transform.jit(self._step)(x)

    def _step(self, x):
        current = _jitted_softsign(u.get_mantissa(self.fc(x))) * u.mA
        return self.N(current)


@jax.jit
def _jitted_softsign(x):
    return 2.0 * x / (1.0 + jnp.abs(x))


def nested_jit(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("nested_jit", NestedJit(n_in, n), n_in, batch_size, seed)


class ClampedLif(brainstate.nn.Module):
    """LIF with a user-written lower bound on V (`where`, a `select_n` on the hidden path)."""

    def __init__(self, n_in, n):
        super().__init__()
        self.N = _lif(n)
        self.inp = _cuba(_dense(n_in, n, scale=3.0), self.N, n)

    def update(self, x):
        self.inp(x)
        spikes = self.N()
        v = self.N.V.value
        self.N.V.value = u.math.where(v < 0.2 * u.mV, 0.2 * u.mV, v)
        return spikes


def where_clamp(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("where_clamp", ClampedLif(n_in, n), n_in, batch_size, seed)


class GatedInput(brainstate.nn.Module):
    """The input current is switched by `brainstate.transform.cond` on a weight-free predicate (enough
    input spikes); the weight is used inside one branch."""

    def __init__(self, n_in, n):
        super().__init__()
        self.n = n
        self.N = _lif(n)
        self.fc = _dense(n_in, n, scale=3.0)

    def update(self, x):
        def on():
            return self.fc(x)

        def off():
            return jnp.zeros((*x.shape[:-1], self.n)) * u.mA

        current = brainstate.transform.cond(jnp.sum(x) > 0.6 * x.size, on, off)
        return self.N(current)


def cond_gate(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("cond_gate", GatedInput(n_in, n), n_in, batch_size, seed)


class SubSteps(brainstate.nn.Module):
    """`n_substeps` neuron sub-steps of dt / n_substeps per step with `brainstate.transform.for_loop` (a
    `scan` whose carry holds the hidden V); returns the mean spike count. `weight_inside` computes the
    input current inside the loop body instead of before it."""

    def __init__(self, n_in, n, n_substeps: int, weight_inside: bool):
        super().__init__()
        self.n_substeps, self.weight_inside = n_substeps, weight_inside
        self.N = _lif(n)
        self.fc = _dense(n_in, n, scale=3.0)

    def update(self, x):
        current = None if self.weight_inside else self.fc(x)

        def substep(i):
            with brainstate.environ.context(dt=DT / self.n_substeps):
                return self.N(self.fc(x) if self.weight_inside else current)

        spikes = brainstate.transform.for_loop(substep, jnp.arange(self.n_substeps))
        return jnp.mean(spikes, axis=0)


LONG = 40  # sub-steps of a "long" loop: more than a compiler would unroll


def for_loop_substeps(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    """Two sub-steps, the weight applied before the loop (exact regime)."""
    _begin(seed)
    model = SubSteps(n_in, n, 2, weight_inside=False)
    return _spike_case("for_loop_substeps", model, n_in, batch_size, seed)


def long_substeps(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    """`LONG` sub-steps, the weight applied before the loop (exact regime: the loop carries V only)."""
    _begin(seed)
    model = SubSteps(n_in, n, LONG, weight_inside=False)
    return _spike_case("long_substeps", model, n_in, batch_size, seed)


class ActivityDecay(brainstate.nn.Module):
    """After the LIF step, a weight-free `brainstate.transform.cond` on the population's activity picks
    an extra leak of V (a cond with no weight in its branches)."""

    def __init__(self, n_in, n):
        super().__init__()
        self.N = _lif(n)
        self.inp = _cuba(_dense(n_in, n, scale=4.0), self.N, n)

    def update(self, x):
        self.inp(x)
        spikes = self.N()
        v = self.N.V.value
        self.N.V.value = brainstate.transform.cond(jnp.mean(spikes) > 0.05, lambda v: 0.9 * v, lambda v: v, v)
        return spikes


def cond_decay(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("cond_decay", ActivityDecay(n_in, n), n_in, batch_size, seed)


class WhileReset(brainstate.nn.Module):
    """After the LIF step, a weight-free `while_loop` subtracts 0.15 mV from V until no V exceeds 0.8 mV
    (a user-written clamp; on this input it runs 0 to 3 iterations per step)."""

    def __init__(self, n_in, n):
        super().__init__()
        self.N = _lif(n)
        self.inp = _cuba(_dense(n_in, n, scale=4.0), self.N, n)

    def update(self, x):
        self.inp(x)
        spikes = self.N()
        v = self.N.V.value.to_decimal(u.mV)
        v = brainstate.transform.while_loop(lambda v: jnp.any(v > 0.8), lambda v: jnp.where(v > 0.8, v - 0.15, v), v)
        self.N.V.value = v * u.mV
        return spikes


def while_reset(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("while_reset", WhileReset(n_in, n), n_in, batch_size, seed)


@jax.custom_jvp
def fast_sigmoid_spike(x):
    """Heaviside spike with a fast-sigmoid surrogate derivative, as a user's `jax.custom_jvp`."""
    return (x > 0.0).astype(x.dtype)


@fast_sigmoid_spike.defjvp
def _fast_sigmoid_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return fast_sigmoid_spike(x), dx / (1.0 + 4.0 * jnp.abs(x)) ** 2


def custom_jvp_spike(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    """LIF whose `spk_fun` is a user `custom_jvp` spike (exact regime)."""
    _begin(seed)
    model = Layer(_dense(n_in, n), _lif(n, spk_fun=fast_sigmoid_spike), n)
    return _spike_case("custom_jvp_spike", model, n_in, batch_size, seed)


@jax.custom_vjp
def straight_through_clip(x):
    """Clip to [-1, 1] forward, identity backward (a user's `jax.custom_vjp`)."""
    return jnp.clip(x, -1.0, 1.0)


def _clip_fwd(x):
    return straight_through_clip(x), None


def _clip_bwd(_, cotangent):
    return (cotangent,)


straight_through_clip.defvjp(_clip_fwd, _clip_bwd)


class ClippedCurrent(brainstate.nn.Module):
    """The input current goes through a `custom_vjp` straight-through clip before the LIF."""

    def __init__(self, n_in, n):
        super().__init__()
        self.N = _lif(n)
        self.fc = _dense(n_in, n, scale=2.0)

    def update(self, x):
        return self.N(straight_through_clip(self.fc(x).to_decimal(u.mA)) * u.mA)


def custom_vjp_current(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("custom_vjp_current", ClippedCurrent(n_in, n), n_in, batch_size, seed)


# --------------------------------------------------------------------------- 4. delays


def post_delay(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    """`AlignPostProj(delay=0.2 ms)` (two steps of dt): the input spikes reach the weight through a ring
    buffer (exact regime)."""
    _begin(seed)
    model = DelayedProjection(n_in, n)
    return _spike_case("post_delay", model, n_in, batch_size, seed)


class DelayedProjection(brainstate.nn.Module):
    def __init__(self, n_in, n):
        super().__init__()
        self.N = _lif(n)
        self.inp = bps.AlignPostProj(
            comm=_dense(n_in, n, scale=3.0),
            syn=_current_syn(n),
            out=bps.CUBA.desc(scale=1.0),
            post=self.N,
            delay=0.2 * u.ms,
        )

    def update(self, x):
        self.inp(x)
        return self.N()


class PrefetchDelayed(brainstate.nn.Module):
    """A weight-free input population `pre` (LIF driven by the input spikes) projects to `post` through
    its membrane potential delayed by `pre.prefetch('V').delay.at(0.2 ms)`."""

    def __init__(self, n_in, n):
        super().__init__()
        self.pre = _lif(n_in)
        self.post = _lif(n)
        self.delayed_v = self.pre.prefetch("V").delay.at(0.2 * u.ms)
        self.proj = _cuba(_dense(n_in, n, scale=3.0), self.post, n)

    def update(self, x):
        self.proj(self.pre.get_spike(self.delayed_v()))
        self.pre(x * 30.0 * u.mA)
        return self.post()


def prefetch_delay(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("prefetch_delay", PrefetchDelayed(n_in, n), n_in, batch_size, seed)


# --------------------------------------------------------------------------- 5. neurons and synapses


class RefractoryLayer(brainstate.nn.Module):
    """`LIFRef` (refractory period 0.3 ms = 3 steps). Its update reads the clock `t` from the
    environment, so the step takes the time as a second input."""

    def __init__(self, n_in, n):
        super().__init__()
        self.N = bps.LIFRef(
            n,
            tau=10.0 * u.ms,
            tau_ref=0.3 * u.ms,
            V_th=1.0 * u.mV,
            V_reset=0.0 * u.mV,
            V_rest=0.0 * u.mV,
            V_initializer=HostRandom("uniform", 0.0, 1.0, u.mV),
        )
        self.inp = _cuba(_dense(n_in, n, scale=4.0), self.N, n)

    def update(self, x, t):
        with brainstate.environ.context(t=t):
            self.inp(x)
            return self.N()


def lif_ref(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    model = RefractoryLayer(n_in, n)
    return _case("lif_ref", model, (_spikes(n_in, batch_size), 0.0 * u.ms), batch_size, seed)


class STPLayer(brainstate.nn.Module):
    """STP as a pre-module: `STP(n_in)` (hidden u, x per input) scales the input spikes it releases,
    which a dense AlignPostProj carries to the LIF."""

    def __init__(self, n_in, n):
        super().__init__()
        self.stp = bps.STP(n_in, U=0.3, tau_f=5.0 * u.ms, tau_d=3.0 * u.ms)
        self.N = _lif(n)
        self.inp = _cuba(_dense(n_in, n, scale=5.0), self.N, n)

    def update(self, x):
        self.inp(self.stp(x))
        return self.N()


def stp(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("stp", STPLayer(n_in, n), n_in, batch_size, seed)


def adex(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    """AdExIF (V and adaptation current w) with a CUBA input projection (exact regime)."""
    _begin(seed)
    neuron = bps.AdExIF(
        n,
        tau=10.0 * u.ms,
        tau_w=30.0 * u.ms,
        V_th=-50.0 * u.mV,
        V_reset=-65.0 * u.mV,
        V_rest=-65.0 * u.mV,
        V_T=-55.0 * u.mV,
        delta_T=2.0 * u.mV,
        a=0.5 * u.siemens,
        b=0.5 * u.mA,
        V_initializer=HostRandom("uniform", -60.0, -50.0, u.mV),
    )
    model = Layer(_dense(n_in, n, scale=40.0), neuron, n)
    return _spike_case("adex", model, n_in, batch_size, seed)


def izhikevich(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    """Izhikevich (V, u; hard reset) with a CUBA input projection (exact regime)."""
    _begin(seed)
    neuron = bps.Izhikevich(n, V_initializer=HostRandom("uniform", -70.0, 25.0, u.mV))
    model = Layer(_dense(n_in, n, scale=40.0, unit=u.mV / u.ms), neuron, n, unit=u.mV / u.ms)
    return _spike_case("izhikevich", model, n_in, batch_size, seed)


# --------------------------------------------------------------------------- 6. several hidden states, rate cells


class TwoConductances(brainstate.nn.Module):
    """The user writes the synaptic current from two conductances and the membrane potential:
    `I = g_E (E_E - V) + g_I (E_I - V)`, each g an Expon fed by its own dense weight."""

    def __init__(self, n_in, n):
        super().__init__()
        self.N = _lif(n)
        zero = braintools.init.Constant(0.0 * u.siemens)
        self.syn_e = bps.Expon(n, tau=5.0 * u.ms, g_initializer=zero)
        self.syn_i = bps.Expon(n, tau=10.0 * u.ms, g_initializer=zero)
        self.fc_e = _dense(n_in, n, unit=u.siemens, scale=2.0)
        self.fc_i = _dense(n_in, n, unit=u.siemens, scale=1.0)

    def update(self, x):
        v = self.N.V.value
        g_e = self.syn_e(self.fc_e(x))
        g_i = self.syn_i(self.fc_i(x))
        return self.N(g_e * (5.0 * u.mV - v) + g_i * (-1.0 * u.mV - v))


def two_conductances(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("two_conductances", TwoConductances(n_in, n), n_in, batch_size, seed)


class RateNet(brainstate.nn.Module):
    """A brainstate.nn rate cell (GRU, LSTM, vanilla RNN, MGU) and an instantaneous Linear readout."""

    def __init__(self, cell_type, n_in, n, n_out):
        super().__init__()
        self.cell = cell_type(n_in, n, w_init=_kaiming(n_in + n, 1.5), b_init=HostRandom("normal", 0.0, 0.1))
        self.out = brainstate.nn.Linear(n, n_out, w_init=_kaiming(n), b_init=braintools.init.Constant(0.1))

    def update(self, x):
        return self.out(self.cell(x))


def _rate_cell(cell_type, name):
    def factory(batch_size=None, n_in=4, n=6, n_out=2, seed=0) -> zoo.Case:
        _begin(seed)
        model = RateNet(cell_type, n_in, n, n_out)
        return _spike_case(name, model, n_in, batch_size, seed)

    factory.__name__ = name
    return factory


gru = _rate_cell(brainstate.nn.GRUCell, "gru")
lstm = _rate_cell(brainstate.nn.LSTMCell, "lstm")
vanilla_rnn = _rate_cell(brainstate.nn.ValinaRNNCell, "vanilla_rnn")
mgu = _rate_cell(brainstate.nn.MGUCell, "mgu")


# --------------------------------------------------------------------------- 7. paths beyond weight -> tail


def chained_linear(batch_size=None, n_in=6, n_mid=5, n=8, seed=0) -> zoo.Case:
    """A `Sequential(Linear, Linear)` comm: the first weight reaches the conductance only through the
    second (weight -> weight)."""
    _begin(seed)
    comm = brainstate.nn.Sequential(
        brainstate.nn.Linear(n_in, n_mid, w_init=_kaiming(n_in, 2.0), b_init=None), _dense(n_mid, n, scale=2.0)
    )
    return _spike_case("chained_linear", Layer(comm, _lif(n), n), n_in, batch_size, seed)


class Centered(brainstate.nn.Module):
    """A dense comm whose output is centred over the neurons (`normalise=False`: y - mean(y)) or
    standardised (`normalise=True`: (y - mean) / std): a non-element-wise tail."""

    def __init__(self, n_pre, n_post, normalise: bool):
        super().__init__()
        self.in_size, self.out_size = (n_pre,), (n_post,)
        self.normalise = normalise
        self.fc = _dense(n_pre, n_post, scale=3.0)

    def update(self, x):
        y = self.fc(x).to_decimal(u.mA)
        y = y - jnp.mean(y, axis=-1, keepdims=True)
        if self.normalise:
            y = y / jnp.sqrt(jnp.mean(y**2, axis=-1, keepdims=True) + 0.1)
        return y * u.mA


def mean_subtraction(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    model = Layer(Centered(n_in, n, normalise=False), _lif(n), n)
    return _spike_case("mean_subtraction", model, n_in, batch_size, seed)


def normalised(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    model = Layer(Centered(n_in, n, normalise=True), _lif(n), n)
    return _spike_case("normalised", model, n_in, batch_size, seed)


def loop_weight(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    """Two sub-steps in a `for_loop` with the weight applied inside the loop body."""
    _begin(seed)
    return _spike_case("loop_weight", SubSteps(n_in, n, 2, weight_inside=True), n_in, batch_size, seed)


def long_loop_weight(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    """`LONG` sub-steps in a `for_loop` with the weight applied inside the loop body."""
    _begin(seed)
    return _spike_case("long_loop_weight", SubSteps(n_in, n, LONG, weight_inside=True), n_in, batch_size, seed)


class BiasedLayer(brainstate.nn.Module):
    """LIF + dense AlignPost input + a learnable per-neuron bias current (a ParamState of shape (n,))."""

    def __init__(self, n_in, n):
        super().__init__()
        self.N = _lif(n)
        self.inp = _cuba(_dense(n_in, n), self.N, n)
        self.bias = brainstate.ParamState(jnp.asarray(np.linspace(-1.0, 1.0, n), brainstate.environ.dftype()))

    def update(self, x):
        self.inp(x)
        return self.N(self.bias.value * u.mA)


def bias_current(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    _begin(seed)
    return _spike_case("bias_current", BiasedLayer(n_in, n), n_in, batch_size, seed)


class ThresholdLIF(bps.LIF):
    """LIF whose spike function reads a learnable per-neuron threshold `theta` (a ParamState, mV): the
    spike is `spk_fun((V - theta) / (V_th - V_reset))` (the soft reset still subtracts V_th)."""

    def __init__(self, n, **kw):
        super().__init__(n, **kw)
        self.theta = brainstate.ParamState(jnp.asarray(np.linspace(0.8, 1.2, n), brainstate.environ.dftype()))

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun((V - self.theta.value * u.mV) / (self.V_th - self.V_reset))


def threshold(batch_size=None, n_in=6, n=8, seed=0) -> zoo.Case:
    """LIF + dense AlignPost input with a learnable per-neuron threshold (exact regime)."""
    _begin(seed)
    neuron = ThresholdLIF(
        n,
        tau=10.0 * u.ms,
        V_th=1.0 * u.mV,
        V_reset=0.0 * u.mV,
        V_rest=0.0 * u.mV,
        V_initializer=HostRandom("uniform", 0.0, 1.0, u.mV),
    )
    return _spike_case("threshold", Layer(_dense(n_in, n, scale=3.0), neuron, n), n_in, batch_size, seed)


# --------------------------------------------------------------------------- registry


def random_spikes(inputs: tuple, steps: int, seed: int = 7) -> tuple:
    """`steps` random 0/1 draws shaped like each example input (time axis first), one per input."""
    keys = jax.random.split(jax.random.PRNGKey(seed), steps * len(inputs)).reshape(len(inputs), steps, -1)
    return tuple(
        jnp.stack([(jax.random.uniform(k, jnp.shape(x)) < 0.6).astype(jnp.asarray(x).dtype) for k in ks])
        for x, ks in zip(inputs, keys, strict=True)
    )


def spikes_and_clock(inputs: tuple, steps: int, seed: int = 7) -> tuple:
    """Random spikes for the first input and the clock `t = k dt` for the second."""
    (xs,) = random_spikes(inputs[:1], steps, seed)
    return xs, jnp.arange(steps) * DT


BATCHED, BATCHED_AND_NOT = (2,), (2, None)


@dataclasses.dataclass(frozen=True)
class Model:
    """A coverage model: see the module docstring."""

    name: str
    item: int
    factory: Callable[..., zoo.Case]
    regime: str
    batch_sizes: tuple = BATCHED
    sequence: Callable[[tuple, int], tuple] = random_spikes
    reference: str = "reverse"

    def __post_init__(self):
        if self.regime not in (EXACT, APPROXIMATE, ERROR_OR_APPROXIMATE):
            raise ValueError(f"{self.name}: unknown regime {self.regime!r}")
        if self.reference not in ("reverse", "forward"):
            raise ValueError(f"{self.name}: unknown reference {self.reference!r}")

    def build(self, batch_size) -> zoo.Case:
        return self.factory(batch_size=batch_size)


def _partial(fn, **kw):
    def build(batch_size=None):
        return fn(batch_size=batch_size, **kw)

    build.__name__ = fn.__name__
    return build


MODELS = (
    # 1. event-driven and sparse weights
    # (the zoo's EventLinear / EventFixedProb models are checked against BPTT unbatched too, with leaky and
    # linear readouts, in test_compile_exact: batched here)
    Model("event_linear", 1, zoo.event_linear, EXACT),
    Model("fixed_prob_array", 1, _partial(zoo.fixed_prob, weight="array"), EXACT),
    Model("fixed_prob_scalar", 1, _partial(zoo.fixed_prob, weight="scalar"), EXACT),
    Model("csr_event", 1, csr_event, EXACT, batch_sizes=BATCHED_AND_NOT),
    Model("csr_float", 1, csr_float, EXACT, batch_sizes=BATCHED_AND_NOT),
    # 2. convolutions
    Model("conv1d", 2, conv1d, EXACT, batch_sizes=BATCHED_AND_NOT),
    Model("conv2d", 2, conv2d, EXACT, batch_sizes=BATCHED_AND_NOT),
    # 3. control flow inside update
    Model("nested_jit", 3, nested_jit, EXACT),
    Model("where_clamp", 3, where_clamp, EXACT),
    Model("cond_gate", 3, cond_gate, EXACT),
    Model("cond_decay", 3, cond_decay, EXACT),
    Model("for_loop_substeps", 3, for_loop_substeps, EXACT),
    Model("long_substeps", 3, long_substeps, EXACT),
    Model("while_reset", 3, while_reset, EXACT, reference="forward"),
    Model("custom_jvp_spike", 3, custom_jvp_spike, EXACT),
    Model("custom_vjp_current", 3, custom_vjp_current, EXACT),
    # 4. delays, unbatched only: upstream, InputDelay keeps an unbatched ring buffer and a batched
    # prefetch delay gets a doubled batch axis in its history ([steps, 2, 2, n])
    Model("post_delay", 4, post_delay, EXACT, batch_sizes=(None,)),
    Model("prefetch_delay", 4, prefetch_delay, EXACT, batch_sizes=(None,)),
    # 5. neurons and synapses
    Model("lif_ref", 5, lif_ref, EXACT, sequence=spikes_and_clock),
    Model("stp", 5, stp, EXACT),
    Model("align_pre", 5, zoo.align_pre, EXACT),
    Model("alif", 5, zoo.alif, EXACT),
    Model("adex", 5, adex, EXACT),
    Model("izhikevich", 5, izhikevich, EXACT),
    # 6. several hidden states in one equation; rate cells
    Model("two_conductances", 6, two_conductances, EXACT),
    Model("gru", 6, gru, APPROXIMATE),
    Model("lstm", 6, lstm, APPROXIMATE),
    Model("vanilla_rnn", 6, vanilla_rnn, APPROXIMATE),
    Model("mgu", 6, mgu, APPROXIMATE),
    # 7. weight -> weight, non-element-wise tails, weights in loops, per-neuron parameters
    Model("chained_linear", 7, chained_linear, APPROXIMATE),
    Model("mean_subtraction", 7, mean_subtraction, APPROXIMATE),
    Model("normalised", 7, normalised, APPROXIMATE),
    Model("loop_weight", 7, loop_weight, EXACT),  # exact once a short loop is unrolled
    Model("long_loop_weight", 7, long_loop_weight, ERROR_OR_APPROXIMATE),
    Model("bias_current", 7, bias_current, EXACT),
    Model("threshold", 7, threshold, EXACT),
)
COVERAGE: dict[str, Model] = {model.name: model for model in MODELS}
