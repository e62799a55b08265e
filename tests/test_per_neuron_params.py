"""Per-neuron and scalar trainable parameters added element-wise get an exact O(N) trace.

A LIF layer (dense input through an Expon synapse) whose membrane input is `gain · clip(I_syn) + bias`:
`bias` one value per neuron, `gain` a single scalar, both `ParamState`s. `clip` is either a plain
`jnp.clip` or a user `jax.custom_vjp` straight-through clip (forward mode cannot cross it, so the
derivatives are taken by reverse mode). Single layer, no recurrent weight: `d_rtrl` must equal BPTT
(float64); every parameter's trace is per neuron (no presynaptic axis)."""

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusetrace
from test_compile_exact import RTOL_EXACT, _data, _loss, assert_matches, bptt_grads, online_grads

N_IN, N, N_OUT = 3, 5, 2


@jax.custom_vjp
def straight_through_clip(x):
    return jnp.clip(x, -2.0, 2.0)


straight_through_clip.defvjp(lambda x: (straight_through_clip(x), None), lambda _, g: (g,))


class GainBiasLayer(brainstate.nn.Module):
    def __init__(self, custom: bool):
        super().__init__()
        self.clip = straight_through_clip if custom else (lambda x: jnp.clip(x, -2.0, 2.0))
        self.neuron = bps.LIF(
            N, V_th=1.0 * u.mV, tau=5.0 * u.ms, V_initializer=braintools.init.Normal(0.5 * u.mV, 0.3 * u.mV)
        )
        self.syn = bps.Expon(N, tau=3.0 * u.ms, g_initializer=braintools.init.Constant(0.0))
        self.fc = brainstate.nn.Linear(N_IN, N, w_init=braintools.init.KaimingNormal(scale=3.0), b_init=None)
        self.bias = brainstate.ParamState(jnp.linspace(-0.2, 0.3, N))
        self.gain = brainstate.ParamState(jnp.asarray(1.3))
        self.out = brainstate.nn.Linear(N, N_OUT)

    def update(self, x):
        current = self.syn(self.fc(x))
        drive = self.gain.value * self.clip(current) + self.bias.value
        return self.out(self.neuron(drive * u.mA))


def _build(custom, batch):
    brainstate.random.seed(0)
    model = GainBiasLayer(custom)
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("custom", [False, True])
def test_parameters_are_traced_per_neuron_and_exact(custom, batch):
    xs, ys = _data(batch)
    learner = fusetrace.compile(_build(custom, batch), xs[0], loss=_loss, algorithm="d_rtrl", batch_size=batch)
    reports = {r.path: r for r in learner.report()}
    neurons = (N,) if batch is None else (batch, N)
    for path in ("bias", "gain"):
        assert reports[path].treatment == "trace" and reports[path].exact, reports[path].line()
        assert reports[path].trace_shapes == (neurons, neurons)  # per neuron, one array per state (V, g): O(N)
    online = online_grads(_build(custom, batch), xs, ys, "d_rtrl", batch)
    assert_matches(online, bptt_grads(_build(custom, batch), xs, ys), RTOL_EXACT)


@pytest.mark.parametrize("algorithm", ["es_d_rtrl", "e_prop"])
def test_parameters_keep_their_exact_trace_under_every_algorithm(algorithm):
    """Their trace is already O(N): es_d_rtrl does not factorise it, and e_prop equals d_rtrl here."""
    xs, ys = _data(2)
    online = online_grads(_build(True, 2), xs, ys, algorithm, 2)
    reference = bptt_grads(_build(True, 2), xs, ys)
    assert_matches({p: online[p] for p in ("bias", "gain")}, {p: reference[p] for p in ("bias", "gain")}, RTOL_EXACT)
    assert np.linalg.norm(np.asarray(online["bias"])) > 0
