"""The LIF network of Shiu et al.'s whole-brain model on a `Connectome` (generated or loaded: see
`fusetrace.tasks.connectome`), and an online fit of its neuropil rates with a known optimum.
Docs: docs/connectome.md.

Network (`ConnectomeNetwork`): `LIFRef` neurons with Shiu et al.'s constants (τ_m 20 ms, refractory
2.2 ms, V_rest = V_reset = −52 mV, V_th = −45 mV), exponential current synapses (τ_syn 5 ms) whose
conductance jumps by `weight × 0.275` mV per presynaptic spike, the connectome held as a brainevent CSR
matrix inside an unmodified `brainstate.nn.SparseLinear` (its data are the trainable weights), Poisson
drive to a set of "sensory" neurons (each drive spike counts 250 synapses), and per-neuron leaky spike
rates averaged per neuropil as the output. `LIFRef` reads the clock `t` from brainstate's environment, so
`update(x, t)` takes the time as its second input (docs/limitations.md). No synaptic delay (Shiu et al.
use 1.8 ms): brainpy.state's batched delays are broken upstream.

Fit (`rate_fit`): the targets are the neuropil rates of the same network with perturbed weights under the
same drive, read every 10 ms, so the perturbed weights are a known optimum.
"""

import dataclasses
import math

import brainevent
import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .base import Task, as_task, begin_network, check_count, ms, mv, spikes
from .connectome import Connectome
from .registry import TrainingBatch

# Shiu et al.'s whole-brain LIF model
DT_MS = 0.2
TAU_M_MS, TAU_SYN_MS, TAU_REF_MS = 20.0, 5.0, 2.2
V_REST_MV, V_RESET_MV, V_TH_MV = -52.0, -52.0, -45.0
SYNAPSE_MV = 0.275  # conductance jump per synapse of a presynaptic spike
DRIVE_SYNAPSES = 250.0  # a Poisson drive spike counts this many synapses
READ_EVERY_MS = 10.0  # the fitting task reads neuropil rates this often
DRIVE_FRACTION = 0.05  # of neurons Poisson-driven: keeps a generated graph active without running away

Rates = Float[Array, "batch n_neuropils"]


def perturbed_weights(connectome: Connectome, *, seed: int = 1, sigma: float = 0.3) -> np.ndarray:
    """The connectome's weights scaled by a lognormal gain per postsynaptic neuropil (σ = `sigma`): the
    teacher of the fitting task, whose neuropil rates differ from the unperturbed network's in a way the
    weights can undo (the optimum is known: these weights)."""
    gains = np.random.default_rng(seed).lognormal(0.0, sigma, connectome.n_neuropils).astype(np.float32)
    return connectome.weights * gains[connectome.neuropil[connectome.indices]]


class PoissonDrive(brainstate.nn.Module):
    """Drive spikes `(batch, n_drive)` placed on their target neurons `(batch, n_neurons)`, each spike
    counting `strength` synapses (a fixed input map: no trainable weight)."""

    def __init__(self, targets: np.ndarray, n_neurons: int, strength: float):
        super().__init__()
        self.targets = np.asarray(targets, np.int32)
        self.n_neurons, self.strength = n_neurons, strength

    def update(self, x):
        drive = jnp.zeros((*x.shape[:-1], self.n_neurons), x.dtype)
        return drive.at[..., self.targets].set(x * self.strength)


class NeuropilRates(brainstate.nn.Module):
    """Per-neuron spike rates (Hz; leaky average with time constant `tau`) and their mean per neuropil.

    `rate` is a hidden state per neuron, updated element-wise from the neuron's spike (so it joins the
    neuron's hidden group); the neuropil average is a fixed pooling of it (no trainable readout)."""

    def __init__(self, labels: np.ndarray, n_neuropils: int, tau: u.Quantity):
        super().__init__()
        self.labels = np.asarray(labels, np.int32)
        self.n_neuropils = n_neuropils
        self.counts = np.maximum(np.bincount(self.labels, minlength=n_neuropils), 1).astype(np.float32)
        self.tau = tau

    def init_state(self, batch_size: int | None = None, **kwargs):
        shape = (self.labels.shape[0],) if batch_size is None else (batch_size, self.labels.shape[0])
        self.rate = brainstate.HiddenState(jnp.zeros(shape, brainstate.environ.dftype()))

    def update(self, spikes) -> Rates:
        dt_s = float(u.Quantity(brainstate.environ.get_dt()).to_decimal(u.second))
        decay = math.exp(-dt_s / float(self.tau.to_decimal(u.second)))
        rate = decay * self.rate.value + (1.0 - decay) / dt_s * spikes
        self.rate.value = rate
        pooled = jnp.zeros((*rate.shape[:-1], self.n_neuropils), rate.dtype).at[..., self.labels].add(rate)
        return pooled / self.counts


class ConnectomeNetwork(brainstate.nn.Module):
    """LIF neurons wired by a connectome, driven by Poisson spikes on `drive` neurons; returns the
    neuropil rates (Hz). `update(x, t)`: `x` the drive spikes `(batch, n_drive)`, `t` the time (ms).

    Trainable: `rec.comm.weight` (a `SparseLinear`'s `{'weight': data}`), one value per connection."""

    def __init__(self, connectome: Connectome, drive: np.ndarray, *, weights=None, rate_tau_ms: float = READ_EVERY_MS):
        super().__init__()
        n = connectome.n_neurons
        self.neurons = bps.LIFRef(
            n,
            tau=ms(TAU_M_MS),
            tau_ref=ms(TAU_REF_MS),
            V_th=mv(V_TH_MV),
            V_reset=mv(V_RESET_MV),
            V_rest=mv(V_REST_MV),
            V_initializer=braintools.init.Constant(mv(V_REST_MV)),
            spk_reset="hard",
        )
        synapse = bps.Expon.desc(n, tau=ms(TAU_SYN_MS), g_initializer=braintools.init.Constant(0.0))
        current = bps.CUBA.desc(scale=u.Quantity(SYNAPSE_MV, unit=u.mA))  # R = 1 ohm: mA -> mV
        comm = brainstate.nn.SparseLinear(connectome.csr(weights), in_size=(n,))
        self.rec = bps.AlignPostProj(comm=comm, syn=synapse, out=current, post=self.neurons)
        self.drive = bps.AlignPostProj(
            comm=PoissonDrive(drive, n, DRIVE_SYNAPSES), syn=synapse, out=current, post=self.neurons
        )
        self.rates = NeuropilRates(connectome.neuropil, connectome.n_neuropils, ms(rate_tau_ms))

    def update(self, x, t):
        with brainstate.environ.context(t=t):
            self.rec(brainevent.BinaryArray(self.neurons.get_spike()))  # event-driven: only spikes cost
            self.drive(x)
            return self.rates(self.neurons())


def drive_neurons(connectome: Connectome, n_drive: int, seed: int = 0) -> np.ndarray:
    """`n_drive` distinct neurons (sorted) chosen by `seed`: the Poisson-driven "sensory" neurons."""
    n_drive = check_count(n_drive, "n_drive", "fusetrace.tasks.drive_neurons")
    return np.sort(np.random.default_rng(seed).choice(connectome.n_neurons, n_drive, replace=False)).astype(np.int32)


def connectome_network(
    connectome: Connectome,
    *,
    drive: np.ndarray | None = None,
    weights=None,
    batch_size: int | None = None,
    dt_ms: float = DT_MS,
) -> ConnectomeNetwork:
    """A `ConnectomeNetwork` with its states initialised (sets brainstate's dt; all neurons start at rest).

    Arguments:
        connectome: the graph (`generate_connectome` or `load_connectome`).
        drive: the driven neurons (default: 5% of them, `drive_neurons(connectome, ...)`).
        weights: one weight per connection (default: the connectome's).
        batch_size: batch of the states, or None.
        dt_ms: the step (Shiu et al.: 0.2 ms).
    """
    begin_network(dt_ms, None)
    if drive is None:
        drive = drive_neurons(connectome, max(1, round(DRIVE_FRACTION * connectome.n_neurons)))
    network = ConnectomeNetwork(connectome, drive, weights=weights)
    brainstate.nn.init_all_states(network, batch_size=batch_size)
    return network


# --------------------------------------------------------------------------- fitting task


def clock(n_steps: int, dt_ms: float = DT_MS) -> u.Quantity:
    """The time of every step, `k · dt` (ms): the second input of `ConnectomeNetwork.update`."""
    return u.Quantity(jnp.arange(n_steps, dtype=brainstate.environ.dftype()) * dt_ms, unit=u.ms)


def neuropil_rate_task(
    connectome: Connectome,
    teacher_weights,
    drive: np.ndarray,
    *,
    batch: int,
    seed: int,
    duration_ms: float = 100.0,
    rate_hz: tuple[float, float] = (50.0, 150.0),
    dt_ms: float = DT_MS,
    read_every_ms: float = READ_EVERY_MS,
) -> Task:
    """Fit neuropil rates: the targets are the rates of the network with `teacher_weights`, read every
    `read_every_ms`, under the same Poisson drive (so those weights reach zero loss).

    Each trial drives every drive neuron at its own rate, uniform in `rate_hz`, throughout.

    Returns:
        A `Task` "connectome_rates": inputs (time, batch, n_drive) drive spikes, targets (time, batch,
        n_neuropils) rates in Hz, mask 1 every `read_every_ms` (from the first full window on); feed the
        network `(task.inputs[t], clock(task.n_steps)[t])`.
    """
    where = "fusetrace.tasks.neuropil_rate_task"
    batch = check_count(batch, "batch", where)
    n_steps = check_count(round(duration_ms / dt_ms), "duration_ms / dt_ms", where)
    every = check_count(round(read_every_ms / dt_ms), "read_every_ms / dt_ms", where)
    rng = np.random.default_rng(seed)
    rates = rng.uniform(*rate_hz, size=(1, batch, drive.shape[0]))
    inputs = spikes(rng, np.broadcast_to(rates, (n_steps, batch, drive.shape[0])), dt_ms)
    teacher = connectome_network(connectome, drive=drive, weights=teacher_weights, batch_size=batch, dt_ms=dt_ms)
    targets = _simulate(teacher, jnp.asarray(inputs, brainstate.environ.dftype()), clock(n_steps, dt_ms))
    mask = np.zeros((n_steps, batch), np.float32)
    mask[every - 1 :: every] = 1.0
    info = {"drive_rates_hz": rates[0], "read_every_steps": every}
    return as_task("connectome_rates", inputs, np.asarray(targets), mask, None, dt_ms, info)


def _simulate(network: ConnectomeNetwork, inputs, times) -> jax.Array:
    return brainstate.transform.for_loop(network.update, inputs, times)


@dataclasses.dataclass(frozen=True, eq=False)
class RateFit:
    """Everything an online fit of neuropil rates needs: the graph, the driven neurons, the teacher's
    weights (the known optimum), the student network (initialised with the connectome's own weights) and
    a sampler of training batches for `fusetrace.trainer.Trainer`.

    Attributes:
        connectome: the graph.
        drive: the Poisson-driven neurons.
        teacher_weights: the weights whose rates are the targets (`perturbed_weights`).
        network: the student, states initialised for `batch`.
        batch: trials per batch.
        duration_ms: trial length.
        dt_ms: the step.
    """

    connectome: Connectome
    drive: np.ndarray
    teacher_weights: np.ndarray
    network: ConnectomeNetwork
    batch: int
    duration_ms: float
    dt_ms: float

    @property
    def n_steps(self) -> int:
        return round(self.duration_ms / self.dt_ms)

    def sample(self, seed: int) -> TrainingBatch:
        """A batch of trials: `inputs` is `(drive spikes, clock)`, time first; `targets` the teacher's
        rates with the read-out mask, as `mse_loss` takes them."""
        task = neuropil_rate_task(
            self.connectome,
            self.teacher_weights,
            self.drive,
            batch=self.batch,
            seed=seed,
            duration_ms=self.duration_ms,
            dt_ms=self.dt_ms,
        )
        return TrainingBatch(
            inputs=(task.inputs, clock(task.n_steps, self.dt_ms)), targets=task.step_targets(), task=task
        )

    def distance(self, weights) -> float:
        """‖weights − teacher‖ / ‖connectome − teacher‖: 1 at the start, 0 at the optimum."""
        weights = np.asarray(u.get_mantissa(weights), np.float64)
        start = np.linalg.norm(self.connectome.weights - self.teacher_weights)
        return float(np.linalg.norm(weights - self.teacher_weights) / start)


def rate_fit(
    connectome: Connectome,
    *,
    batch: int,
    duration_ms: float = 100.0,
    drive_fraction: float = DRIVE_FRACTION,
    perturbation: float = 0.3,
    seed: int = 0,
    dt_ms: float = DT_MS,
) -> RateFit:
    """Set up the neuropil-rate fit on `connectome` (see `RateFit`).

    Arguments:
        connectome: the graph (generated or loaded).
        batch: trials per batch.
        duration_ms: trial length (rates are read every 10 ms).
        drive_fraction: fraction of neurons that receive Poisson drive (5% keeps a generated graph active
            without running away).
        perturbation: σ of the teacher's lognormal gain per postsynaptic neuropil.
        seed: seeds the choice of driven neurons and the teacher's gains.
        dt_ms: the step.

    Example:
        ```python
        fit = rate_fit(generate_connectome(5_000), batch=2)
        learner = fusetrace.compile(fit.network, *first_inputs, loss=mse_loss, batch_size=2)
        trainer = fusetrace.trainer.Trainer(learner, fit.sample, optax.adam(0.05), update_every=50)
        ```
    """
    drive = drive_neurons(connectome, max(1, round(drive_fraction * connectome.n_neurons)), seed=seed)
    teacher = perturbed_weights(connectome, seed=seed + 1, sigma=perturbation)
    network = connectome_network(connectome, drive=drive, batch_size=batch, dt_ms=dt_ms)
    return RateFit(connectome, drive, teacher, network, batch, duration_ms, dt_ms)
