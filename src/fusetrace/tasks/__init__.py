"""Generated reference tasks (no downloads; deterministic in a seed) and their reference networks.

Each generator returns a `Task` (time-first 0/1 spike inputs, targets, a loss mask, labels); each
network factory returns an unmodified brainpy.state module whose `update(x_t)` is the readout, ready
for `fusetrace.compile(net, task.inputs[0], loss=cross_entropy_loss, batch_size=task.batch_size)`.
Definitions: docs/tasks.md.
"""

from .base import RecurrentLIFReadout, Task, TaskError, accuracy, cross_entropy_loss, mse_loss, step_accuracy
from .copy_task import CopyNetwork, copy_network, copy_task
from .dms import DMSNetwork, delayed_match_to_sample, dms_network
from .evidence import EvidenceNetwork, evidence_accumulation, evidence_network
from .pattern import PatternNetwork, pattern_generation, pattern_network
from .registry import REGISTRY, TaskSpec, TrainingBatch

__all__ = [
    "REGISTRY",
    "CopyNetwork",
    "DMSNetwork",
    "EvidenceNetwork",
    "PatternNetwork",
    "RecurrentLIFReadout",
    "Task",
    "TaskError",
    "TaskSpec",
    "TrainingBatch",
    "accuracy",
    "copy_network",
    "copy_task",
    "cross_entropy_loss",
    "delayed_match_to_sample",
    "dms_network",
    "evidence_accumulation",
    "evidence_network",
    "mse_loss",
    "pattern_generation",
    "pattern_network",
    "step_accuracy",
]
