"""e_prop's options, each against an independent reference (float64, feed-forward layer where e_prop
is exact):

* `feedback="random"`: equals BPTT of a twin model whose readout sends the learning signal back through
  the same fixed matrix B (`y = sg(u) W + u B - sg(u) B`: forward unchanged, ∂y/∂u = B);
* `kappa`: the gradient uses the low-pass filtered trace `ε̄_t = κ ε̄_{t-1} + ε_t`; with the loss taken
  at one step T only, `Σ_t g_t = Σ_k κ^k δ_T·ε_{T-k}` — checked against BPTT gradients of the
  one-step-loss problems `L_T` evaluated on truncated histories.
"""

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusetrace
import references as ref
from test_compile_exact import RTOL_EXACT, _flat, assert_matches, bptt_grads

N_IN, N, N_OUT, BATCH, STEPS = 3, 5, 2, 2, 8


class FeedbackLinear(brainstate.nn.Linear):
    """A Linear readout whose backward pass to its input goes through a fixed matrix `feedback`."""

    feedback = None

    def update(self, x):
        params = self.weight.value
        weight = params["weight"]
        b = self.feedback
        return jax.lax.stop_gradient(x) @ weight + (x @ b - jax.lax.stop_gradient(x) @ b) + params["bias"]


class FeedbackLeaky(bps.LeakyRateReadout):
    feedback = None

    def update(self, x):
        w, b = self.weight.value, self.feedback
        self.r.value = self.decay * self.r.value + (jax.lax.stop_gradient(x) @ w + x @ b - jax.lax.stop_gradient(x) @ b)
        return self.r.value


class Layer(brainstate.nn.Module):
    def __init__(self, readout, twin=False):
        super().__init__()
        self.neuron = bps.LIF(
            N, V_th=1.0 * u.mV, tau=5.0 * u.ms, V_initializer=braintools.init.Normal(0.5 * u.mV, 0.3 * u.mV)
        )
        self.proj = bps.AlignPostProj(
            comm=brainstate.nn.Linear(N_IN, N, w_init=braintools.init.KaimingNormal(scale=3.0, unit=u.mA), b_init=None),
            syn=bps.Expon.desc(N, tau=3.0 * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA)),
            out=bps.CUBA.desc(scale=1.0),
            post=self.neuron,
        )
        if readout == "leaky":
            self.out = (FeedbackLeaky if twin else bps.LeakyRateReadout)(N, N_OUT, tau=4.0 * u.ms)
        else:
            self.out = (FeedbackLinear if twin else brainstate.nn.Linear)(N, N_OUT)

    def update(self, x):
        self.proj(x)
        return self.out(self.neuron(0.0 * u.mA))


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _build(readout, twin=False):
    brainstate.random.seed(0)
    model = Layer(readout, twin)
    brainstate.nn.init_all_states(model, batch_size=BATCH)
    return model


def _data():
    xs = (jax.random.uniform(jax.random.PRNGKey(1), (STEPS, BATCH, N_IN)) < 0.6).astype(jnp.float64)
    ys = jax.random.normal(jax.random.PRNGKey(2), (STEPS, BATCH, N_OUT))
    return xs, ys


def _loss(output, target):
    return jnp.sum((output - target) ** 2)


def _online(learner, xs, ys):
    state, total = learner.init(), None
    step = jax.jit(learner.step)
    for x, y in zip(xs, ys, strict=True):
        state, res = step(learner.params, state, x, y)
        total = res.grads if total is None else jax.tree.map(jnp.add, total, res.grads)
    return total


@pytest.mark.parametrize("readout", ["linear", "leaky"])
def test_random_feedback_equals_bptt_of_the_feedback_twin(readout):
    xs, ys = _data()
    learner = fusetrace.compile(
        _build(readout), xs[0], loss=_loss, algorithm="e_prop", batch_size=BATCH, feedback="random", feedback_seed=3
    )
    (matrix,) = learner.plan.feedback.values()  # the fixed B the learner drew (a parameter of the method)
    twin = _build(readout, twin=True)
    twin.out.feedback = matrix
    online, reference = _online(learner, xs, ys), bptt_grads(twin, xs, ys)
    assert_matches(online, reference, RTOL_EXACT)
    symmetric = _online(
        fusetrace.compile(_build(readout), xs[0], loss=_loss, algorithm="e_prop", batch_size=BATCH), xs, ys
    )
    hidden = "proj.comm.weight"
    assert not np.allclose(_flat(online[hidden])[0], _flat(symmetric[hidden])[0])


def test_kappa_filters_the_trace():
    """Loss at the last step T only: e_prop with κ must return Σ_k κ^k δ_T·ε_{T-k}, with ε_s = ∂h_s/∂W
    (jacfwd of the rollout; exact for a feed-forward layer) and δ_T = ∂L_T/∂h_T (the readout's
    gradient w.r.t. the hidden states it reads), both computed here through brainstate."""
    kappa, last = 0.6, STEPS - 1
    xs, ys = _data()
    xs, ys = xs[:, 0], ys[:, 0]  # unbatched

    def build():
        model = ref.build_recurrent_lif(N_IN, N, N_OUT, readout="linear", recurrent=False, seed=0)
        return model

    targets = [(ys[t], jnp.asarray(t)) for t in range(STEPS)]

    def loss_at_last(output, target):
        return jnp.where(target[1] == last, _loss(output, target[0]), 0.0)

    learner = fusetrace.compile(
        build(), xs[0], loss=loss_at_last, algorithm="e_prop", example_target=targets[0], kappa=kappa
    )
    state, total = learner.init(), None
    for x, target in zip(xs, targets, strict=True):
        state, res = learner.step(learner.params, state, x, target)
        total = res.grads if total is None else jax.tree.map(jnp.add, total, res.grads)

    model = build()
    step_fn, params, hidden, others = ref.functional_step(model, xs[0])
    path = ref.path_of(model, model.inp.comm.weight)

    def sensitivity(s):  # ε_s = ∂h_s/∂W for each hidden state: hidden shape + W shape
        def rollout(w):
            p = {**params, path: {"weight": w}}
            h, o = hidden, others
            for t in range(s + 1):
                _, h, o = step_fn(p, h, o, xs[t])
            return h

        return jax.jacfwd(rollout)(params[path]["weight"])

    h, o = hidden, others
    for t in range(last + 1):
        _, h, o = step_fn(params, h, o, xs[t])
    readout = brainstate.transform.StatefulFunction(model.output, return_only_write=False)
    readout.make_jaxpr()
    read_states = readout.get_states()
    names = [ref.path_of(model, st) for st in read_states]

    def readout_loss(h_new):
        values = [
            h_new[n] * st.value.unit if n in h_new and u.math.is_quantity(st.value) else (h_new.get(n, st.value))
            for n, st in zip(names, read_states, strict=True)
        ]
        return _loss(u.get_mantissa(readout.jaxpr_call(values)[1]), ys[last])

    delta = jax.grad(readout_loss)(h)
    expected = 0.0
    for k in range(STEPS):
        eps = sensitivity(last - k)
        expected = expected + kappa**k * sum(jnp.tensordot(delta[n], eps[n], axes=delta[n].ndim) for n in delta)
    got = _flat(total[path])[0]
    np.testing.assert_allclose(got, np.asarray(expected), rtol=RTOL_EXACT, atol=1e-12)
