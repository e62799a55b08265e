"""Tier 2: weights as users write them (issue 18), against BPTT through brainstate (float64, one-step
windows, Σ_t of the online gradients with fixed weights against the gradient of Σ_t loss).

* A weight reaching its op through a state-free transform (Dale's `abs(w) * sign`, a mask, a column
  normalisation `g · w / ‖w‖`, a softplus, a low-rank `u @ v`): the trace follows the op's effective
  weight and the gradient is pulled back through the transform — exact under d_rtrl / e_prop (1e-6), and
  under es_d_rtrl exactly the chain rule applied to es_d_rtrl on the effective weight (1e-10).
* One op output feeding two populations (a `Linear` applied once), one weight used by two ops (tying),
  an input applied in two neuron sub-steps: one trace per receiving group, gradients summed — exact.
* A trained per-neuron threshold read by the spike function and the reset (and through the spikes a
  readout takes): exact.
"""

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import param_models as pm
from test_compile_exact import assert_matches, bptt_grads, online_learner

RTOL_EXACT = 1e-6  # issue 18's bound (exact algebra, float64; observed ~1e-15)
RTOL_CHAIN = 1e-10  # the chain rule against the same algorithm on the effective weight (float64 rounding)
BATCH, STEPS = 2, 20
TRANSFORMS = ["dale", "mask", "norm", "softplus", "low_rank"]
REUSE = ["shared_linear", "tied", "two_substeps", "threshold"]


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _loss(output, target):
    return jnp.sum((u.get_mantissa(output) - target) ** 2)


def _data(batch):
    shape = (STEPS, batch, pm.N_IN) if batch else (STEPS, pm.N_IN)
    xs = (jax.random.uniform(jax.random.PRNGKey(1), shape) < 0.5).astype(jnp.float64)
    ys = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (*shape[:-1], pm.N_OUT))
    return xs, ys


def _online(model, batch, algorithm, **options):
    xs, ys = _data(batch)
    return online_learner(model, xs, ys, algorithm, batch, loss=_loss, **options)


def _bptt(name, batch):
    xs, ys = _data(batch)
    return bptt_grads(pm.build(name, batch), xs, ys, loss=_loss)


CASES = [(name, BATCH, "d_rtrl") for name in TRANSFORMS + REUSE]
CASES += [(name, None, "d_rtrl") for name in ("dale", "norm", "low_rank", "shared_linear", "threshold")]
CASES += [(name, BATCH, "e_prop") for name in ("mask", "low_rank", "shared_linear", "threshold")]


@pytest.mark.parametrize(("name", "batch", "algorithm"), CASES)
def test_weights_as_users_write_them_get_exact_traces(name, batch, algorithm):
    learner, online = _online(pm.build(name, batch), batch, algorithm)
    assert_matches(online, _bptt(name, batch), RTOL_EXACT)
    reports = learner.report()
    assert all(r.exact and r.treatment == "trace" for r in reports), learner.summary()
    if name in TRANSFORMS:
        assert any("chain rule" in r.why for r in reports)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_es_d_rtrl_of_a_transformed_weight_is_the_chain_rule_on_its_effective_weight(name):
    """es_d_rtrl factorises the trace of the op's effective weight: its gradient is `Jᵀ g`, with `g`
    es_d_rtrl's gradient of the same network written with the effective weight as a plain weight."""
    options = {"decay": 0.8}
    model = pm.build(name, BATCH)
    params = {path: state.value for path, state in model.states(brainstate.ParamState).items() if path[0] != "out"}
    effective = lambda p: model.weight_from({path[0]: value for path, value in p.items()})
    _, transformed = _online(model, BATCH, "es_d_rtrl", **options)
    plain, twin = pm.build("plain", BATCH), pm.build(name, BATCH)  # a fresh twin: `model` has been stepped
    mine = twin.states()
    for path, state in plain.states().items():  # the same readout and initial states
        if path in mine:
            state.value = mine[path].value
    plain.w.value = effective(params)
    _, reference = _online(plain, BATCH, "es_d_rtrl", **options)
    _, vjp = jax.vjp(effective, params)
    (chained,) = vjp(reference["w"])
    for (path,), value in chained.items():
        np.testing.assert_allclose(np.asarray(transformed[path]), np.asarray(value), rtol=RTOL_CHAIN, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(transformed["out.weight"]), np.asarray(reference["out.weight"]), rtol=RTOL_CHAIN
    )
