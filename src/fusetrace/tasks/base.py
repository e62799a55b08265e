"""What every generated task shares: the `Task` record, the per-step losses that `fusetrace.compile`
takes, the accuracy metrics, and the helpers the generators and reference networks are built from.

Layout: time first. `inputs` is (time, batch, n_in) of 0/1 spikes, `targets` (time, batch, n_out),
`mask` (time, batch) is 1 where the loss counts. `task.step_targets()` is the pytree a `lax.scan`
over time hands to the loss one step at a time: `(target_t, mask_t)`.

Randomness: every generator draws from `numpy.random.default_rng(seed)` (PCG64), so the same seed gives
bit-identical arrays on every platform and backend. Spikes are Bernoulli per step with probability
`rate · dt` (a Poisson process discretised at dt; rate · dt > 1 is an error).

Sharp edge: the reference-network factories set brainstate's global `dt` (the models read it at every
step, and `LeakyRateReadout` computes its decay when it is built) and, when given a seed, reseed
`brainstate.random`.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ..errors import FusetraceError, four_part

# Array types, time first (module-level aliases keep the dimension strings out of annotations, which
# pyflakes would parse as forward references).
TimeInputs = Float[Array, "time batch n_in"]
TimeOutputs = Float[Array, "time batch n_out"]
TimeMask = Float[Array, "time batch"]
Labels = Int[Array, " batch"]
StepOutput = Float[Array, "batch n_out"]
StepMask = Float[Array, " batch"]
StepTarget = tuple[StepOutput, StepMask]
Scalar = Float[Array, ""]


class TaskError(FusetraceError, ValueError):
    """A task generator or metric was given arguments it cannot honour."""


def bad_argument(what: str, where: str, why: str, fix: str) -> TaskError:
    return TaskError(four_part(what=what, where=where, why=why, fix=fix))


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One generated batch of trials, time first.

    Attributes:
        name: the task's name ("evidence_accumulation", ...).
        inputs: (time, batch, n_in) float32 0/1 spikes.
        targets: (time, batch, n_out) float32: one-hot classes or regression values (defined at every
            step; `mask` says where they count).
        mask: (time, batch) float32, 1 where the loss counts.
        labels: (batch,) int32 trial classes, or None where a trial has no single class.
        dt_ms: the step in milliseconds.
        info: what the generator drew, per trial (cue sides, directions, fixation lengths, tokens, ...).

    Raises:
        TaskError: the arrays' shapes disagree.
    """

    name: str
    inputs: TimeInputs
    targets: TimeOutputs
    mask: TimeMask
    labels: Labels | None
    dt_ms: float
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        problems = []
        if self.inputs.ndim != 3 or self.targets.ndim != 3:
            problems.append(f"inputs {self.inputs.shape} and targets {self.targets.shape} must be 3-d")
        else:
            n_steps, batch = self.inputs.shape[:2]
            if self.targets.shape[:2] != (n_steps, batch):
                problems.append(f"targets {self.targets.shape} do not start with (time, batch) {(n_steps, batch)}")
            if self.mask.shape != (n_steps, batch):
                problems.append(f"mask {self.mask.shape} is not (time, batch) = {(n_steps, batch)}")
            if self.labels is not None and self.labels.shape != (batch,):
                problems.append(f"labels {self.labels.shape} is not (batch,) = {(batch,)}")
        if problems:
            raise bad_argument(
                what=f"Task {self.name!r}: " + "; ".join(problems),
                where="Task(...)",
                why="every array is time first and shares the batch axis",
                fix="build tasks with the generators in fusetrace.tasks",
            )

    @property
    def n_steps(self) -> int:
        return self.inputs.shape[0]

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[1]

    @property
    def n_in(self) -> int:
        return self.inputs.shape[2]

    @property
    def n_out(self) -> int:
        return self.targets.shape[2]

    def step_targets(self) -> tuple[TimeOutputs, TimeMask]:
        """`(targets, mask)`, time first: scanning over it gives each step's `(target_t, mask_t)`,
        the second argument of `cross_entropy_loss` / `mse_loss`.

        Example:
            >>> task = evidence_accumulation(batch=4, seed=0)                         # doctest: +SKIP
            >>> jax.lax.scan(body, carry, (task.inputs, task.step_targets()))        # doctest: +SKIP
        """
        return self.targets, self.mask


def cross_entropy_loss(output: StepOutput, target_and_mask: StepTarget) -> Scalar:
    """One step's softmax cross-entropy, masked, summed over the batch.

    Arguments:
        output: the readout (batch, n_out) (or (n_out,) unbatched).
        target_and_mask: `(target, mask)`: one-hot (or soft) class targets like `output` and the
            step's mask (batch,) (or a scalar).

    Returns:
        Σ_b mask_b · (−Σ_k target_bk log softmax(output_b)_k).
    """
    target, mask = target_and_mask
    log_probabilities = jax.nn.log_softmax(output, axis=-1)
    return -jnp.sum(mask * jnp.sum(target * log_probabilities, axis=-1))


def mse_loss(output: StepOutput, target_and_mask: StepTarget) -> Scalar:
    """One step's squared error, masked, summed over the batch: Σ_b mask_b · ½ Σ_k (output − target)².

    Arguments:
        output: the readout (batch, n_out) (or (n_out,) unbatched).
        target_and_mask: `(target, mask)` as in `cross_entropy_loss`.
    """
    target, mask = target_and_mask
    return 0.5 * jnp.sum(mask * jnp.sum((output - target) ** 2, axis=-1))


def accuracy(outputs: TimeOutputs, task: Task) -> Scalar:
    """Fraction of trials whose decision matches `task.labels`; the decision is the argmax of the
    readout summed over each trial's masked (recall / test) steps.

    Raises:
        TaskError: the task has no trial labels (use `step_accuracy`), or shapes disagree.
    """
    if task.labels is None:
        raise bad_argument(
            what=f"accuracy(outputs, task): task {task.name!r} has no trial labels",
            where="fusetrace.tasks.accuracy",
            why="each of its masked steps has its own class",
            fix="use fusetrace.tasks.step_accuracy",
        )
    outputs = _checked_outputs(outputs, task, "accuracy")
    evidence = jnp.sum(task.mask[..., None] * outputs, axis=0)
    return jnp.mean(jnp.argmax(evidence, axis=-1) == task.labels)


def step_accuracy(outputs: TimeOutputs, task: Task) -> Scalar:
    """Fraction of masked steps whose readout argmax is the target class (for per-step classification,
    e.g. the copy task)."""
    outputs = _checked_outputs(outputs, task, "step_accuracy")
    hits = jnp.argmax(outputs, axis=-1) == jnp.argmax(task.targets, axis=-1)
    return jnp.sum(task.mask * hits) / jnp.sum(task.mask)


def _checked_outputs(outputs, task: Task, where: str) -> jax.Array:
    outputs = jnp.asarray(u.get_mantissa(outputs))
    if outputs.shape != task.targets.shape:
        raise bad_argument(
            what=f"{where}: outputs {outputs.shape} differ from the targets {task.targets.shape}",
            where=f"fusetrace.tasks.{where}",
            why="the readout is compared step by step with the task's targets",
            fix="pass the readout of every step of the task, stacked time first",
        )
    return outputs


# --------------------------------------------------------------------------- generator helpers


def check_count(value, name: str, where: str, minimum: int = 1) -> int:
    """`value` as an int, or a TaskError when it is not an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise bad_argument(
            what=f"{name}={value!r}",
            where=where,
            why=f"{name} counts {'trials' if name == 'batch' else 'steps or items'}",
            fix=f"pass an integer >= {minimum}",
        )
    return int(value)


def spikes(rng: np.random.Generator, rate_hz: np.ndarray, dt_ms: float) -> np.ndarray:
    """0/1 float32 spikes, Bernoulli per step with probability rate · dt (a discretised Poisson process)."""
    probability = np.asarray(rate_hz, np.float32) * np.float32(dt_ms * 1e-3)
    if probability.size and probability.max() > 1.0:
        raise bad_argument(
            what=f"a rate of {probability.max() / (dt_ms * 1e-3):g} Hz at dt = {dt_ms} ms",
            where="fusetrace.tasks spike generation",
            why="a step holds at most one spike, so rate · dt must not exceed 1",
            fix="lower the rate or the step",
        )
    return (rng.random(probability.shape, dtype=np.float32) < probability).astype(np.float32)


def one_hot(classes: np.ndarray, n_classes: int) -> np.ndarray:
    return (np.asarray(classes)[..., None] == np.arange(n_classes)).astype(np.float32)


def as_task(name: str, inputs, targets, mask, labels, dt_ms: float, info: dict) -> Task:
    """A `Task` holding float32 / int32 JAX arrays (whatever the x64 setting)."""
    return Task(
        name=name,
        inputs=jnp.asarray(inputs, jnp.float32),
        targets=jnp.asarray(targets, jnp.float32),
        mask=jnp.asarray(mask, jnp.float32),
        labels=None if labels is None else jnp.asarray(labels, jnp.int32),
        dt_ms=float(dt_ms),
        info=info,
    )


# --------------------------------------------------------------------------- network helpers


def ms(value: float) -> u.Quantity:
    return u.Quantity(value, unit=u.ms)


def mv(value: float) -> u.Quantity:
    return u.Quantity(value, unit=u.mV)


def eprop_beta(tau_a_ms: float, tau_v_ms: float, beta: float = 1.7) -> u.Quantity:
    """`bps.ALIF`'s `beta` for e-prop's threshold adaptation β (1.7 in e-prop).

    e-prop's code (and NEST's port, `adapt_beta`) raises the threshold by β · (1 − ρ) / (1 − α) per
    spike, ρ = e^{−dt/τ_a}, α = e^{−dt/τ_v}, with the adaptation growing by 1 per spike, as brainpy's
    ALIF `a` does; the threshold stays in the same units, so that prefactor in mV is brainpy's `beta`.
    """
    dt_ms = float(u.Quantity(brainstate.environ.get_dt()).to_decimal(u.ms))
    rho, alpha = math.exp(-dt_ms / tau_a_ms), math.exp(-dt_ms / tau_v_ms)
    return mv(beta * (1.0 - rho) / (1.0 - alpha))


def begin_network(dt_ms: float, seed: int | None) -> None:
    """Set brainstate's global dt (read at every step and by `LeakyRateReadout` when built) and, when
    given, reseed `brainstate.random` (the weight initialisers draw from it)."""
    if not dt_ms > 0:
        raise bad_argument(
            what=f"dt_ms={dt_ms!r}",
            where="a reference-network factory",
            why="the step must be a positive duration",
            fix="pass dt_ms > 0 (the tasks use 1.0)",
        )
    brainstate.environ.set(dt=ms(dt_ms))  # pyright: ignore[reportArgumentType]  (annotated float; takes a Quantity)
    if seed is not None:
        brainstate.random.seed(seed)


class RecurrentLIFReadout(brainstate.nn.Module):
    """`n_rec` recurrent LIF neurons (threshold 1 mV) with input and recurrent currents through 5 ms
    exponential synapses, and a `LeakyRateReadout` of the new spikes. `update(x_t)` returns the readout
    (batch, n_out). The reference networks of the pattern and copy tasks are this with their constants."""

    def __init__(
        self,
        n_in: int,
        n_rec: int,
        n_out: int,
        *,
        tau_m_ms: float,
        readout_tau_ms: float,
        in_scale: float,
        rec_scale: float,
    ):
        super().__init__()
        tau_syn = ms(5.0)
        self.neurons = bps.LIF(n_rec, tau=ms(tau_m_ms), V_th=mv(1.0))
        self.rec = current_projection(n_rec, self.neurons, n_rec, tau_syn, scale=rec_scale)
        self.inp = current_projection(n_in, self.neurons, n_rec, tau_syn, scale=in_scale)
        self.out = bps.LeakyRateReadout(n_rec, n_out, tau=ms(readout_tau_ms))

    def update(self, x):
        self.rec(self.neurons.get_spike())
        self.inp(x)
        return self.out(self.neurons())


def current_projection(n_pre: int, post: bps.Neuron, n_post: int, tau_syn, scale: float) -> bps.AlignPostProj:
    """`pre spikes -> Linear (mA, no bias) -> Expon current synapse -> CUBA -> post`.

    Projections onto the same population with equal synapse parameters share one `Expon` (brainpy's
    AlignPost merging): the currents add, which is the same dynamics."""
    return bps.AlignPostProj(
        comm=brainstate.nn.Linear(
            n_pre, n_post, w_init=braintools.init.KaimingNormal(scale=scale, unit=u.mA), b_init=None
        ),
        syn=bps.Expon.desc(n_post, tau=tau_syn, g_initializer=braintools.init.Constant(u.Quantity(0.0, unit=u.mA))),
        out=bps.CUBA.desc(scale=1.0),
        post=post,
    )
