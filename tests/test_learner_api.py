"""The Learner contract: purity under jit/vmap/scan, one trace per input structure, state layout,
the decorator, and the O(N) promise of es_d_rtrl's state (tier 3/4)."""

import brainstate
import brainunit as u
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusetrace
from test_compile_exact import BATCH, N_IN, Layer, N, _build, _data, _loss

RTOL_F64 = 1e-12  # same program evaluated two ways, float64


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _allclose(a, b):
    for x, y in zip(
        jax.tree.leaves(a, is_leaf=u.math.is_quantity), jax.tree.leaves(b, is_leaf=u.math.is_quantity), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(u.get_mantissa(x)), np.asarray(u.get_mantissa(y)), rtol=RTOL_F64, atol=1e-14
        )


def test_jit_equals_eager_and_traces_once():
    model = _build("cuba", "leaky", BATCH)
    xs, ys = _data(BATCH)
    learner = fusetrace.compile(model, xs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH)
    counted = eqx.debug.assert_max_traces(learner.step, max_traces=1)
    jitted = jax.jit(counted)
    state_eager = state_jit = learner.init()
    for x, y in zip(xs, ys, strict=True):
        state_eager, res_eager = learner.step(learner.params, state_eager, x, y)
        state_jit, res_jit = jitted(learner.params, state_jit, x, y)
        _allclose(res_eager.grads, res_jit.grads)
        _allclose(state_eager, state_jit)


def test_step_never_writes_the_model_states():
    model = _build("cuba", "leaky", BATCH)
    xs, ys = _data(BATCH)
    learner = fusetrace.compile(model, xs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH)
    before = {k: s.value for k, s in model.states().items()}
    state = learner.init()
    for x, y in zip(xs, ys, strict=True):
        state, _ = jax.jit(learner.step)(learner.params, state, x, y)
    for key, st in model.states().items():
        _allclose(st.value, before[key])


def test_forward_output_equals_the_model_simulation():
    xs, ys = _data(BATCH)
    learner = fusetrace.compile(
        _build("alif", "leaky", BATCH), xs[0], loss=_loss, algorithm="es_d_rtrl", batch_size=BATCH
    )
    twin = _build("alif", "leaky", BATCH)
    state = learner.init()
    for x, y in zip(xs, ys, strict=True):
        state, res = learner.step(learner.params, state, x, y)
        np.testing.assert_allclose(np.asarray(res.output), np.asarray(twin.update(x)), rtol=RTOL_F64)


def test_scan_and_vmap_equal_a_python_loop():
    xs, ys = _data(BATCH)
    learner = fusetrace.compile(
        _build("cuba", "linear", BATCH), xs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH
    )
    params = learner.params

    def run(xs, ys):
        def body(state, inputs):
            state, res = learner.step(params, state, *inputs)
            return state, res.grads

        _, grads = jax.lax.scan(body, learner.init(), (xs, ys))
        return jax.tree.map(lambda g: g.sum(0), grads, is_leaf=u.math.is_quantity)

    scanned = jax.jit(run)(xs, ys)
    state, total = learner.init(), None
    for x, y in zip(xs, ys, strict=True):
        state, res = learner.step(params, state, x, y)
        total = res.grads if total is None else jax.tree.map(jnp.add, total, res.grads)
    _allclose(scanned, total)
    # vmap over several sequences equals running them one by one
    many_x = jnp.stack([xs, xs[::-1]])
    many_y = jnp.stack([ys, -ys])
    batched = jax.vmap(run)(many_x, many_y)
    for index in range(2):
        one = jax.tree.map(lambda g, i=index: g[i], batched, is_leaf=u.math.is_quantity)
        _allclose(one, run(many_x[index], many_y[index]))


def test_params_grads_and_init_mirror_the_model():
    model = _build("cuba", "linear", BATCH)
    expected_params = {".".join(k): s.value for k, s in model.states(brainstate.ParamState).items()}
    expected_hidden = {".".join(k): s.value for k, s in model.states(brainstate.HiddenState).items()}
    xs, ys = _data(BATCH)
    learner = fusetrace.compile(model, xs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH)
    assert set(learner.params) == set(expected_params)
    assert jax.tree.structure(learner.params, is_leaf=u.math.is_quantity) == jax.tree.structure(
        expected_params, is_leaf=u.math.is_quantity
    )
    state = learner.init()
    for path, value in expected_hidden.items():
        _allclose(state["model"][path], value)
    _, res = learner.step(learner.params, state, xs[0], ys[0])
    for path, value in expected_params.items():
        for g, p in zip(
            jax.tree.leaves(res.grads[path], is_leaf=u.math.is_quantity),
            jax.tree.leaves(value, is_leaf=u.math.is_quantity),
            strict=True,
        ):
            assert np.shape(g) == np.shape(p) and u.get_unit(g) == u.get_unit(p)
            assert jnp.asarray(u.get_mantissa(g)).dtype == jnp.asarray(u.get_mantissa(p)).dtype


def test_es_d_rtrl_state_holds_no_pre_by_post_array():
    xs, _ = _data(BATCH)
    learner = fusetrace.compile(
        _build("cuba", "leaky", BATCH), xs[0], loss=_loss, algorithm="es_d_rtrl", batch_size=BATCH
    )
    for leaf in jax.tree.leaves(learner.init()["traces"]):
        assert not (N_IN in leaf.shape and N in leaf.shape), f"trace of shape {leaf.shape} is n_pre x n_post"
    d_rtrl = fusetrace.compile(_build("cuba", "leaky", BATCH), xs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH)
    assert any(N_IN in leaf.shape and N in leaf.shape for leaf in jax.tree.leaves(d_rtrl.init()["traces"]))


def test_fused_jaxpr_is_one_program_with_the_dynamics_inside():
    xs, _ = _data(BATCH)
    learner = fusetrace.compile(_build("cuba", "leaky", BATCH), xs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH)
    closed = learner.fused_jaxpr
    names = {eqn.primitive.name for eqn in closed.jaxpr.eqns}
    assert "heaviside_surrogate_gradient" in names  # the dynamics
    assert "dot_general" in names  # trace contraction and synaptic input


def test_online_decorator_keeps_simulation_and_builds_the_same_learner():
    Decorated = fusetrace.online(algorithm="d_rtrl", loss=_loss)(type("Decorated", (Layer,), {}))
    brainstate.random.seed(0)
    model = Decorated("cuba", "leaky")
    brainstate.nn.init_all_states(model, batch_size=BATCH)
    twin = _build("cuba", "leaky", BATCH)
    xs, _ys = _data(BATCH)
    np.testing.assert_allclose(np.asarray(model.update(xs[0])), np.asarray(twin.update(xs[0])))
    brainstate.random.seed(0)
    model = Decorated("cuba", "leaky")
    learner = model.learner(xs[0], batch_size=BATCH)
    assert isinstance(learner, fusetrace.Learner) and learner.algorithm == "d_rtrl"
    with pytest.raises(fusetrace.errors.CompileError):
        fusetrace.online(loss=_loss)(object)


def test_bad_options_fail_clearly():
    xs, _ = _data(BATCH)
    model = _build("cuba", "leaky", BATCH)
    with pytest.raises(fusetrace.errors.CompileError, match="unknown algorithm"):
        fusetrace.compile(model, xs[0], loss=_loss, algorithm="bptt", batch_size=BATCH)
    with pytest.raises(fusetrace.errors.CompileError, match="decay"):
        fusetrace.compile(model, xs[0], loss=_loss, algorithm="es_d_rtrl", decay=1.5, batch_size=BATCH)
    with pytest.raises(fusetrace.errors.CompileError, match="kappa"):
        fusetrace.compile(model, xs[0], loss=_loss, algorithm="d_rtrl", kappa=0.5, batch_size=BATCH)
    for option in ("credit_depth", "loop_hops", "own_loop_hops"):
        for bad in (-1, 1.5, True):
            with pytest.raises(fusetrace.errors.CompileError, match=option):
                fusetrace.compile(model, xs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH, **{option: bad})


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl", "e_prop"])
def test_gradient_false_between_read_outs_changes_nothing(algorithm):
    """A loss read only at some steps: stepping with `gradient=False` elsewhere gives the same states,
    traces, losses and summed gradient as forming the (zero) gradient at every step."""
    xs, ys = _data(BATCH)
    read = np.zeros(len(xs), bool)
    read[[3, 6, len(xs) - 1]] = True

    def loss(output, target):
        y, mask = target
        return mask * _loss(output, y)

    learner = fusetrace.compile(
        _build("alif", "leaky", BATCH),
        xs[0],
        loss=loss,
        algorithm=algorithm,
        batch_size=BATCH,
        example_target=(ys[0], 1.0),
    )
    every = jax.jit(learner.step)
    sparse = jax.jit(learner.step, static_argnames="gradient")
    state_a = state_b = learner.init()
    total_a = total_b = None
    for x, y, r in zip(xs, ys, read, strict=True):
        target = (y, jnp.float64(r))
        state_a, res_a = every(learner.params, state_a, x, target)
        state_b, res_b = sparse(learner.params, state_b, x, target, gradient=bool(r))
        assert (res_b.grads is None) != bool(r)
        np.testing.assert_allclose(res_a.loss, res_b.loss, rtol=RTOL_F64)
        _allclose(state_a, state_b)
        total_a = res_a.grads if total_a is None else jax.tree.map(jnp.add, total_a, res_a.grads)
        if res_b.grads is not None:
            total_b = res_b.grads if total_b is None else jax.tree.map(jnp.add, total_b, res_b.grads)
    assert all(np.linalg.norm(np.asarray(u.get_mantissa(g))) > 0 for g in jax.tree.leaves(total_a))
    _allclose(total_a, total_b)
