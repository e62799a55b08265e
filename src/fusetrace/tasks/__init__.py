"""Generated reference tasks (no downloads; deterministic in a seed) and their reference networks.

Each generator returns a `Task` (time-first 0/1 spike inputs, targets, a loss mask, labels); each
network factory returns an unmodified brainpy.state module whose `update(x_t)` is the readout, ready
for `fusetrace.compile(net, task.inputs[0], loss=cross_entropy_loss, batch_size=task.batch_size)`.
Definitions: docs/tasks.md; the generated whole-brain connectome and its rate fit: docs/connectome.md.
"""

from .base import RecurrentLIFReadout, Task, TaskError, accuracy, cross_entropy_loss, mse_loss, step_accuracy
from .connectome import Connectome, generate_connectome, load_connectome
from .copy_task import CopyNetwork, copy_network, copy_task
from .dms import DMSNetwork, delayed_match_to_sample, dms_network
from .evidence import EvidenceNetwork, ei_evidence_network, evidence_accumulation, evidence_network
from .flybrain import (
    ConnectomeNetwork,
    RateFit,
    clock,
    connectome_network,
    drive_neurons,
    neuropil_rate_task,
    perturbed_weights,
    rate_fit,
)
from .gif import GifNetwork
from .pattern import PatternNetwork, pattern_generation, pattern_network
from .registry import REGISTRY, TaskSpec, TrainingBatch
from .xor import XorNetwork, temporal_xor, xor_network

__all__ = [
    "REGISTRY",
    "Connectome",
    "ConnectomeNetwork",
    "CopyNetwork",
    "DMSNetwork",
    "EvidenceNetwork",
    "GifNetwork",
    "PatternNetwork",
    "RateFit",
    "RecurrentLIFReadout",
    "Task",
    "TaskError",
    "TaskSpec",
    "TrainingBatch",
    "XorNetwork",
    "accuracy",
    "clock",
    "connectome_network",
    "copy_network",
    "copy_task",
    "cross_entropy_loss",
    "delayed_match_to_sample",
    "dms_network",
    "drive_neurons",
    "ei_evidence_network",
    "evidence_accumulation",
    "evidence_network",
    "generate_connectome",
    "load_connectome",
    "mse_loss",
    "neuropil_rate_task",
    "pattern_generation",
    "pattern_network",
    "perturbed_weights",
    "rate_fit",
    "step_accuracy",
    "temporal_xor",
    "xor_network",
]
