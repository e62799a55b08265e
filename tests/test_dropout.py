"""Random numbers inside `update`: a `brainstate.nn.Dropout` before the readout.

The global random key is a state of the compiled step (`state["model"]["<random>"]`, from the key at
compile time), so the online step draws the same masks as the plain model run from that key: d_rtrl is
exact against BPTT through brainstate, batched and not, and BPTT from another key is not (the masks
matter). Also: `summary()` sizes the key (it crashed on the key's extended dtype)."""

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusetrace
from references import state_grad

RTOL_EXACT = 1e-6  # the exact-regime acceptance bound (float64)
T, N_IN, N, N_OUT = 12, 5, 8, 3


class DropoutNet(brainstate.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = brainstate.nn.Linear(N_IN, N, w_init=lambda shape: 3.0 + 2.0 * jnp.eye(*shape))
        self.pop = bps.LIF(N, tau=10 * u.ms, V_th=1 * u.mV, V_reset=0 * u.mV, V_rest=0 * u.mV,
                           spk_fun=braintools.surrogate.ReluGrad())  # fmt: skip
        self.drop = brainstate.nn.Dropout(0.7)
        self.out = brainstate.nn.Linear(N, N_OUT)

    def update(self, x):
        self.pop(self.inp(x) * u.mA)
        with brainstate.environ.context(fit=True):  # Dropout acts only while fitting
            return self.out(self.drop(self.pop.get_spike()))


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _loss(y, target):
    return jnp.sum((y - target) ** 2)


def _bptt(net, key, xs, ys, batch) -> dict:
    brainstate.nn.init_all_states(net, batch_size=batch)
    brainstate.random.DEFAULT.value = key
    weights = net.states(brainstate.ParamState)

    def summed():
        return jnp.sum(brainstate.transform.for_loop(lambda x, y: _loss(net.update(x), y), xs, ys))

    grads = state_grad(summed, weights)
    return {".".join(map(str, path)): leaves for path, leaves in grads.items()}


def _error(got: dict, want: dict) -> float:
    return max(
        float(np.linalg.norm(got[path][leaf] - value) / np.linalg.norm(value))
        for path, leaves in want.items()
        for leaf, value in leaves.items()
    )


@pytest.mark.parametrize("batch", [None, 2])
def test_dropout_inside_update_is_exact_from_the_learners_key(batch):
    brainstate.random.seed(3)
    net = DropoutNet()
    brainstate.nn.init_all_states(net, batch_size=batch)
    lead = (T,) if batch is None else (T, batch)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.random((*lead, N_IN)) < 0.5, float)
    ys = jnp.asarray(rng.standard_normal((*lead, N_OUT)))
    spikes = 0.0
    for x in xs:  # the layer must fire for the masks to matter
        net.pop(net.inp(x) * u.mA)
        spikes += float(jnp.mean(net.pop.get_spike()))
    assert 0.1 < spikes / T < 0.9
    brainstate.nn.init_all_states(net, batch_size=batch)
    learner = fusetrace.compile(net, xs[0], loss=_loss, algorithm="d_rtrl", batch_size=batch, example_target=ys[0])
    assert "state['model']['<random>']" in learner.summary()  # says where the key is; sizes it without raising
    assert all(r.exact for r in learner.report())

    state = learner.init()
    key = state["model"]["<random>"]
    step, total = jax.jit(learner.step), None
    for t in range(T):
        state, res = step(learner.params, state, xs[t], ys[t])
        total = res.grads if total is None else jax.tree.map(jnp.add, total, res.grads)

    assert _error(total, _bptt(net, key, xs, ys, batch)) <= RTOL_EXACT
    other = jax.random.split(key)[0]
    assert _error(total, _bptt(net, other, xs, ys, batch)) > 1e-3  # other masks, another gradient
