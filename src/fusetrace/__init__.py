"""fusetrace: compile brainpy.state spiking networks into fused O(N) online-learning steps."""

from . import errors
from .analysis import Analysis
from .api import Learner, StepResult, analyze, compile, online
from .passes.hidden import Group
from .passes.relations import Relation
from .program import ProgramSummary
from .regularize import firing_rate_regularizer
from .sequence import ScanResult
from .shard import ShardedStep, shard_step

__all__ = [
    "Analysis",
    "Group",
    "Learner",
    "ProgramSummary",
    "Relation",
    "ScanResult",
    "ShardedStep",
    "StepResult",
    "analyze",
    "compile",
    "errors",
    "firing_rate_regularizer",
    "online",
    "shard_step",
]
