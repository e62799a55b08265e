"""fusetrace: compile brainpy.state spiking networks into fused O(N) online-learning steps."""

from . import errors
from .analysis import Analysis
from .api import Learner, StepResult, analyze, compile, online
from .passes.hidden import Group
from .passes.relations import Relation

__all__ = ["Analysis", "Group", "Learner", "Relation", "StepResult", "analyze", "compile", "errors", "online"]
