"""`REGISTRY`: each task's generator, reference network, loss and metric under one name, in the shape
the training loop (`fusetrace.trainer.Trainer`) and the command line consume.

`spec.sample(batch=, seed=, **options)` returns a `TrainingBatch`: `inputs` (time first) and `targets`,
the per-step pytree `(target_t, mask_t)` that `spec.loss` takes, plus the `Task` itself for metrics.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import brainstate
import jax.numpy as jnp

from .base import Task, accuracy, cross_entropy_loss, mse_loss, step_accuracy
from .copy_task import copy_network, copy_task
from .dms import delayed_match_to_sample, dms_network
from .evidence import evidence_accumulation, evidence_network
from .pattern import pattern_generation, pattern_network
from .xor import temporal_xor, xor_network


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingBatch:
    """A `Task` laid out for `Trainer`: `targets[t]` is what the loss receives at step t."""

    inputs: Any
    targets: Any
    task: Task

    @classmethod
    def of(cls, task: Task) -> "TrainingBatch":
        return cls(inputs=task.inputs, targets=task.step_targets(), task=task)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything needed to train a reference network on a generated task.

    Attributes:
        name: registry key.
        generate: `generate(batch, seed, **options) -> Task`.
        network: `network() -> brainstate.nn.Module` (set dt and seed brainstate.random first).
        loss: the per-step loss `loss(output, (target_t, mask_t))`.
        metric: `metric(outputs (T, batch, n_out), batch: TrainingBatch) -> dict[str, float]`.
        dt_ms: the task's step.
        demo: settings of a short demonstration run (iterations, batch, learning_rate, task_options, and
            optionally clip_norm, credit_depth and network: "MODULE:FACTORY" of another network than `network`).
    """

    name: str
    generate: Callable[..., Task]
    network: Callable[[], brainstate.nn.Module]
    loss: Callable
    metric: Callable[[Any, TrainingBatch], dict]
    dt_ms: float = 1.0
    demo: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def sample(self, *, batch: int, seed: int, **options) -> TrainingBatch:
        return TrainingBatch.of(self.generate(batch, seed, **options))


def _trial_accuracy(outputs, batch: TrainingBatch) -> dict:
    return {"accuracy": float(accuracy(outputs, batch.task))}


def _step_accuracy(outputs, batch: TrainingBatch) -> dict:
    return {"accuracy": float(step_accuracy(outputs, batch.task))}


def _normalised_error(outputs, batch: TrainingBatch) -> dict:
    """Σ (output − target)² / Σ (target − mean target)²: 1 for a constant guess, 0 for a perfect fit."""
    targets = batch.task.targets
    error = jnp.sum((jnp.asarray(outputs) - targets) ** 2)
    return {"normalised_mse": float(error / jnp.sum((targets - jnp.mean(targets, axis=0)) ** 2))}


def _frozen_pattern(batch: int, seed: int, *, pattern_seed: int = 0, **options) -> Task:
    """e-prop trains on ONE frozen pattern: every iteration gets `pattern_seed`'s pattern, whatever the
    iteration's seed."""
    del seed
    return pattern_generation(pattern_seed, batch=batch, **options)


REGISTRY: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "evidence",
            evidence_accumulation,
            evidence_network,
            cross_entropy_loss,
            _trial_accuracy,
            # the demo trains e-prop's LIF/ALIF network (the reference before issue 16), with es_d_rtrl on a
            # 2-core CPU: with credit_depth=1 (each population's credit through the readout only) held-out
            # accuracy 0.825 / 0.792 / 0.802 on seeds 0-2 after 200 iterations, ~4.6 iterations/s; with the
            # default depth (chains between the LIF and ALIF populations) it peaks at 0.80-0.89 and falls
            # back (0.727 and 0.828 on seeds 1-2), at half the speed (docs/limitations.md)
            demo={
                "iterations": 200,
                "batch": 64,
                "learning_rate": 2e-3,
                "clip_norm": 1.0,
                "task_options": {"shorten": 0.2},
                "credit_depth": 1,
                "network": "fusetrace.tasks:ei_evidence_network",
            },
        ),
        TaskSpec("dms", delayed_match_to_sample, dms_network, cross_entropy_loss, _trial_accuracy),
        TaskSpec("pattern", _frozen_pattern, pattern_network, mse_loss, _normalised_error),
        TaskSpec("copy", functools.partial(copy_task, lag=10), copy_network, cross_entropy_loss, _step_accuracy),
        TaskSpec("xor", temporal_xor, xor_network, cross_entropy_loss, _trial_accuracy),
    )
}
