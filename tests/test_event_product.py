"""`passes.event_product`: a dense `x @ W` formed from the non-zeros of `x` equals the op (float64
rounding), in value and derivatives, on both sides of the density switch, batched, unbatched and under
`vmap`; and the fused step of a spiking layer uses it on the CPU."""

import brainpy
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusetrace
from fusetrace.passes import event_product

RTOL = 1e-13  # the same sum without its zero terms, added in another order (float64)


def _contraction(x, w):
    """The captured `x @ W` of a one-equation jaxpr, as the analysis records it (its eqn, operand roles)."""
    jaxpr = jax.make_jaxpr(lambda a, b: a @ b)(x, w)

    class Contraction:
        eqn = jaxpr.jaxpr.eqns[0]
        pre_operand, weight_operand = 0, 1

    return Contraction


@pytest.fixture(autouse=True)
def _any_size(monkeypatch):
    """The tests' tiny products are below the size where the event-driven form pays: take them anyway."""
    monkeypatch.setattr(event_product, "MIN_WEIGHTS", 0)
    monkeypatch.setattr(event_product, "MIN_POST", 0)


def _spikes(shape, density, seed, values=False):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    return jnp.asarray(mask * (rng.standard_normal(shape) if values else 1.0))


@pytest.mark.parametrize(
    "shape, density, values",
    [
        ((16, 64), 0.05, False),
        ((16, 64), 0.05, True),
        ((16, 64), 0.6, False),
        ((64,), 0.05, False),
        ((3, 64), 0.0, False),
    ],
)
def test_the_event_product_equals_the_op_in_value_and_derivatives(shape, density, values):
    x = _spikes(shape, density, seed=0, values=values)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 24)))
    c = _contraction(x, w)
    assert event_product.eligible(c)
    (evaluate,) = event_product.rewrites([c]).values()
    product = jax.jit(lambda a, b: evaluate([a, b])[0])
    np.testing.assert_allclose(product(x, w), x @ w, rtol=RTOL, atol=1e-14)
    dx, dw = jnp.ones_like(x), jnp.asarray(np.random.default_rng(2).standard_normal(w.shape))
    _, tangent = jax.jvp(product, (x, w), (dx, dw))
    np.testing.assert_allclose(tangent, dx @ w + x @ dw, rtol=RTOL, atol=1e-14)
    ct = jnp.ones((*shape[:-1], 24))
    grads = jax.grad(lambda a, b: jnp.sum(product(a, b) * ct), argnums=(0, 1))(x, w)
    reference = jax.grad(lambda a, b: jnp.sum((a @ b) * ct), argnums=(0, 1))(x, w)
    for got, want in zip(grads, reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-14)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(0, 6),
    n_pre=st.integers(1, 40),
    n_post=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    values=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.float64]),
    seed=st.integers(0, 2**16),
)
def test_the_event_product_equals_the_op_over_sizes_densities_and_dtypes(
    rows, n_pre, n_post, density, values, dtype, seed
):
    """Any size (rows 0: an unbatched vector), any share of non-zeros (both sides of `DENSITY`), spikes or
    real values, float32 and float64: the op's value up to the order of the additions."""
    shape = (rows, n_pre) if rows else (n_pre,)
    x = _spikes(shape, density, seed, values).astype(dtype)
    w = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((n_pre, n_post)), dtype)
    (evaluate,) = event_product.rewrites([_contraction(x, w)]).values()
    got = jax.jit(lambda a, b: evaluate([a, b])[0])(x, w)
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-13
    np.testing.assert_allclose(got, x @ w, rtol=tolerance, atol=tolerance * n_pre)


def test_the_event_product_under_vmap_equals_a_loop():
    xs = _spikes((3, 4, 32), 0.05, seed=3)
    w = jnp.asarray(np.random.default_rng(4).standard_normal((32, 8)))
    (evaluate,) = event_product.rewrites([_contraction(xs[0], w)]).values()
    batched = jax.jit(jax.vmap(lambda a: evaluate([a, w])[0]))(xs)
    np.testing.assert_allclose(batched, jnp.stack([x @ w for x in xs]), rtol=RTOL, atol=1e-14)


def test_only_a_plain_float_matmul_of_a_size_where_it_pays_is_eligible(monkeypatch):
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    assert event_product.eligible(_contraction(x, w))
    assert not event_product.eligible(_contraction(x.astype(jnp.int32), w.astype(jnp.int32)))
    assert not event_product.eligible(_contraction(jnp.ones((event_product.MAX_ROWS + 1, 8)), w))
    jaxpr = jax.make_jaxpr(lambda a, b: b.T @ a.T)(x, w)

    class Swapped:  # the weight first: not `x @ W`
        eqn = jaxpr.jaxpr.eqns[-1]
        pre_operand, weight_operand = 1, 0

    assert not event_product.eligible(Swapped)
    monkeypatch.undo()  # the module's sizes
    assert not event_product.eligible(_contraction(x, w))
    big = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
    assert event_product.eligible(_contraction(jax.ShapeDtypeStruct((16, 1024), jnp.float32), big))


class _Layer(brainstate.nn.Module):
    def __init__(self, n_in=20, n=12):
        super().__init__()
        self.lif = brainpy.state.LIF(
            n, tau=10.0 * u.ms, V_th=1.0 * u.mV, V_reset=0.0 * u.mV, V_initializer=braintools.init.Constant(0.0 * u.mV)
        )
        self.w = brainstate.nn.Linear(n_in, n, w_init=braintools.init.KaimingNormal(scale=3.0))

    def update(self, x):
        self.lif(self.w(x) * u.mA)
        return self.lif.get_spike()


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
def test_a_learner_with_its_products_event_by_event_equals_it_with_the_op(monkeypatch, algorithm):
    """Ten steps of a spiking layer (about a tenth of its inputs spike): the states, losses and gradients
    with the event-driven forward product equal those with the op (float64 rounding)."""
    brainstate.environ.set(dt=1.0 * u.ms)
    xs = _spikes((10, 4, 20), 0.08, seed=5)
    runs = []
    for rewrite in (event_product.rewrites, lambda contractions: {}):
        monkeypatch.setattr(event_product, "rewrites", rewrite)
        brainstate.random.seed(0)
        net = _Layer()
        brainstate.nn.init_all_states(net, batch_size=4)
        learner = fusetrace.compile(
            net, xs[0], loss=lambda out, target: jnp.sum(out**2), algorithm=algorithm, batch_size=4
        )
        step = jax.jit(learner.step)
        state, results = learner.init(), []
        for x in xs:
            state, result = step(learner.params, state, x, None)
            results.append((result.loss, result.grads))
        runs.append((state, results))
    for got, want in zip(*(jax.tree.leaves(run) for run in runs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def _compiled_step(learner, x) -> str:
    return jax.jit(learner.step).lower(learner.params, learner.init(), x, None).compile().as_text()


def test_the_fused_step_of_a_spiking_layer_forms_its_product_event_by_event_on_the_cpu(monkeypatch):
    brainstate.environ.set(dt=1.0 * u.ms)
    net = _Layer()
    brainstate.nn.init_all_states(net, batch_size=4)
    x = jnp.zeros((4, 20))
    learner = fusetrace.compile(net, x, loss=lambda out, target: jnp.sum(out), batch_size=4)
    assert "custom-call" in _compiled_step(learner, x)
    assert "non-zero inputs on the CPU" in learner.summary(program=False)
    assert "`w.weight.weight`" in learner.summary(program=False).splitlines()[-1]
    monkeypatch.setattr(event_product, "rewrites", lambda contractions: {})  # the op itself: no custom call
    assert "custom-call" not in _compiled_step(learner, x)
    monkeypatch.setattr(event_product, "MIN_WEIGHTS", 10**9)
    assert "non-zero inputs" not in learner.summary(program=False)
