"""The `regularizer` option: its gradient is learned online exactly where the loss's is.

In the exact regime (one feed-forward spiking layer), `d_rtrl` with a firing-rate regulariser must equal
BPTT of Σ_t (loss_t + regulariser_t), the regulariser read right after each step (float64). The BPTT
reference is `brainstate.transform.grad` through `for_loop` on a twin model (no fusetrace code)."""

import brainstate
import brainunit as u
import jax.numpy as jnp
import numpy as np
import pytest

import fusetrace
from fusetrace.errors import CaptureError, CompileError
from references import state_grad
from test_compile_exact import BATCH, RTOL_EXACT, _build, _data, _flat, _loss, assert_matches, online_grads


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _bptt_with(model, xs, ys, regularizer):
    weights = model.states(brainstate.ParamState)

    def step(x, y):
        return _loss(model.update(x), y) + regularizer(model)

    def total():
        return jnp.sum(brainstate.transform.for_loop(step, xs, ys))

    return {".".join(path): value for path, value in state_grad(total, weights).items()}


@pytest.mark.parametrize("readout", ["leaky", "linear"])
@pytest.mark.parametrize("kind", ["cuba", "alif"])
def test_firing_rate_regularizer_is_exact_under_d_rtrl(kind, readout):
    xs, ys = _data(BATCH)
    reg = fusetrace.firing_rate_regularizer(target_hz=50.0, strength=3.0)
    online = online_grads(_build(kind, readout, BATCH), xs, ys, "d_rtrl", BATCH, regularizer=reg)
    reference = _bptt_with(_build(kind, readout, BATCH), xs, ys, reg)
    assert_matches(online, reference, RTOL_EXACT)
    # the regulariser really moves the hidden weights (the test would prove nothing otherwise)
    plain = online_grads(_build(kind, readout, BATCH), xs, ys, "d_rtrl", BATCH)
    got, without = _flat(online["proj.comm.weight"])[0], _flat(plain["proj.comm.weight"])[0]
    assert np.linalg.norm(got - without) > 1e-3 * np.linalg.norm(without)


def test_regularizer_adds_to_the_step_loss_not_the_output():
    xs, ys = _data(BATCH)
    reg = fusetrace.firing_rate_regularizer(target_hz=20.0, strength=2.0)
    plain = fusetrace.compile(_build("cuba", "linear", BATCH), xs[0], loss=_loss, batch_size=BATCH)
    regular = fusetrace.compile(_build("cuba", "linear", BATCH), xs[0], loss=_loss, batch_size=BATCH, regularizer=reg)
    _, a = plain.step(plain.params, plain.init(), xs[0], ys[0])
    _, b = regular.step(regular.params, regular.init(), xs[0], ys[0])
    np.testing.assert_array_equal(np.asarray(a.output), np.asarray(b.output))
    model = _build("cuba", "linear", BATCH)
    model.update(xs[0])
    np.testing.assert_allclose(float(b.loss), float(a.loss) + float(reg(model)), rtol=1e-12)


def test_regularizer_errors():
    xs, _ = _data(BATCH)
    with pytest.raises(CaptureError, match="not a scalar"):
        fusetrace.compile(
            _build("cuba", "linear", BATCH), xs[0], loss=_loss, batch_size=BATCH, regularizer=lambda m: jnp.ones(3)
        )
    with pytest.raises(CompileError, match="target_hz"):
        fusetrace.firing_rate_regularizer(target_hz=-1.0)
    with pytest.raises(CompileError, match="no spikes"):
        reg = fusetrace.firing_rate_regularizer(spikes=lambda m: [])
        fusetrace.compile(_build("cuba", "linear", BATCH), xs[0], loss=_loss, batch_size=BATCH, regularizer=reg)
