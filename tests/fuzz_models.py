"""Random brainpy.state networks for differential fuzzing: a grammar as frozen records, and a builder.

Nothing here imports fusetrace. A `Spec` describes a whole network (its populations, projections,
readouts, inputs, outputs, loss, control flow and batch size) in plain values, so a failing example prints
as a readable, reproducible model; `build(spec)` turns it into an initialised `FuzzNet` written the way
users write brainpy.state models (stock modules, upstream bugs worked around as DESIGN.md §4 says).
The hypothesis strategies that draw specs live in `tests/fuzz_strategies.py`.

Grammar (docs/reliability.md lists what is covered):
* populations: LIF, LIFRef (the step takes the clock `t` as an input), ALIF, AdEx, Izhikevich, a
  user-written leaky tanh rate cell, brainstate.nn's gated cells (GRU, LSTM, MGU: per-gate traces, a gate
  crossing the cell's other weight); one τ or one per neuron; a learnable per-neuron bias current or
  threshold (the threshold is read wherever the population's spikes are);
* projections: from an input, from a population's new spikes (an earlier population: feed-forward, skip)
  or its previous ones (any population: recurrent, lateral, backward); comms Linear with or without
  bias, EventLinear, EventFixedProb (per-synapse or one shared weight), a CSR matrix applied to binary
  spikes, a user comm whose weight is transformed before the op (abs, a fixed mask, normalised rows),
  or the weight of another projection (tied); synapses AlignPost Expon / DualExpon (CUBA or COBA), a
  pre-sized Expon / Alpha (AlignPre, by hand), a post-sized Expon / Alpha the user calls, a plain current,
  a delta (voltage) input; STP on the presynaptic spikes; a delay of one or two steps;
* readouts: none (spikes or a hidden state as output), Linear (with or without bias), LeakyRateReadout
  with one τ or one per output, a user readout with a trained τ; reading new spikes, the previous step's
  spikes, the membrane potential, several populations concatenated, or another readout (in series);
* outputs: one array, a tuple, a dict; losses: MSE every step, MSE in a masked window, cross-entropy; an
  optional firing-rate regulariser; control flow inside `update`: a `jit`, a weight-free `cond`, a short
  `for_loop`; batch None, 1 or several; a second spike input and an input noise current.
"""

import dataclasses
from collections.abc import Sequence

import brainevent
import brainpy  # noqa: F401  (brainpy.state lives inside brainpy >= 2.9)
import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

DT = 1.0 * u.ms
SPIKING = ("lif", "lif_ref", "alif", "adex", "izhikevich")
GATED = ("gru", "lstm", "mgu")  # brainstate.nn's gated cells, fed their population's summed current
RATE = ("rate", *GATED)
NEURON_KINDS = (*SPIKING, *RATE)
COMMS = ("linear", "linear_bias", "event_linear", "fixed_prob", "fixed_prob_scalar", "csr", "transformed", "conv")
TRANSFORMS = ("abs", "mask", "normalise")
SYNAPSES = ("post_expon", "post_dual_expon", "pre_expon", "pre_alpha", "user_expon", "user_alpha", "current", "delta")
READOUTS = ("none", "linear", "linear_bias", "leaky", "leaky_per_unit", "trained_tau")
READS = ("spikes", "prev_spikes", "V")
LOSSES = ("mse", "window", "cross_entropy")
CONTROLS = ("none", "jit", "cond", "scan")
CHECKS = ("none", "jit_eager", "batch_one", "scan_loop")
BINARY_COMMS = ("event_linear", "fixed_prob", "fixed_prob_scalar", "csr")  # read their input as 0/1 events


# --------------------------------------------------------------------------- the grammar, as records


@dataclasses.dataclass(frozen=True)
class Population:
    """One population. `param`: "none", "bias" (a learnable current per neuron) or "threshold" (LIF only).
    `surrogate`: the spike function's surrogate ("relu" or "sigmoid")."""

    kind: str
    size: int
    hetero_tau: bool = False
    param: str = "none"
    surrogate: str = "relu"
    channels: int = 0  # > 0: laid out as positions x channels (a convolution's output), read flattened

    def __post_init__(self):
        assert self.kind in NEURON_KINDS, self.kind
        assert self.channels == 0 or (self.kind in SPIKING and self.size % self.channels == 0)
        assert self.param in ("none", "bias", "threshold"), self.param
        assert self.param != "threshold" or self.kind == "lif", "a learnable threshold is written for LIF"

    @property
    def spiking(self) -> bool:
        return self.kind in SPIKING

    @property
    def shape(self) -> tuple[int, ...]:
        """The neuron layout: `(size,)`, or `(positions, channels)`."""
        return (self.size // self.channels, self.channels) if self.channels else (self.size,)


@dataclasses.dataclass(frozen=True)
class Projection:
    """`source` is "x0"/"x1" (an input) or "p<k>" (population k), read at `timing` "new" (this step's
    spikes; k before `target`) or "prev" (the spikes of the previous step). `tie`: index of an earlier
    projection whose comm (and weight) this one reuses. `delay`: steps (AlignPost only, unbatched)."""

    source: str
    target: int
    comm: str = "linear"
    synapse: str = "post_expon"
    coba: bool = False
    transform: str = "none"
    stp: bool = False
    delay: int = 0
    timing: str = "new"
    sign: float = 1.0
    scale: float = 1.0
    tie: int | None = None

    def __post_init__(self):
        assert self.comm in COMMS and self.synapse in SYNAPSES and self.timing in ("new", "prev")
        assert (self.comm == "transformed") == (self.transform in TRANSFORMS)
        assert self.comm != "conv" or (self.source.startswith("x") and self.tie is None)


@dataclasses.dataclass(frozen=True)
class Readout:
    """A readout of `sources` ("p<k>" populations concatenated, or "r<k>" an earlier readout) read as
    `read` ("spikes", "prev_spikes", "V"). kind "none" passes the read values through unweighted."""

    kind: str
    sources: tuple[str, ...]
    read: str = "spikes"
    size: int = 2

    def __post_init__(self):
        assert self.kind in READOUTS and self.read in READS and self.sources


@dataclasses.dataclass(frozen=True)
class Spec:
    """A whole network and how it is driven and scored (see the module docstring)."""

    populations: tuple[Population, ...]
    projections: tuple[Projection, ...]
    readouts: tuple[Readout, ...]
    n_inputs: tuple[int, ...] = (4,)
    input_rate: float = 0.5
    noise: int | None = None  # population that receives an input noise current
    batch: int | None = 2
    outputs: str = "single"  # "single" (the last readout), "tuple", "dict"
    loss: str = "mse"
    regularizer: bool = False
    control: str = "none"
    steps: int = 8
    seed: int = 0
    check: str = "none"  # the extra invariant checked on this model (CHECKS)
    dropout: bool = False  # `brainstate.nn.Dropout` on what every weighted readout reads (random inside `update`)

    @property
    def clock(self) -> bool:
        """The step takes the time `t` as its last input (a LIFRef reads it)."""
        return any(p.kind == "lif_ref" for p in self.populations)

    def structure(self) -> str:
        """The spec without its numbers (seed, input rate, weight scales and signs): two specs with equal
        structure build the same program, so a long run tests each structure once."""
        projections = tuple(dataclasses.replace(p, scale=1.0, sign=1.0) for p in self.projections)
        return repr(dataclasses.replace(self, seed=0, input_rate=0.5, projections=projections))

    def features(self) -> list[str]:
        """Every grammar feature the spec uses, as `kind:value` strings (for the fuzz report)."""
        found = [f"batch:{self.batch}", f"outputs:{self.outputs}", f"loss:{self.loss}", f"control:{self.control}"]
        found += [f"populations:{len(self.populations)}", f"inputs:{len(self.n_inputs)}"]
        found += ["regularizer"] * self.regularizer + ["noise_input"] * (self.noise is not None)
        found += ["dropout"] * self.dropout
        for p in self.populations:
            found += [f"neuron:{p.kind}", f"param:{p.param}", f"surrogate:{p.surrogate}"]
            found += ["hetero_tau"] * p.hetero_tau
        for j in self.projections:
            found += [f"comm:{j.comm}", f"synapse:{j.synapse}", f"wiring:{wiring(self, j)}"]
            found += [f"transform:{j.transform}"] * (j.transform != "none")
            found += ["coba"] * j.coba + ["stp"] * j.stp + [f"delay:{j.delay}"] * (j.delay > 0)
            found += ["tied"] * (j.tie is not None)
        for r in self.readouts:
            found += [f"readout:{r.kind}", f"read:{r.read}"]
            found += ["readout:series"] * any(s.startswith("r") for s in r.sources)
            found += ["readout:concat"] * (len(r.sources) > 1)
        return sorted(set(found))


def wiring(spec: Spec, projection: Projection) -> str:
    """The projection's wiring: "input", "feed_forward", "skip" (past the next population), "recurrent"
    (its own previous spikes) or "lateral_or_backward" (another population's previous spikes)."""
    if projection.source.startswith("x"):
        return "input"
    k = int(projection.source[1:])
    if projection.timing == "new":
        return "feed_forward" if projection.target == k + 1 else "skip"
    return "recurrent" if k == projection.target else "lateral_or_backward"


def source_size(spec: Spec, source: str) -> int:
    kind, index = source[0], int(source[1:])
    if kind == "x":
        return spec.n_inputs[index]
    if kind == "p":
        return spec.populations[index].size
    return spec.readouts[index].size


# --------------------------------------------------------------------------- per-kind constants


@dataclasses.dataclass(frozen=True)
class Scale:
    """A neuron kind's units: its input current unit, how much current (in that unit) brings a neuron
    from rest to threshold in a few steps, and the voltage jump of a delta input that does."""

    current: object
    drive: float
    delta_mv: float


SCALES = {
    "lif": Scale(u.mA, 0.9, 0.45),
    "lif_ref": Scale(u.mA, 1.1, 0.55),
    "alif": Scale(u.mA, 1.1, 0.55),
    "adex": Scale(u.mA, 14.0, 4.0),
    "izhikevich": Scale(u.mV / u.ms, 26.0, 0.0),  # its update ignores delta inputs
    "rate": Scale(1.0, 1.5, 0.0),
    **{kind: Scale(1.0, 1.5, 0.0) for kind in GATED},
}
# Current per unit of drive that gives the same firing as an AlignPost Expon (measured: 0.2-0.3 spikes per
# neuron and step at scale 1 with half the inputs active, 16 steps).
SYNAPSE_GAIN = {
    "post_expon": 1.0,
    "post_dual_expon": 0.75,
    "pre_expon": 0.9,
    "pre_alpha": 1.4,
    "user_expon": 1.0,
    "user_alpha": 1.4,
    "current": 2.8,
    "delta": 1.0,
}
DROPOUT_KEEP = 0.8  # the keep probability of the readouts' dropout
COBA_SIEMENS = 0.4  # conductance per unit of scale of a conductance-based synapse (E = 5 mV, V_th = 1 mV)


class HostInit:
    """A seeded numpy initializer `init(shape) -> array` (times `unit`): `mean + std * N(0, 1)`, or
    `U(mean - std, mean + std)` when `uniform`. Host draws keep builds deterministic and cheap."""

    def __init__(self, rng: np.random.Generator, mean: float, std: float, unit=None, uniform: bool = False):
        self.rng, self.mean, self.std, self.unit, self.uniform = rng, mean, std, unit, uniform

    def __call__(self, shape, **kwargs):
        shape = tuple(np.atleast_1d(shape)) if not isinstance(shape, tuple) else shape
        if self.uniform:
            x = self.rng.uniform(self.mean - self.std, self.mean + self.std, size=shape)
        else:
            x = self.mean + self.std * self.rng.standard_normal(shape)
        x = jnp.asarray(x, dtype=brainstate.environ.dftype())
        return x if self.unit is None else x * self.unit


def _spk_fun(name: str):
    return braintools.surrogate.Sigmoid() if name == "sigmoid" else braintools.surrogate.ReluGrad()


def _tau(pop: Population, base: float):
    taus = jnp.linspace(0.6 * base, 1.6 * base, pop.size).reshape(pop.shape)
    return (taus if pop.hetero_tau else base) * u.ms


# --------------------------------------------------------------------------- populations


class ThresholdLIF(bps.LIF):
    """LIF whose spike function reads a learnable per-neuron threshold `theta` (mV, a ParamState):
    `spk_fun((V - theta) / (V_th - V_reset))`; every `get_spike()` reads it."""

    def __init__(self, n, theta, **kw):
        super().__init__(n, **kw)
        self.theta = brainstate.ParamState(theta)

    def get_spike(self, V=None):
        V = self.V.value if V is None else V
        return self.spk_fun((V - self.theta.value * u.mV) / (self.V_th - self.V_reset))


class LeakyTanh(brainstate.nn.Module):
    """A user-written rate cell `h ← λ h + (1 − λ) tanh(I)`; `get_spike()` returns `h` (its output)."""

    def __init__(self, n: int, tau):
        super().__init__()
        self.varshape, self.tau = (n,), tau

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(braintools.init.param(braintools.init.Constant(0.0), self.varshape, batch_size))

    def get_spike(self):
        return self.h.value

    def update(self, current=0.0):
        decay = jnp.exp(-u.get_mantissa(brainstate.environ.get_dt() / self.tau))
        self.h.value = decay * self.h.value + (1.0 - decay) * jnp.tanh(current)
        return self.h.value


class GatedCell(brainstate.nn.Module):
    """A `brainstate.nn` gated cell (`GRUCell`, `LSTMCell`, `MGUCell`, as users build them, weights drawn
    on the host) whose input is its population's summed current; `get_spike()` returns `h`."""

    def __init__(self, kind: str, n: int, rng: np.random.Generator):
        super().__init__()
        cell = {"gru": brainstate.nn.GRUCell, "lstm": brainstate.nn.LSTMCell, "mgu": brainstate.nn.MGUCell}[kind]
        weights, biases = HostInit(rng, 0.0, 1.0 / np.sqrt(2 * n)), HostInit(rng, 0.0, 0.1)
        self.cell = cell(n, n, w_init=weights, b_init=biases)

    @property
    def h(self) -> brainstate.HiddenState:
        return self.cell.h

    def get_spike(self):
        return self.cell.h.value

    def update(self, current=0.0):
        return self.cell(jnp.broadcast_to(current, jnp.shape(self.cell.h.value)))


RATE_CELLS = (LeakyTanh, GatedCell)


def make_neuron(pop: Population, rng: np.random.Generator):
    """The brainpy.state population of `pop` (every constant explicit: brainpy's defaults may be float32)."""
    spk = _spk_fun(pop.surrogate)
    lif_like = {
        "tau": _tau(pop, 5.0),
        "V_th": 1.0 * u.mV,
        "V_reset": 0.0 * u.mV,
        "V_rest": 0.0 * u.mV,
        "R": 1.0 * u.ohm,
        "spk_fun": spk,
        "V_initializer": HostInit(rng, 0.5, 0.45, u.mV, uniform=True),
    }
    if pop.kind == "lif" and pop.param == "threshold":
        theta = jnp.asarray(rng.uniform(0.8, 1.2, pop.shape), dtype=brainstate.environ.dftype())
        return ThresholdLIF(pop.shape, theta, **lif_like)
    if pop.kind == "lif":
        return bps.LIF(pop.shape, **lif_like)
    if pop.kind == "lif_ref":
        return bps.LIFRef(pop.shape, tau_ref=2.0 * u.ms, **lif_like)
    if pop.kind == "alif":
        lif_like.pop("R")
        return bps.ALIF(pop.shape, tau_a=20.0 * u.ms, beta=0.3 * u.mV, **lif_like)
    if pop.kind == "adex":
        return bps.AdExIF(
            pop.shape,
            tau=_tau(pop, 10.0),
            tau_w=30.0 * u.ms,
            V_th=-50.0 * u.mV,
            V_reset=-65.0 * u.mV,
            V_rest=-65.0 * u.mV,
            V_T=-46.0 * u.mV,  # the exponential takes off above threshold: dt = 1 ms would let it overflow
            delta_T=1.5 * u.mV,
            a=0.5 * u.siemens,
            b=0.5 * u.mA,
            R=1.0 * u.ohm,
            spk_fun=spk,
            V_initializer=HostInit(rng, -57.5, 7.5, u.mV, uniform=True),
        )
    if pop.kind == "izhikevich":
        return bps.Izhikevich(pop.shape, spk_fun=spk, V_initializer=HostInit(rng, -50.0, 20.0, u.mV, uniform=True))
    if pop.kind in GATED:
        return GatedCell(pop.kind, pop.size, rng)
    return LeakyTanh(pop.size, _tau(pop, 4.0))


def membrane(neuron):
    """A population's membrane potential relative to threshold, `V − V_th` (mV), or a rate cell's `h`."""
    if isinstance(neuron, RATE_CELLS):
        return neuron.h.value
    return neuron.V.value - neuron.V_th


def normalised_v(neuron) -> jax.Array:
    """A population's membrane potential in threshold units, `(V − V_th) / (V_th − V_reset)`."""
    if isinstance(neuron, RATE_CELLS):
        return neuron.h.value
    reset = getattr(neuron, "V_reset", getattr(neuron, "c", 0.0 * u.mV))
    return u.get_mantissa((neuron.V.value - neuron.V_th) / (neuron.V_th - reset))


# --------------------------------------------------------------------------- comms


def _kaiming(rng, n_pre: int, scale: float, unit=None, positive: bool = True) -> HostInit:
    """Weights `N(2 scale / n_pre, (scale / √n_pre)²)` (mostly positive: half the inputs active give a
    drive of about `scale`), or `N(0, (scale / √n_pre)²)` when not `positive`."""
    mean = 2.0 * scale / n_pre if positive else 0.0
    return HostInit(rng, mean, scale / np.sqrt(n_pre), unit)


class TransformedLinear(brainstate.nn.Module):
    """A dense comm whose weight is transformed before the op, as users write sign constraints and
    normalisation: `abs(W)`, `W * mask` (a fixed 0/1 mask), or `W / ‖W row‖`."""

    def __init__(self, n_pre: int, n_post: int, transform: str, init: HostInit, rng, unit):
        super().__init__()
        self.in_size, self.out_size = (n_pre,), (n_post,)
        self.transform, self.unit = transform, unit
        self.weight = brainstate.ParamState(init((n_pre, n_post)))
        self.mask = jnp.asarray(rng.random((n_pre, n_post)) < 0.7, dtype=brainstate.environ.dftype())

    def effective(self) -> jax.Array:
        w = self.weight.value
        if self.transform == "abs":
            return jnp.abs(w)
        if self.transform == "mask":
            return w * self.mask
        return w / jnp.sqrt(jnp.sum(w**2, axis=-1, keepdims=True) + 1.0)

    def update(self, x):
        y = u.get_mantissa(x) @ self.effective()
        return y if self.unit is None else y * self.unit


class EventCSR(brainstate.nn.Module):
    """A brainevent CSR matrix applied to spikes as events (`BinaryArray`): the stored values are the
    trainable weight (`binary_csrmv` / `binary_csrmm`)."""

    def __init__(self, n_pre: int, n_post: int, rng, scale: float, unit):
        super().__init__()
        self.in_size, self.out_size, self.unit = (n_pre,), (n_post,), unit
        mask = rng.random((n_pre, n_post)) < 0.6
        mask[np.arange(n_pre), rng.integers(0, n_post, n_pre)] = True  # every input reaches someone
        values = np.abs(rng.normal(1.0, 0.5, (n_pre, n_post))) * 2.0 * scale / (0.6 * n_pre) + 0.05
        self.csr = brainevent.CSR.fromdense(jnp.asarray(mask * values, dtype=brainstate.environ.dftype()))
        self.weight = brainstate.ParamState(self.csr.data)

    def update(self, spikes):
        y = brainevent.BinaryArray(u.get_mantissa(spikes)) @ self.csr.with_data(self.weight.value)
        return y if self.unit is None else y * self.unit


class ConvComm(brainstate.nn.Module):
    """A small convolution over the input laid out as positions x 1 channel: `Conv1d(kernel 2, VALID)`
    onto `channels` output channels, as users write `conv(x[..., None])`."""

    def __init__(self, n_pre: int, channels: int, rng, scale: float, unit):
        super().__init__()
        self.unit = unit
        init = _kaiming(rng, 2, scale)
        self.conv = brainstate.nn.Conv1d((n_pre, 1), channels, 2, padding="VALID", w_init=init, b_init=None)
        self.weight = self.conv.weight

    def update(self, x):
        y = self.conv(u.get_mantissa(x)[..., None])
        return y if self.unit is None else y * self.unit


def make_comm(kind: str, transform: str, n_pre: int, n_post: int, rng, scale: float, unit, seed: int):
    """The comm module of a projection; weights scaled by `scale` (in `unit`, None for unit-free). A "conv"
    comm's `n_post` is its number of output channels."""
    if kind == "conv":
        return ConvComm(n_pre, n_post, rng, scale, unit)
    init = _kaiming(rng, n_pre, scale, unit)
    if kind in ("linear", "linear_bias"):
        bias = HostInit(rng, 0.1 * scale, 0.05 * scale, unit) if kind == "linear_bias" else None
        return brainstate.nn.Linear(n_pre, n_post, w_init=init, b_init=bias)
    if kind == "event_linear":
        return brainstate.nn.EventLinear(n_pre, n_post, weight=init)
    if kind in ("fixed_prob", "fixed_prob_scalar"):
        conn_num = max(1, round(0.6 * n_post))
        mean = 2.0 * scale / (0.6 * n_pre)  # each post neuron reads about 0.6 n_pre inputs
        if kind == "fixed_prob_scalar":
            weight = mean if unit is None else mean * unit
        else:
            weight = HostInit(rng, mean, 0.3 * mean, unit)
        return brainstate.nn.EventFixedProb(n_pre, n_post, conn_num=conn_num, conn_weight=weight, seed=seed)
    if kind == "csr":
        return EventCSR(n_pre, n_post, rng, scale, unit)
    return TransformedLinear(n_pre, n_post, transform, _kaiming(rng, n_pre, scale), rng, unit)


# --------------------------------------------------------------------------- readouts


class TauReadout(brainstate.nn.Module):
    """A user readout `r ← exp(−dt/τ) r + x W` with τ a trained ParamState (ms, one per output)."""

    def __init__(self, n_in: int, n_out: int, init: HostInit):
        super().__init__()
        self.n_out = n_out
        self.weight = brainstate.ParamState(init((n_in, n_out)))
        self.tau = brainstate.ParamState(jnp.linspace(2.0, 6.0, n_out))

    def init_state(self, batch_size=None, **kwargs):
        self.r = brainstate.HiddenState(braintools.init.param(braintools.init.Constant(0.0), (self.n_out,), batch_size))

    def update(self, x):
        decay = jnp.exp(-u.get_mantissa(brainstate.environ.get_dt() / u.ms) / self.tau.value)
        self.r.value = decay * self.r.value + u.get_mantissa(x) @ self.weight.value
        return self.r.value


def make_readout(readout: Readout, width: int, rng):
    """The readout module (None for kind "none")."""
    init = _kaiming(rng, width, 1.0, positive=False)
    if readout.kind in ("linear", "linear_bias"):
        bias = HostInit(rng, 0.1, 0.05) if readout.kind == "linear_bias" else None
        return brainstate.nn.Linear(width, readout.size, w_init=init, b_init=bias)
    if readout.kind == "leaky":
        return bps.LeakyRateReadout(width, readout.size, tau=4.0 * u.ms, w_init=init)
    if readout.kind == "leaky_per_unit":
        return bps.LeakyRateReadout(width, readout.size, tau=jnp.linspace(2.0, 8.0, readout.size) * u.ms, w_init=init)
    if readout.kind == "trained_tau":
        return TauReadout(width, readout.size, init)
    return None


def readout_width(spec: Spec, readout: Readout) -> int:
    return sum(source_size(spec, s) for s in readout.sources)


def output_size(spec: Spec, index: int) -> int:
    """Elements per example of readout `index`'s output."""
    readout = spec.readouts[index]
    return readout_width(spec, readout) if readout.kind == "none" else readout.size


def is_early(readout: Readout) -> bool:
    """Read at the start of the step, before any population advances (the previous step's spikes)."""
    return readout.read == "prev_spikes"


# --------------------------------------------------------------------------- the network


class FuzzNet(brainstate.nn.Module):
    """The network of a `Spec`: `update(*inputs)` with inputs `(x0[, x1][, noise][, t])`.

    Step order: read every population's previous spikes; advance the readouts of previous spikes; advance
    the populations in order (each after the projections into it); advance the other readouts in order;
    return the outputs. For the references of tests/references.py, a single-population model also splits
    its step (`update_hidden`, `update_lti`, `output`) and names its groups and relations.
    """

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.stop_recurrent_grad = False  # tests/references.py: detach recurrent presynaptic spikes
        # one random stream per part, so that simplifying one part (while shrinking) leaves the others as drawn
        rngs = [np.random.default_rng([spec.seed, 0, k]) for k in range(len(spec.populations))]
        self.pops = [make_neuron(p, rng) for p, rng in zip(spec.populations, rngs, strict=True)]
        for k, (pop, rng) in enumerate(zip(spec.populations, rngs, strict=True)):
            setattr(self, f"p{k}", self.pops[k])
            if pop.param == "bias":
                bias = rng.normal(0.2, 0.3, pop.shape) * SCALES[pop.kind].drive
                setattr(self, f"bias{k}", brainstate.ParamState(jnp.asarray(bias, dtype=brainstate.environ.dftype())))
        self.projs = []
        for i, proj in enumerate(spec.projections):
            self.projs.append(self._make_projection(i, proj, np.random.default_rng([spec.seed, 1, i])))
        if spec.dropout:  # its mask is drawn from brainstate's global key, which `build` seeds
            self.dropout = brainstate.nn.Dropout(DROPOUT_KEEP)
        self.readouts = []
        for i, readout in enumerate(spec.readouts):
            rng = np.random.default_rng([spec.seed, 2, i])
            module = make_readout(readout, readout_width(spec, readout), rng)
            self.readouts.append(module)
            if module is not None:
                setattr(self, f"out{i}", module)

    # ----------------------------------------------------------------------- building projections

    def _make_projection(self, index: int, proj: Projection, rng):
        spec = self.spec
        post_pop, post = spec.populations[proj.target], self.pops[proj.target]
        n_pre, n_post = source_size(spec, proj.source), post_pop.channels or post_pop.size
        scale = SCALES[post_pop.kind]
        if proj.stp:
            setattr(self, f"stp{index}", bps.STP(n_pre, U=0.3, tau_f=5.0 * u.ms, tau_d=3.0 * u.ms))
        if proj.synapse.startswith("pre_"):
            tau = 3.0 * u.ms
            pre = bps.Expon(n_pre, tau=tau, g_initializer=braintools.init.Constant(0.0))
            if proj.synapse == "pre_alpha":
                pre = bps.Alpha(n_pre, tau=tau, g_initializer=braintools.init.Constant(0.0))
            setattr(self, f"pre{index}", pre)
        unit = None if post_pop.kind in RATE else (u.siemens if proj.coba else scale.current)
        size = proj.sign * proj.scale * (scale.delta_mv if proj.synapse == "delta" else scale.drive)
        size *= SYNAPSE_GAIN[proj.synapse]
        if proj.source.startswith("p") and spec.populations[int(proj.source[1:])].spiking:
            size *= 2.0  # spiking populations fire at 0.1-0.4 where the inputs fire at 0.3-0.7
        if proj.coba:
            size = proj.scale * COBA_SIEMENS
        unit = u.mV if proj.synapse == "delta" else unit
        if proj.tie is not None:
            comm = self.projs[proj.tie].comm
        else:
            comm = make_comm(proj.comm, proj.transform, n_pre, n_post, rng, size, unit, spec.seed + index)
        return self._wrap(index, proj, comm, post, unit, post_pop.shape)

    def _wrap(self, index, proj, comm, post, unit, post_shape):
        """The projection module delivering `comm`'s output to `post` (None: the step adds it itself)."""
        zero = braintools.init.Constant(0.0 if unit is None else 0.0 * unit)
        tau = (6.0 if proj.delay else 3.0) * u.ms
        if isinstance(post, RATE_CELLS):
            module = _UserSynapse(comm, None)
        elif proj.synapse in ("post_expon", "post_dual_expon"):
            if proj.synapse == "post_expon":
                syn = bps.Expon.desc(post_shape, tau=tau, g_initializer=zero)
            else:
                syn = bps.DualExpon.desc(post_shape, tau_decay=4.0 * u.ms, tau_rise=1.0 * u.ms, g_initializer=zero)
            out = bps.COBA.desc(E=(5.0 if proj.sign > 0 else -1.0) * u.mV) if proj.coba else bps.CUBA.desc(scale=1.0)
            delay = proj.delay * DT if proj.delay else None
            module = bps.AlignPostProj(comm=comm, syn=syn, out=out, post=post, delay=delay)
        elif proj.synapse in ("pre_expon", "pre_alpha", "current"):
            module = bps.CurrentProj(comm=comm, out=bps.CUBA(scale=1.0), post=post)
        elif proj.synapse == "delta":
            module = bps.DeltaProj(comm=comm, post=post)
        elif proj.synapse == "user_alpha":
            module = _UserSynapse(comm, bps.Alpha(post_shape, tau=tau, g_initializer=zero))
        elif proj.synapse == "user_expon":
            module = _UserSynapse(comm, bps.Expon(post_shape, tau=tau, g_initializer=zero))
        else:
            raise ValueError(proj.synapse)
        setattr(self, f"proj{index}", module)
        return _Delivery(module, comm, unit, f"y_shift_proj{index}")

    # ----------------------------------------------------------------------- one step

    def update(self, *inputs):
        if self.spec.control == "jit":
            return brainstate.transform.jit(self._step)(*inputs)
        return self._step(*inputs)

    def _step(self, *inputs):
        spikes, noise, t = self._split(inputs)
        with brainstate.environ.context(t=t) if t is not None else _nothing():
            values = self._advance(spikes, noise)
            self._late_readouts(values)
        return self._outputs(values)

    def _split(self, inputs):
        spec = self.spec
        n = len(spec.n_inputs)
        spikes = tuple(inputs[:n])
        noise = inputs[n] if spec.noise is not None else None
        t = inputs[-1] if spec.clock else None
        return spikes, noise, t

    def _advance(self, spikes, noise, y_shift=None) -> dict:
        """Previous values, early readouts and every population; returns `{source name: value}`."""
        values = {f"x{i}": x for i, x in enumerate(spikes)}
        previous = {f"p{k}": self._flat(k, pop.get_spike()) for k, pop in enumerate(self.pops)}
        for i, readout in enumerate(self.spec.readouts):
            if is_early(readout):
                values[f"r{i}"] = self._readout(i, [previous[s] for s in readout.sources])
        for k, pop in enumerate(self.pops):
            currents = [
                self._project(i, self._presynaptic(i, values, previous), y_shift)
                for i, proj in enumerate(self.spec.projections)
                if proj.target == k
            ]
            values[f"p{k}"] = self._flat(k, pop(self._current(k, [c for c in currents if c is not None], noise)))
            values[f"V{k}"], values[f"U{k}"] = self._flat(k, normalised_v(pop)), self._flat(k, membrane(pop))
            if k == 0:
                self._control(pop)
        return values

    def _flat(self, k: int, value):
        """Population `k`'s values with one neuron axis (a positions x channels layout flattened)."""
        if not self.spec.populations[k].channels:
            return value
        return u.math.reshape(value, (*value.shape[:-2], self.spec.populations[k].size))

    def _presynaptic(self, index: int, values: dict, previous: dict):
        """The values projection `index` reads (before STP and presynaptic filtering)."""
        proj = self.spec.projections[index]
        if proj.timing == "prev" and proj.source.startswith("p"):
            value = previous[proj.source]
            return jax.lax.stop_gradient(value) if self.stop_recurrent_grad else value
        return values[proj.source]

    def _project(self, index: int, value, y_shift):
        proj = self.spec.projections[index]
        if proj.stp:
            value = getattr(self, f"stp{index}")(value)
        if proj.synapse.startswith("pre_"):
            value = getattr(self, f"pre{index}")(value)
        delivery = self.projs[index]
        if y_shift is not None and f"proj{index}" in y_shift:
            return delivery(value, y_shift[f"proj{index}"])
        return delivery(value)

    def _current(self, k: int, currents: list, noise):
        """The input current of population `k`: user synapses' and rate comms' outputs, bias, noise."""
        pop, unit = self.spec.populations[k], SCALES[self.spec.populations[k].kind].current
        total = 0.0 if pop.kind in RATE else 0.0 * unit
        for current in currents:
            total = total + current
        if pop.param == "bias":
            bias = getattr(self, f"bias{k}").value
            total = total + (bias if pop.kind in RATE else bias * unit)
        if noise is not None and self.spec.noise == k:
            total = total + (noise if pop.kind in RATE else noise * unit)
        return total

    def _control(self, pop):
        """Control flow inside the step, on population 0's state: a weight-free `cond` that adds a leak when
        the population is active, or a short `for_loop` that relaxes it."""
        control = self.spec.control
        if control not in ("cond", "scan"):
            return
        state = pop.h if isinstance(pop, RATE_CELLS) else pop.V
        scale = 1.0 if isinstance(pop, RATE_CELLS) else u.mV
        active = jnp.mean(u.get_mantissa(pop.get_spike())) > 0.3
        if control == "cond":
            state.value = brainstate.transform.cond(active, lambda v: 0.9 * v, lambda v: v, state.value)
            return

        rest = getattr(pop, "V_rest", getattr(pop, "c", 0.0 * scale))

        def relax(i):
            state.value = state.value - 0.02 * (state.value - rest)

        brainstate.transform.for_loop(relax, jnp.arange(2))

    def _readout(self, index: int, parts: Sequence):
        module = self.readouts[index]
        if module is None and len(parts) == 1:
            return parts[0]  # an output with units when it is a membrane potential
        parts = [u.get_mantissa(p) for p in parts]
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
        if module is None:
            return x
        if self.spec.dropout:
            with brainstate.environ.context(fit=True):  # Dropout acts only while fitting
                x = self.dropout(x)
        return module(x)

    def _late_readouts(self, values: dict):
        for i, readout in enumerate(self.spec.readouts):
            if not is_early(readout):
                values[f"r{i}"] = self._readout(i, self._parts(i, values))

    def _outputs(self, values: dict):
        outs = [values[f"r{i}"] for i in range(len(self.spec.readouts))]
        if self.spec.outputs == "tuple":
            return tuple(outs)
        if self.spec.outputs == "dict":
            return {f"out{i}": o for i, o in enumerate(outs)}
        return outs[-1]

    # ----------------------------------------------------------------------- the references' protocol

    @property
    def n_rec(self) -> int:
        return self.spec.populations[0].size

    @property
    def readout(self) -> str:
        """The readouts' kind for tests/references.py: "linear" when none carries a state, else "leaky"."""
        stateless = all(r.kind in ("none", "linear", "linear_bias") for r in self.spec.readouts)
        return "linear" if stateless else "leaky"

    def update_hidden(self, x, y_shift=None):
        """The step up to the readouts (single input, no clock), for `rtrl_reference`/`es_d_rtrl_naive`."""
        self._advance((x,), None, y_shift)

    def update_lti(self):
        """Advance the stateful readouts from the populations' new values (single-population models)."""
        values = self._current_values()
        for i in range(len(self.spec.readouts)):
            values[f"r{i}"] = self._readout(i, self._parts(i, values))

    def output(self):
        """The outputs from the current states, writing nothing (single-population models)."""
        values = self._current_values()
        for i in range(len(self.spec.readouts)):
            module = self.readouts[i]
            stateful = module is not None and hasattr(module, "r")
            values[f"r{i}"] = module.r.value if stateful else self._readout(i, self._parts(i, values))
        return self._outputs(values)

    def _current_values(self) -> dict:
        values = {}
        for k, pop in enumerate(self.pops):
            values[f"p{k}"] = self._flat(k, pop.get_spike())
            values[f"V{k}"], values[f"U{k}"] = self._flat(k, normalised_v(pop)), self._flat(k, membrane(pop))
        return values

    def _parts(self, i: int, values: dict) -> list:
        """The values readout `i` reads: spikes or readout outputs; membrane potentials in threshold units,
        or in mV (V − V_th, a Quantity) when the readout passes one population's potential through."""
        readout = self.spec.readouts[i]
        if readout.read != "V":
            return [values[s] for s in readout.sources]
        key = "U" if readout.kind == "none" and len(readout.sources) == 1 else "V"
        return [values[key + s[1:]] for s in readout.sources]

    def groups(self):
        """`(groups, lti_groups)` of hidden paths for `rtrl_reference` (single-population models): the
        population with its post-sized synapses; each presynaptic module (STP, AlignPre trace) alone; each
        stateful readout alone."""
        paths = {id(state): ".".join(map(str, key)) for key, state in self.states(brainstate.HiddenState).items()}
        lti = [[paths[id(r.r)]] for r in self.readouts if r is not None and hasattr(r, "r")]
        pre_groups = []
        for name, module in vars(self).items():
            if name.startswith(("stp", "pre")) and isinstance(module, brainstate.nn.Module):
                states = module.states(brainstate.HiddenState).values()
                pre_groups.append(list(dict.fromkeys(paths[id(s)] for s in states)))
        taken = {p for group in [*lti, *pre_groups] for p in group}
        main = [p for p in paths.values() if p not in taken]
        return [main, *pre_groups], lti

    def relations(self) -> dict:
        """`{projection name: weight path}` of the projections into the population."""
        paths = {id(state): ".".join(map(str, key)) for key, state in self.states(brainstate.ParamState).items()}
        return {f"proj{i}": paths[id(self.projs[i].comm.weight)] for i in range(len(self.projs))}

    def presynaptic(self, x) -> dict:
        """`{projection name: u_t}` read before the step (single-population, plain AlignPost models)."""
        values, previous = {"x0": x}, {"p0": self.pops[0].get_spike()}
        return {f"proj{i}": self._presynaptic(i, values, previous) for i in range(len(self.projs))}


class _Delivery:
    """Calls a projection module; `shift` (a mantissa) is added to its comm's output (tests/references.py
    takes F = ∂h/∂y by differentiating through it)."""

    def __init__(self, module, comm, unit, key):
        self.module, self.comm, self.unit, self.key = module, comm, unit, key

    def __call__(self, value, shift=None):
        if shift is None:
            return self.module(value)
        if isinstance(self.module, bps.AlignPostProj):
            self.module.syn.add_delta_input(self.key, shift if self.unit is None else shift * self.unit)
            return self.module(value)
        raise NotImplementedError("a comm-output shift is written for AlignPost projections only")


class _UserSynapse(brainstate.nn.Module):
    """A post-sized synapse the user calls, `current = syn(comm(u))` (or `comm(u)` with no synapse: a rate
    cell's input), summed into the neuron's input current."""

    def __init__(self, comm, syn):
        super().__init__()
        self.comm, self.syn = comm, syn

    def update(self, value):
        y = self.comm(value)
        return y if self.syn is None else self.syn(y)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *args):
        return False


def build(spec: Spec, batch: int | str | None = "spec") -> FuzzNet:
    """The initialised network of `spec` (batch size `spec.batch` unless `batch` is given)."""
    brainstate.environ.set(dt=DT)
    brainstate.random.seed(spec.seed)
    model = FuzzNet(spec)
    brainstate.nn.init_all_states(model, batch_size=spec.batch if batch == "spec" else batch)
    return model
