"""Tier 3: hypothesis properties of compiled learners over sizes, seeds, time constants and batch."""

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusetrace
from test_compile_exact import assert_matches, bptt_grads

RTOL_EXACT = 1e-6  # the exact-regime acceptance bound (float64)
RTOL_F64 = 1e-12  # same program two ways
STEPS = 6
SETTINGS = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FeedForward(brainstate.nn.Module):
    def __init__(self, n_in, n, n_out, tau, readout):
        super().__init__()
        self.neuron = bps.LIF(
            n,
            V_th=1.0 * u.mV,
            tau=tau * u.ms,
            R=1.0 * u.ohm,
            V_reset=0.0 * u.mV,
            V_rest=0.0 * u.mV,
            V_initializer=braintools.init.Uniform(0.0 * u.mV, 1.0 * u.mV),
        )
        self.proj = bps.AlignPostProj(
            comm=brainstate.nn.Linear(n_in, n, b_init=None, w_init=braintools.init.KaimingNormal(scale=4.0, unit=u.mA)),
            syn=bps.Expon.desc(n, tau=tau / 2 * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA)),
            out=bps.CUBA.desc(scale=1.0),
            post=self.neuron,
        )
        self.out = (
            bps.LeakyRateReadout(n, n_out, tau=tau * u.ms) if readout == "leaky" else brainstate.nn.Linear(n, n_out)
        )

    def update(self, x):
        self.proj(x)
        return self.out(self.neuron(0.0 * u.mA))


cases = st.fixed_dictionaries(
    {
        "n_in": st.integers(1, 4),
        "n": st.integers(1, 6),
        "n_out": st.integers(1, 3),
        "tau": st.floats(2.0, 20.0),
        "batch": st.sampled_from([None, 1, 3]),
        "seed": st.integers(0, 2**16),
        "readout": st.sampled_from(["leaky", "linear"]),
    }
)


def _build(case):
    brainstate.environ.set(dt=1.0 * u.ms)
    brainstate.random.seed(case["seed"])
    model = FeedForward(case["n_in"], case["n"], case["n_out"], case["tau"], case["readout"])
    brainstate.nn.init_all_states(model, batch_size=case["batch"])
    return model


def _data(case):
    batch = () if case["batch"] is None else (case["batch"],)
    key = jax.random.PRNGKey(case["seed"])
    xs = (jax.random.uniform(key, (STEPS, *batch, case["n_in"])) < 0.7).astype(jnp.float64)
    ys = jax.random.normal(jax.random.fold_in(key, 1), (STEPS, *batch, case["n_out"]))
    return xs, ys


def _loss(output, target):
    return jnp.sum((output - target) ** 2)


def _run(learner, xs, ys, step):
    state, total = learner.init(), None
    for x, y in zip(xs, ys, strict=True):
        state, res = step(learner.params, state, x, y)
        total = res.grads if total is None else jax.tree.map(jnp.add, total, res.grads)
    return state, total


@SETTINGS
@given(cases)
def test_d_rtrl_matches_bptt_in_the_exact_regime(case):
    xs, ys = _data(case)
    learner = fusetrace.compile(_build(case), xs[0], loss=_loss, algorithm="d_rtrl", batch_size=case["batch"])
    _, online = _run(learner, xs, ys, jax.jit(learner.step))
    reference = bptt_grads(_build(case), xs, ys)
    nonzero = {
        k: v
        for k, v in reference.items()
        if all(
            np.linalg.norm(np.asarray(u.get_mantissa(x))) > 0 for x in jax.tree.leaves(v, is_leaf=u.math.is_quantity)
        )
    }
    assert_matches({k: online[k] for k in nonzero}, nonzero, RTOL_EXACT)


@SETTINGS
@given(cases, st.sampled_from(["d_rtrl", "es_d_rtrl", "e_prop"]))
def test_jit_equals_eager_and_es_state_is_linear_in_neurons(case, algorithm):
    xs, ys = _data(case)
    xs, ys = xs[:2], ys[:2]  # eager evaluation is slow; two steps exercise the trace recursion
    learner = fusetrace.compile(_build(case), xs[0], loss=_loss, algorithm=algorithm, batch_size=case["batch"])
    state_eager, eager = _run(learner, xs, ys, learner.step)
    state_jit, jitted = _run(learner, xs, ys, jax.jit(learner.step))
    for a, b in zip(
        jax.tree.leaves((state_eager, eager), is_leaf=u.math.is_quantity),
        jax.tree.leaves((state_jit, jitted), is_leaf=u.math.is_quantity),
        strict=True,
    ):
        np.testing.assert_allclose(
            np.asarray(u.get_mantissa(a)), np.asarray(u.get_mantissa(b)), rtol=RTOL_F64, atol=1e-13
        )
    if algorithm == "es_d_rtrl":
        # O(B·(I + N·S)) for the hidden relation: input -> {V, g} (S = 2), never n_in × n; plus the leaky
        # readout's own relation, whose group is small and LTI (n_out <= 3 neuron states): its exact
        # per-weight trace n × n_out (`Relation.small_lti`), and its cross-group credit (n)
        batch, n_in, n, n_out = case["batch"] or 1, case["n_in"], case["n"], case["n_out"]
        bound = batch * (n_in + 2 * n) + (batch * n * n_out + batch * n if case["readout"] == "leaky" else 0)
        assert sum(leaf.size for leaf in jax.tree.leaves(learner.init()["traces"])) == bound
