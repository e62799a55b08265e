"""Bad input at the step: `Learner.step` and `Trainer` compare the shapes, dtypes and units of `x_t`
and `target_t` with the compiled example and raise the four-part `InputError` (eagerly and under
`jax.jit`) instead of a raw JAX error or a silently broadcast loss; a loss that is not a floating-point
scalar is refused by `fusetrace.compile`."""

import dataclasses

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fusetrace
from fusetrace.errors import CompileError, InputError
from fusetrace.trainer import Trainer
from test_compile_exact import BATCH, N_IN, N_OUT, STEPS, _build, _data, _loss

RTOL_UNIT = 1e-12  # the same input given in µA instead of mA (one conversion), float64


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


@pytest.fixture(scope="module")
def learner():
    brainstate.environ.set(dt=1.0 * u.ms)
    xs, ys = _data(BATCH)
    return fusetrace.compile(
        _build("cuba", "leaky", BATCH), xs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH, example_target=ys[0]
    )


def _four_parts(message: str) -> bool:
    return all(f"\n  {part}:" in message for part in ("where", "why", "fix"))


def _step(learner, x, y, jit):
    step = jax.jit(learner.step) if jit else learner.step
    return step(learner.params, learner.init(), x, y)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "x, got",
    [
        (jnp.ones(7), "(7,)"),  # the raw TypeError of dot_general before
        (jnp.ones(N_IN), f"({N_IN},)"),  # the batch axis forgotten
        (jnp.ones((BATCH + 1, N_IN)), f"({BATCH + 1}, {N_IN})"),
        (jnp.ones((BATCH, N_IN)) * u.mA, "in mA"),  # a unit where the example has none: silently stripped before
        (jnp.ones((BATCH, N_IN), jnp.complex128), "complex128"),
    ],
)
def test_a_wrong_input_is_a_four_part_error_naming_what_was_expected(learner, x, got, jit):
    _, ys = _data(BATCH)
    with pytest.raises(InputError) as caught:
        _step(learner, x, ys[0], jit)
    message = str(caught.value)
    assert message.startswith("`x_t` is") and got in message.splitlines()[0], message
    assert f"expected (batch={BATCH}, {N_IN}) float64, unitless" in message and _four_parts(message)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "y, got",
    [
        (jnp.ones((BATCH, 1)), f"({BATCH}, 1)"),  # broadcast into a wrong loss before
        (1.0, "()"),
        (jnp.ones((BATCH, N_OUT)) * u.mV, "in mV"),
        ((jnp.ones((BATCH, N_OUT)), 1.0), "structure"),
    ],
)
def test_a_wrong_target_is_a_four_part_error(learner, y, got, jit):
    xs, _ = _data(BATCH)
    with pytest.raises(InputError) as caught:
        _step(learner, xs[0], y, jit)
    message = str(caught.value)
    assert message.startswith("`target_t") and got in message.splitlines()[0], message
    assert _four_parts(message)


def test_inputs_that_stand_for_the_example_are_accepted(learner):
    """Other float widths, integer or boolean spikes and NumPy arrays of the right shape trace as before
    (traced only: the values are JAX's business)."""
    xs, ys = _data(BATCH)
    target = np.asarray(ys[0], np.float32)
    for x in (xs[0].astype(jnp.float32), xs[0].astype(jnp.int32), xs[0].astype(bool), np.asarray(xs[0])):
        _, res = jax.eval_shape(learner.step, learner.params, learner.init(), x, target)
        assert res.loss.shape == () and jnp.issubdtype(res.loss.dtype, jnp.floating)


def test_units_are_checked_by_dimension_not_by_scale():
    """An input compiled in mA accepts µA (converted on the way in), refuses mV and a plain array."""

    class Driven(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _build("cuba", "leaky", BATCH)

        def update(self, x, drive):
            return self.inner(x) + jnp.sum(drive.to_decimal(u.mA))

    xs, ys = _data(BATCH)
    drive = jnp.ones(BATCH) * u.mA
    model = Driven()
    learner = fusetrace.compile(model, xs[0], drive, loss=_loss, algorithm="d_rtrl", batch_size=BATCH)
    _, ok = learner.step(learner.params, learner.init(), (xs[0], drive), ys[0])
    _, scaled = learner.step(learner.params, learner.init(), (xs[0], drive.in_unit(u.uA)), ys[0])
    np.testing.assert_allclose(scaled.loss, ok.loss, rtol=RTOL_UNIT)
    for bad, got in ((jnp.ones(BATCH) * u.mV, "in mV"), (jnp.ones(BATCH), "unitless")):
        with pytest.raises(InputError, match=rf"`x_t\[1\]` is \({BATCH},\) float64, {got}; expected .*, in mA"):
            learner.step(learner.params, learner.init(), (xs[0], bad), ys[0])


def test_the_target_is_free_without_an_example_target():
    """Without `example_target`, the target's layout is the loss's business: integer labels pass."""
    xs, _ = _data(BATCH)

    def label_loss(output, label):
        return -jnp.sum(jax.nn.log_softmax(output)[jnp.arange(BATCH), label])

    learner = fusetrace.compile(
        _build("cuba", "leaky", BATCH), xs[0], loss=label_loss, algorithm="d_rtrl", batch_size=BATCH
    )
    _, res = jax.jit(learner.step)(learner.params, learner.init(), xs[0], jnp.zeros(BATCH, jnp.int32))
    assert np.isfinite(res.loss)


@pytest.mark.parametrize(
    "loss, message",
    [
        (lambda o, y: (o - y) ** 2, rf"returns a \({BATCH}, {N_OUT}\) float64 array, not a scalar"),
        (lambda o, y: (jnp.sum(o), 1.0), "returns a tuple"),
        (lambda o, y: jnp.sum(o > 0), "int64"),
    ],
)
@pytest.mark.parametrize("with_target", [True, False])
def test_compile_refuses_a_loss_that_is_not_a_float_scalar(loss, message, with_target):
    xs, ys = _data(BATCH)
    target = {"example_target": ys[0]} if with_target else {}
    with pytest.raises(CompileError, match=message) as caught:
        fusetrace.compile(
            _build("cuba", "leaky", BATCH), xs[0], loss=loss, algorithm="d_rtrl", batch_size=BATCH, **target
        )
    assert _four_parts(str(caught.value)) and "fusetrace.compile" in str(caught.value)


def test_a_non_scalar_loss_unseen_at_compile_time_is_refused_at_the_step():
    """A loss the default example target cannot call (it wants a dict) is checked when it first runs."""
    xs, ys = _data(BATCH)

    def loss(output, target):
        return target["weight"] * (output - target["y"]) ** 2

    learner = fusetrace.compile(_build("cuba", "leaky", BATCH), xs[0], loss=loss, algorithm="d_rtrl", batch_size=BATCH)
    with pytest.raises(CompileError, match="not a scalar"):
        learner.step(learner.params, learner.init(), xs[0], {"y": ys[0], "weight": 1.0})


@dataclasses.dataclass(frozen=True)
class _Batch:
    inputs: jax.Array
    targets: jax.Array


def test_trainer_checks_the_batches_of_its_sampler(learner):
    xs, ys = _data(BATCH)
    good = _Batch(xs, ys)
    for batch, got in (
        (_Batch(xs[:, :, :2], ys), f"({STEPS}, {BATCH}, 2)"),
        (_Batch(xs, ys[..., :1]), f"({STEPS}, {BATCH}, 1)"),
        (_Batch(xs, ys[:5]), "5 steps"),
    ):
        trainer = Trainer(learner, lambda seed, batch=batch: batch, optax.sgd(0.1))
        with pytest.raises(InputError, match=r"iteration 1") as caught:
            trainer.iteration(trainer.init())
        assert got in str(caught.value) and _four_parts(str(caught.value))
        with pytest.raises(InputError):
            trainer.evaluate(learner.params, [batch])
    trainer = Trainer(learner, lambda seed: good, optax.sgd(0.1))
    trainer.iteration(trainer.init())
