"""Tier 4: the fused program grows linearly with the model.

On a ring of K populations (`deep_models.Ring`: each population reads the previous one and the input, a
leaky readout reads them all), the fused step's equations (`jax.make_jaxpr`, nested sub-jaxprs counted;
nothing is compiled by XLA) must grow no faster than the captured forward step's from K = 4 to K = 16.
Each derivative is evaluated from its own group's slice of the step, the credit chains share their pulls
and every group's derivatives, so the program is O(K); re-evaluating the whole step per derivative made
it O(K²) (issue 19: 132,130 equations for K = 8, 1,993,522 for K = 32).
"""

import brainstate
import brainunit as u
import jax.numpy as jnp
import pytest

import deep_models
import fusetrace
from fusetrace.rules.control import count_equations

SMALL, LARGE = 4, 16
GROWTH_SLACK = 1.25  # issue 19's bar: the fused program grows at most 1.25x faster than the forward step
SIZE_BAR = 10.0  # issue 19's bar: es_d_rtrl's fused program has at most 10x the forward step's equations
BATCH = 2


def _loss(output, target):
    return jnp.sum((u.get_mantissa(output) - target) ** 2)


def _sizes(populations: int, algorithm: str) -> tuple[int, int]:
    """(forward step, fused step) equations on a ring of `populations`."""
    brainstate.environ.set(dt=1.0 * u.ms)
    model = deep_models.Ring(populations)
    brainstate.nn.init_all_states(model, batch_size=BATCH)
    x0 = jnp.zeros((BATCH, deep_models.N_IN))
    learner = fusetrace.compile(model, x0, loss=_loss, algorithm=algorithm, batch_size=BATCH)
    forward = count_equations(learner.analysis.captured.jaxpr.jaxpr)
    return forward, count_equations(learner.fused_jaxpr.jaxpr)


@pytest.mark.parametrize("algorithm", ["es_d_rtrl", "d_rtrl"])
def test_fused_program_grows_linearly_with_populations(algorithm):
    (forward_small, fused_small), (forward_large, fused_large) = _sizes(SMALL, algorithm), _sizes(LARGE, algorithm)
    forward_growth, fused_growth = forward_large / forward_small, fused_large / fused_small
    assert fused_growth <= GROWTH_SLACK * forward_growth, (
        f"{algorithm}: from {SMALL} to {LARGE} populations the forward step grows {forward_growth:.2f}x "
        f"({forward_small} -> {forward_large} equations), the fused step {fused_growth:.2f}x "
        f"({fused_small} -> {fused_large})"
    )
    if algorithm == "es_d_rtrl":
        assert fused_large <= SIZE_BAR * forward_large, (fused_large, forward_large)
