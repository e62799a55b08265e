"""The brute-force references of `references.py` checked against each other and against finite differences.

Exact (float64): BPTT == central finite differences on a smooth-spike model; dense RTRL == BPTT; masked
RTRL == BPTT when the true Jacobian is per-neuron (feed-forward layer, or recurrent spikes detached).
Approximate on purpose: masked RTRL != BPTT on a recurrent layer (the masking drops cross-neuron credit).
The naive es_d_rtrl formulas are checked in their two degenerate exact cases (T = 1; α -> 1 with an input
constant in time).
"""

import jax

jax.config.update("jax_enable_x64", True)

import brainstate  # noqa: E402

# brainstate fixes its default float dtype when first imported; another test module may have imported it
# before float64 was enabled, so set the precision explicitly too.
brainstate.environ.set(precision=64)

import brainunit as u  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from references import (  # noqa: E402
    bptt_grads,
    bptt_grads_stopgrad,
    build_recurrent_lif,
    es_d_rtrl_naive,
    functional_step,
    hidden_mask,
    rtrl_reference,
    soft_spike,
    stop_recurrent,
)

RTOL_FD = 1e-5  # central differences with step 1e-6 in float64: truncation ~1e-10, cancellation ~1e-10
EPS_FD = 1e-6
ATOL_EXACT = 1e-8  # exact algebra in float64, two summation orders (scan vs dense matrix products)
MIN_MASK_EFFECT = 1e-3  # the masked recurrent gradient must differ by far more than rounding
ES_ONE_MINUS_ALPHA = 1e-8
ES_LIMIT_RTOL = 1e-6  # es_d_rtrl -> d_rtrl linearly in (1 - α); measured 1.2e-8 relative at 1 - α = 1e-8

N_IN, N_REC, N_OUT, N_STEPS, BATCH = 3, 4, 2, 8, 2


def squared_error(output, target):
    return 0.5 * jnp.sum((output - target) ** 2)


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def data(batch_size, n_steps=N_STEPS, seed=0):
    batch = () if batch_size is None else (batch_size,)
    key_x, key_y = jax.random.split(jax.random.PRNGKey(seed))
    xs = jax.random.uniform(key_x, (n_steps, *batch, N_IN))
    targets = jax.random.normal(key_y, (n_steps, *batch, N_OUT))
    return xs, targets


def assert_close(actual, desired, atol=ATOL_EXACT, rtol=0.0):
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    np.testing.assert_allclose(flat(actual), flat(desired), atol=atol, rtol=rtol)


@pytest.mark.parametrize("batch_size", [None, BATCH])
@pytest.mark.parametrize("readout", ["leaky", "linear"])
def test_functional_step_matches_model_update(batch_size, readout):
    model = build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=batch_size, readout=readout)
    twin = build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=batch_size, readout=readout)
    xs, _ = data(batch_size, n_steps=3)  # run eagerly on both sides, so bit-identical
    step_fn, params, hidden, others = functional_step(model, xs[0], batch_size)
    for x in xs:
        out, hidden, others = step_fn(params, hidden, others, x)
        np.testing.assert_array_equal(out, u.get_mantissa(twin.update(x)))
    for path, state in twin.states().items():
        key = ".".join(map(str, path))
        if key in hidden:
            np.testing.assert_array_equal(hidden[key], u.get_mantissa(state.value))
    # the references leave the model itself untouched
    np.testing.assert_array_equal(
        model.N.V.value.mantissa,
        build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=batch_size, readout=readout).N.V.value.mantissa,
    )


@pytest.mark.parametrize("readout", ["leaky", "linear"])
def test_bptt_matches_central_finite_differences(readout):
    """Exact: with a smooth spike function the step is differentiable, so BPTT is the true gradient."""
    model = build_recurrent_lif(2, 3, N_OUT, readout=readout, spk_fun=soft_spike)
    xs, targets = data(None, n_steps=5)
    xs = xs[..., :2]
    step_fn, params, hidden, others = functional_step(model, xs[0])
    theta, unravel = ravel_pytree(params)

    @jax.jit
    def total_loss(theta):
        loss, h, o = 0.0, hidden, others
        for x, target in zip(xs, targets, strict=True):
            out, h, o = step_fn(unravel(theta), h, o, x)
            loss = loss + squared_error(out, target)
        return loss

    basis = jnp.eye(theta.size)
    finite_diff = np.array(
        [(total_loss(theta + EPS_FD * e) - total_loss(theta - EPS_FD * e)) / (2 * EPS_FD) for e in basis]
    )
    grads = flat(bptt_grads(model, xs, targets, squared_error))
    assert np.linalg.norm(grads) > 0
    np.testing.assert_allclose(grads, finite_diff, rtol=RTOL_FD, atol=RTOL_FD * np.abs(grads).max())


@pytest.mark.parametrize("batch_size", [None, BATCH])
@pytest.mark.parametrize("readout", ["leaky", "linear"])
def test_masked_rtrl_equals_bptt_on_feed_forward_layer(batch_size, readout):
    """Exact: without a recurrent weight the true Jacobian is per-neuron, and the leaky readout's credit
    flows through the LTI rows, so one-step-window RTRL with masked traces is the full BPTT gradient."""
    model = build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=batch_size, readout=readout, recurrent=False)
    xs, targets = data(batch_size)
    groups, lti_groups = model.groups()
    online = rtrl_reference(model, xs, targets, squared_error, groups, lti_groups, batch_size)
    exact = bptt_grads(model, xs, targets, squared_error, batch_size)
    assert np.linalg.norm(flat(exact["inp.comm.weight"])) > 0
    assert_close(online, exact)


@pytest.mark.parametrize("batch_size", [None, BATCH])
def test_unmasked_rtrl_equals_bptt_on_recurrent_layer(batch_size):
    """Exact: dense RTRL (no mask) is forward-mode BPTT."""
    model = build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=batch_size, w_rec_scale=3.0)
    xs, targets = data(batch_size)
    _, lti_groups = model.groups()
    online = rtrl_reference(model, xs, targets, squared_error, None, lti_groups, batch_size)
    assert_close(online, bptt_grads(model, xs, targets, squared_error, batch_size))


def test_masked_rtrl_differs_from_bptt_on_recurrent_layer():
    """Approximate: masking drops the credit carried across neurons by the recurrent weight."""
    model = build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=BATCH, w_rec_scale=3.0)
    xs, targets = data(BATCH)
    groups, lti_groups = model.groups()
    online = flat(rtrl_reference(model, xs, targets, squared_error, groups, lti_groups, BATCH))
    exact = flat(bptt_grads(model, xs, targets, squared_error, BATCH))
    assert np.linalg.norm(online - exact) > MIN_MASK_EFFECT * np.linalg.norm(exact)


def test_masked_rtrl_equals_stopgrad_bptt_on_recurrent_layer():
    """Exact: with recurrent spikes detached the Jacobian is per-neuron again, so masked RTRL (the d_rtrl /
    e-prop quantity) is BPTT of the stop-gradient graph — and differs from plain BPTT."""
    model = build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=BATCH, w_rec_scale=3.0)
    xs, targets = data(BATCH)
    groups, lti_groups = model.groups()
    with stop_recurrent(model):
        online = rtrl_reference(model, xs, targets, squared_error, groups, lti_groups, BATCH)
    assert model.stop_recurrent_grad is False
    stopped = bptt_grads_stopgrad(model, xs, targets, squared_error, BATCH)
    assert_close(online, stopped)
    exact = flat(bptt_grads(model, xs, targets, squared_error, BATCH))
    assert np.linalg.norm(flat(stopped) - exact) > MIN_MASK_EFFECT * np.linalg.norm(exact)


def test_hidden_mask_keeps_per_neuron_blocks_and_whole_lti_groups():
    hidden = {"a": jnp.zeros(2), "b": jnp.zeros(2), "r": jnp.zeros(3)}
    mask = hidden_mask(hidden, [["a", "b"]], [["r"]])
    spiking = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])
    expected = np.zeros((7, 7))
    expected[:4, :4] = spiking
    expected[4:, 4:] = 1
    np.testing.assert_array_equal(mask, expected)
    assert hidden_mask(hidden, None) is None
    with pytest.raises(ValueError, match="in no group"):
        hidden_mask(hidden, [["a", "b"]])
    with pytest.raises(ValueError, match="mixes neuron counts"):
        hidden_mask(hidden, [["a", "r"]], [["b"]])


def test_es_d_rtrl_naive_is_exact_for_one_step():
    """Exact (T = 1, any α): both factorised traces hold only the immediate term `F_0 ⊗ u_0`."""
    model = build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=BATCH, readout="linear", w_rec_scale=3.0)
    xs, targets = data(BATCH, n_steps=1)
    online = es_d_rtrl_naive(model, xs, targets, squared_error, 0.7, BATCH)
    assert_close(online, bptt_grads(model, xs, targets, squared_error, BATCH))


def test_es_d_rtrl_naive_tends_to_bptt_for_constant_input():
    """Exact in the limit α -> 1 on a feed-forward layer fed a constant input: `ε^u_t / c_t = u / (1 − α)`
    and `ε^f_t / (1 − α)` tends to the exact per-neuron trace."""
    model = build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=BATCH, readout="linear", recurrent=False)
    xs, targets = data(BATCH)
    xs = jnp.broadcast_to(xs[0], xs.shape)
    online = flat(es_d_rtrl_naive(model, xs, targets, squared_error, 1.0 - ES_ONE_MINUS_ALPHA, BATCH))
    exact = flat(bptt_grads(model, xs, targets, squared_error, BATCH))
    np.testing.assert_allclose(online, exact, atol=ES_LIMIT_RTOL * np.abs(exact).max())
    coarse = flat(es_d_rtrl_naive(model, xs, targets, squared_error, 0.5, BATCH))
    assert np.linalg.norm(coarse - exact) > MIN_MASK_EFFECT * np.linalg.norm(exact)  # an approximation
