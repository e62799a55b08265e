"""The whole suite runs in float64: exactness claims are checked at 1e-6 and tighter."""

import brainstate
import jax

jax.config.update("jax_enable_x64", True)
brainstate.environ.set(precision=64)  # brainstate fixes its default float type on import otherwise
