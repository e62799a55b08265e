"""The primitive registry (`RULES`) and its rule families; importing this package registers them all."""

from . import contracting, control, elementwise, neuro, structural  # noqa: F401  (registration)
from .base import ALIGNED_AFFINE, MIXED, RULES, Dep, Fact, Operand, Rule, Source, lookup, register
from .contracting import reads_values

__all__ = [
    "ALIGNED_AFFINE",
    "MIXED",
    "RULES",
    "Dep",
    "Fact",
    "Operand",
    "Rule",
    "Source",
    "lookup",
    "reads_values",
    "register",
]
