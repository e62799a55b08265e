"""Primitives from the brain-modelling stack that act element-wise."""

from braintools.surrogate._base import heaviside_p

from .elementwise import register_elementwise

# spike = heaviside(x) with a surrogate derivative carried as the second operand
register_elementwise(heaviside_p, spike=True)
