"""`Learner.scan`: the steps of a sequence in one `lax.scan` equal a Python loop of `Learner.step`
(float64 rounding), for every algorithm and relation kind; masked steps form no gradient; the sequence is
checked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusetrace
import zoo
import zoo_coverage
from fusetrace import sequence

RTOL_SUM = 1e-12  # the same per-step arithmetic, summed in another order (float64)
STEPS = 6


def _loss(output, target):
    return sum(jnp.sum((o - target) ** 2) for o in jax.tree.leaves(output))


def _sequence(x0, seed=3):
    keys = jax.random.split(jax.random.PRNGKey(seed), STEPS)
    return jnp.stack([(jax.random.uniform(k, jnp.shape(x0)) < 0.6).astype(jnp.asarray(x0).dtype) for k in keys])


def _flat(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _loop(learner, xs, targets, mask):
    state, total, losses = learner.init(), None, []
    step = jax.jit(learner.step, static_argnames="gradient")
    for x, y, m in zip(xs, targets, mask, strict=True):
        state, res = step(learner.params, state, x, y, gradient=bool(m))
        losses.append(res.loss)
        if m:
            total = res.grads if total is None else jax.tree.map(jnp.add, total, res.grads)
    return state, total, jnp.stack(losses)


CASES = [
    ("leaky_readout", "d_rtrl"),  # dense, with a credit chain through the readout
    ("ei_net_sparse", "es_d_rtrl"),  # event / sparse, factorised
    ("csr_event", "es_d_rtrl"),  # a binary CSR product over a batch: one loop over steps and batch entries
    ("fixed_prob_scalar", "e_prop"),  # a shared scalar weight
    ("conv1d", "es_d_rtrl"),  # a convolution
    ("bias_current", "d_rtrl"),  # a per-neuron parameter
    ("gru", "es_d_rtrl"),  # per-gate relations, a gate crossing a product, per-neuron bias products
]


@pytest.mark.parametrize(("name", "algorithm"), CASES)
def test_scan_equals_summed_steps(name, algorithm):
    model, inputs, _ = {**zoo.ZOO, **vars(zoo_coverage)}[name](batch_size=2)
    (x0,) = inputs
    xs = _sequence(x0)
    targets = jnp.full((STEPS,), 0.3)
    learner = fusetrace.compile(model, x0, loss=_loss, algorithm=algorithm, batch_size=2)
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    if algorithm == "es_d_rtrl":  # its weight products are deferred and contracted per chunk (here 4 + 2 steps)
        assert sequence.deferrable(learner) and sequence.deferred_bytes(learner) > 0
    run = jax.jit(functools.partial(learner.scan, chunk=4))
    state, result = run(learner.params, learner.init(), xs, targets, loss_mask=mask)
    want_state, want_grads, want_losses = _loop(learner, xs, targets, mask)
    np.testing.assert_allclose(np.asarray(result.loss), np.asarray(want_losses), rtol=RTOL_SUM)
    for got, want in zip(_flat(result.grads), _flat(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL_SUM, atol=1e-14)
    for got, want in zip(_flat(state), _flat(want_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL_SUM, atol=1e-14)
    assert jax.tree.leaves(result.output)[0].shape[0] == STEPS


def test_scan_refuses_a_ragged_sequence():
    model, (x0,), _ = zoo.ZOO["leaky_readout"](batch_size=2)
    learner = fusetrace.compile(model, x0, loss=_loss, algorithm="d_rtrl", batch_size=2)
    xs = _sequence(x0)
    with pytest.raises(fusetrace.errors.CompileError, match="lengths"):
        learner.scan(learner.params, learner.init(), xs, jnp.zeros((STEPS + 1,)))
    with pytest.raises(fusetrace.errors.CompileError, match="loss_mask"):
        learner.scan(learner.params, learner.init(), xs, jnp.zeros((STEPS,)), loss_mask=jnp.ones((STEPS, 2)))


def test_unbatched_csr_products_are_taken_step_by_step_by_default():
    """An unbatched learner whose products are all binary CSR products does not defer them by default (the
    deferred pass over the connections is the same work, slower in the chunk's loop: benchmarks.md); its
    sums still equal the loop of steps and the explicitly deferred ones. Batched, it defers."""
    assert sequence.deferral_pays(fusetrace.compile(*_csr_event(2), loss=_loss, algorithm="es_d_rtrl", batch_size=2))
    model, x0 = _csr_event(None)
    learner = fusetrace.compile(model, x0, loss=_loss, algorithm="es_d_rtrl", batch_size=None)
    assert sequence.deferrable(learner) and not sequence.deferral_pays(learner)
    assert "taken step by step by default" in learner.summary(program=False)
    xs, targets, mask = _sequence(x0), jnp.full((STEPS,), 0.3), np.array([1, 0, 1, 1, 0, 1], bool)
    _, want, _ = _loop(learner, xs, targets, mask)
    for chunk in (None, 4):
        _, result = jax.jit(functools.partial(learner.scan, chunk=chunk))(
            learner.params, learner.init(), xs, targets, loss_mask=mask
        )
        for got, expected in zip(_flat(result.grads), _flat(want), strict=True):
            np.testing.assert_allclose(got, expected, rtol=RTOL_SUM, atol=1e-14)


def _csr_event(batch_size):
    model, (x0,), _ = {**zoo.ZOO, **vars(zoo_coverage)}["csr_event"](batch_size=batch_size)
    return model, x0
