"""The fused program by part (`Learner.program_summary`, `fusetrace.program`): the parts' equations add up
to the fused step's, each part is where the step's code for it runs, and the FLOP estimates equal the
hand-counted arithmetic of small programs."""

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import deep_models
import fusetrace
from fusetrace.program import summarize_program
from fusetrace.rules.control import count_equations

BATCH = 2


def _loss(output, target):
    return jnp.sum((u.get_mantissa(output) - target) ** 2)


@pytest.fixture(scope="module")
def ring_learner():
    brainstate.environ.set(dt=1.0 * u.ms)
    model = deep_models.Ring(3)
    brainstate.nn.init_all_states(model, batch_size=BATCH)
    x0 = jnp.zeros((BATCH, deep_models.N_IN))
    return fusetrace.compile(model, x0, loss=_loss, algorithm="es_d_rtrl", batch_size=BATCH)


def test_parts_add_up_to_the_fused_program(ring_learner):
    summary = ring_learner.program_summary()
    assert summary.equations == count_equations(ring_learner.fused_jaxpr.jaxpr)
    names = [part.name for part in summary.parts]
    # a ring reads the previous population through a chain of groups: every part of es_d_rtrl's step runs
    for part in ("forward", "learning_signal", "derivatives", "traces", "credit_chains", "weight_products"):
        assert part in names, names
    assert all(part.flops >= 0 and part.bytes > 0 for part in summary.parts)
    # the dense weight products are matrix products: the contraction part does arithmetic
    assert {p.name: p.flops for p in summary.parts}["weight_products"] > 0
    text = ring_learner.summary()
    assert "fused program by part" in text and "gradient contraction" in text
    assert "fused program by part" not in ring_learner.summary(program=False)
    assert ring_learner.program_summary() is summary  # traced once per learner


def test_flop_estimates_match_hand_counts():
    a, b = jnp.ones((3, 5), jnp.float32), jnp.ones((5, 7), jnp.float32)
    (dot,) = summarize_program(jax.make_jaxpr(lambda a, b: a @ b)(a, b)).parts
    assert (dot.equations, dot.flops, dot.bytes) == (1, 2 * 3 * 5 * 7, 3 * 7 * 4)

    def loop(x):
        return lax.scan(lambda c, _: (jnp.tanh(c) * 2.0, None), x, None, length=6)[0]

    (scan,) = summarize_program(jax.make_jaxpr(loop)(jnp.ones(10))).parts
    assert scan.equations == count_equations(jax.make_jaxpr(loop)(jnp.ones(10)).jaxpr)
    assert scan.flops == 6 * (10 + 10)  # tanh and the product, per iteration

    batched = jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(jnp.ones((4, 3, 5)), jnp.ones((4, 5, 2)))
    assert sum(p.flops for p in summarize_program(batched).parts) == 2 * 4 * 3 * 5 * 2
