"""fusetrace: compile brainpy.state spiking networks into fused O(N) online-learning steps."""

from . import errors
from .analysis import Analysis
from .api import Learner, StepResult, analyze, compile, online
from .passes.hidden import Group
from .passes.relations import Relation
from .regularize import firing_rate_regularizer

__all__ = [
    "Analysis",
    "Group",
    "Learner",
    "Relation",
    "StepResult",
    "analyze",
    "compile",
    "errors",
    "firing_rate_regularizer",
    "online",
]
