"""The whole suite runs in float64: exactness claims are checked at 1e-6 and tighter."""

import jax

jax.config.update("jax_enable_x64", True)
