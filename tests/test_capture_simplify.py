"""Capture (roles, paths, units, batch axis, the global random state) and the simplify pass."""

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusetrace
from fusetrace._compat import jit_p
from fusetrace.capture import capture
from fusetrace.errors import CaptureError
from fusetrace.passes.simplify import simplify

RTOL_F64 = 1e-12  # the same computation, re-traced


class NoisyNet(brainstate.nn.Module):
    """Draws its input spikes from brainstate's global RandomState inside `update`."""

    def __init__(self, n_in=3, n=4, n_out=2):
        super().__init__()
        self.n_in = n_in
        self.N = bps.LIF(n, V_th=1.0 * u.mV, tau=5.0 * u.ms)
        self.inp = bps.AlignPostProj(
            comm=brainstate.nn.Linear(
                n_in,
                n,
                w_init=braintools.init.KaimingNormal(scale=3.0, unit=u.mA),
                b_init=braintools.init.Constant(0.1 * u.mA),
            ),
            syn=bps.Expon.desc(n, tau=3.0 * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA)),
            out=bps.CUBA.desc(scale=1.0),
            post=self.N,
        )
        self.out = bps.LeakyRateReadout(n, n_out, tau=4.0 * u.ms)

    def update(self, rate, bias=0.0 * u.mA):
        x = (brainstate.random.rand(self.n_in) < rate).astype(float)
        self.inp(x)
        return self.out(self.N(bias))


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _net(batch=None):
    brainstate.random.seed(0)
    net = NoisyNet()
    brainstate.nn.init_all_states(net, batch_size=batch)
    return net


def test_roles_paths_units_and_the_random_state():
    net = _net()
    captured = capture(net, 0.5, 0.1 * u.mA)
    by_path = {leaf.path: leaf for leaf in captured.leaves}
    assert by_path["N.V"].role == "hidden" and by_path["N.V"].unit == u.mV
    assert by_path["inp.comm.weight.weight"].role == "weight" and by_path["inp.comm.weight.weight"].unit == u.mA
    assert by_path["inp.comm.weight.bias"].state_path == "inp.comm.weight"
    assert by_path["out.weight"].key == ()
    assert by_path["<random>"].role == "random"  # the global RandomState, not in model.states()
    assert captured.in_units[1] == u.mA
    assert all(leaf.batch_axis is None for leaf in captured.leaves)


def test_batch_axis_marks_batched_states_only():
    captured = capture(_net(3), 0.5, batch_size=3)
    for leaf in captured.leaves:
        assert leaf.batch_axis == (0 if leaf.role == "hidden" else None), leaf.path


def test_units_are_restored_on_the_way_out():
    net = _net()
    learner = fusetrace.compile(net, 0.5, loss=lambda o, t: jnp.sum((o - t) ** 2), algorithm="d_rtrl")
    state, res = learner.step(learner.params, learner.init(), 0.5, jnp.zeros(2))
    assert u.get_unit(state["model"]["N.V"]) == u.mV
    assert u.get_unit(res.grads["inp.comm.weight"]["weight"]) == u.mA
    assert not u.math.is_quantity(res.output)  # the readout is unitless


def test_random_state_advances_through_the_learner():
    learner = fusetrace.compile(_net(), 0.5, loss=lambda o, t: jnp.sum((o - t) ** 2), algorithm="es_d_rtrl")
    state = learner.init()
    new, _ = jax.jit(learner.step)(learner.params, state, 0.5, jnp.zeros(2))
    old_key = jax.random.key_data(state["model"]["<random>"])
    new_key = jax.random.key_data(new["model"]["<random>"])
    assert not np.array_equal(np.asarray(old_key), np.asarray(new_key))


def test_simplify_inlines_folds_and_keeps_values():
    net = _net(2)
    captured = capture(net, 0.5, batch_size=2)
    simple = simplify(captured)

    def count(jaxpr, predicate):
        return sum(predicate(e) for e in jaxpr.eqns)

    assert count(captured.jaxpr.jaxpr, lambda e: e.primitive is jit_p) > 0  # brainpy's helper jits
    assert count(simple.jaxpr.jaxpr, lambda e: e.primitive is jit_p) == 0
    one = lambda e: (
        e.primitive.name == "mul"
        and any(getattr(a, "val", None) is not None and np.ndim(a.val) == 0 and a.val == 1.0 for a in e.invars)
    )
    assert count(simple.jaxpr.jaxpr, one) == 0  # unit residue x * 1.0 is gone
    assert len(simple.jaxpr.jaxpr.eqns) < len(captured.jaxpr.jaxpr.eqns)
    inputs = captured.strip_inputs(0.5)
    for a, b in zip(
        jax.tree.leaves(captured.step(inputs, captured.leaf_values())),
        jax.tree.leaves(simple.step(inputs, simple.leaf_values())),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a),
            np.asarray(jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key) else b),
            rtol=RTOL_F64,
        )


def test_vmap_traced_bodies_are_deduplicated():
    """brainstate.transform.vmap traces its body three times; CSE + DCE leave one copy."""
    brainstate.random.seed(0)

    class Vmapped(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = brainstate.ParamState(jnp.ones((3, 4)))
            self.h = brainstate.HiddenState(jnp.zeros((2, 4)))

        def update(self, x):
            self.h.value = 0.9 * self.h.value + jax.vmap(lambda xi: jnp.tanh(xi @ self.w.value))(x)
            return self.h.value

    model = Vmapped()
    simple = simplify(capture(model, jnp.ones((2, 3))))
    assert sum(e.primitive.name == "tanh" for e in simple.jaxpr.jaxpr.eqns) == 1


def test_capture_rejects_non_modules_and_bad_inputs():
    with pytest.raises(CaptureError, match=r"brainstate\.nn\.Module"):
        capture(lambda x: x, 1.0)
    with pytest.raises(CaptureError, match="tracing one step"):
        capture(_net(), jnp.ones((5, 7, 9)), "not a number")
