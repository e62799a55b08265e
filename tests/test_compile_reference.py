"""Tier 2: the approximations are implemented exactly as specified (float64, one-step windows).

On tiny RECURRENT networks the per-neuron algorithms are approximations of BPTT; each is checked
against an independent brute-force reference of its own definition (tests/references.py, which does
not import fusetrace):

* d_rtrl == dense RTRL (jacfwd of the whole step) with the hidden Jacobian masked to per-neuron blocks
  of the spiking group and the weight paths cut (the recurrent spikes detached, as `D_t` is defined in
  DESIGN.md §2), the leaky readout's rows kept whole — to 1e-8;
* e_prop == BPTT of the graph whose recurrent spike gradients are stopped — to 1e-6;
* es_d_rtrl == its naive dense formulas (outer products per step) — to 1e-8.
"""

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusetrace
import references as ref
from fusetrace.passes import derive, factorised
from test_compile_exact import assert_matches, online_grads

RTOL_RTRL = 1e-8  # acceptance bound for d_rtrl vs brute-force RTRL (float64; observed ~1e-14)
RTOL_EPROP = 1e-6  # acceptance bound for e_prop vs stop-gradient BPTT
RTOL_ES = 1e-8  # acceptance bound for es_d_rtrl vs its naive formulas
N_IN, N_REC, N_OUT, STEPS = 3, 4, 2, 8


def _loss(output, target):
    return jnp.sum((output - target) ** 2)


def _data(batch, seed=1):
    rng = np.random.default_rng(seed)
    shape = (STEPS, batch, N_IN) if batch else (STEPS, N_IN)
    xs = jnp.asarray((rng.random(shape) < 0.6).astype(np.float64))
    ys = jnp.asarray(rng.normal(size=(*shape[:-1], N_OUT)))
    return xs, ys


def _model(batch, readout, **kw):
    brainstate.environ.set(dt=1.0 * u.ms)
    return ref.build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=batch, readout=readout, seed=0, **kw)


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("readout", ["leaky", "linear"])
def test_d_rtrl_equals_masked_brute_force_rtrl(readout, batch):
    xs, ys = _data(batch)
    online = online_grads(_model(batch, readout), xs, ys, "d_rtrl", batch)
    model = _model(batch, readout)
    groups, lti = model.groups()
    with ref.stop_recurrent(model):
        reference = ref.rtrl_reference(model, xs, ys, _loss, groups, lti, batch_size=batch)
    assert_matches(online, reference, RTOL_RTRL)
    # and the recurrent network is really outside the exact regime: BPTT differs
    bptt = ref.bptt_grads(_model(batch, readout), xs, ys, _loss, batch_size=batch)
    rec = ref.path_of(model, model.rec.comm.weight)
    got, want = np.asarray(u.get_mantissa(online[rec]["weight"])), np.asarray(u.get_mantissa(bptt[rec]["weight"]))
    assert np.linalg.norm(got - want) > 1e-6 * np.linalg.norm(want)


@pytest.mark.parametrize("batch", [None, 2])
@pytest.mark.parametrize("readout", ["leaky", "linear"])
def test_e_prop_equals_stop_gradient_bptt(readout, batch):
    xs, ys = _data(batch, seed=2)
    online = online_grads(_model(batch, readout), xs, ys, "e_prop", batch)
    reference = ref.bptt_grads_stopgrad(_model(batch, readout), xs, ys, _loss, batch_size=batch)
    assert_matches(online, reference, RTOL_EPROP)


@pytest.mark.parametrize("factorisation", ["filtered", "averaged"])
@pytest.mark.parametrize("recurrent", [True, False])
@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_es_d_rtrl_equals_its_naive_formulas(alpha, recurrent, factorisation):
    batch = 2
    xs, ys = _data(batch, seed=3)
    model = _model(batch, "linear", recurrent=recurrent)
    online = online_grads(model, xs, ys, "es_d_rtrl", batch, decay=alpha, factorisation=factorisation)
    reference = ref.es_d_rtrl_naive(
        _model(batch, "linear", recurrent=recurrent),
        xs,
        ys,
        _loss,
        alpha,
        batch_size=batch,
        factorisation=factorisation,
    )
    assert_matches(online, reference, RTOL_ES)


def test_materialised_derivatives_change_no_gradient(monkeypatch):
    """Large unbatched groups' derivative columns pass an optimisation barrier (`derive.MATERIALISE_FROM`,
    whole-brain scale only): forced on this small recurrent network, es_d_rtrl still equals its naive
    formulas."""
    monkeypatch.setattr(derive, "MATERIALISE_FROM", 0)
    batch = None
    xs, ys = _data(batch, seed=3)
    online = online_grads(_model(batch, "linear"), xs, ys, "es_d_rtrl", batch, decay=0.9)
    reference = ref.es_d_rtrl_naive(_model(batch, "linear"), xs, ys, _loss, 0.9, batch_size=batch)
    assert_matches(online, reference, RTOL_ES)


@pytest.mark.parametrize("factorisation", ["filtered", "averaged"])
def test_es_d_rtrl_shares_one_postsynaptic_factor_between_summed_inputs(factorisation):
    """With both synapses at 5 ms brainpy merges them: the input and recurrent currents enter the group
    through one sum, so their F is one array and es_d_rtrl keeps one postsynaptic factor for both (and
    one credit trace behind the leaky readout). Exact: equal to the naive formulas, which take F for each
    weight separately, and to the same learner with the sharing switched off."""
    batch, alpha = 2, 0.8
    xs, ys = _data(batch, seed=4)
    merged = _model(batch, "linear", rec_tau=5.0 * u.ms)
    learner = fusetrace.compile(merged, xs[0], loss=_loss, algorithm="es_d_rtrl", batch_size=batch)
    (owner,) = [r for r in learner.analysis.relations if r.same_injection is not None]
    assert {owner.weight, learner.analysis.relations[owner.same_injection].weight} == {
        "inp.comm.weight.weight",
        "rec.comm.weight.weight",
    }
    # two presynaptic factors (N_IN, N_REC) and ONE postsynaptic factor (N_REC neurons × V, g), float64
    assert learner.analysis.trace_bytes("es_d_rtrl") == batch * (N_IN + N_REC + N_REC * 2) * 8
    assert sum(x.size for x in jax.tree.leaves(learner.init()["traces"])) == batch * (N_IN + N_REC + N_REC * 2)
    options = {"decay": alpha, "factorisation": factorisation}
    online = online_grads(merged, xs, ys, "es_d_rtrl", batch, **options)
    reference = ref.es_d_rtrl_naive(
        _model(batch, "linear", rec_tau=5.0 * u.ms), xs, ys, _loss, alpha, batch_size=batch, factorisation=factorisation
    )
    assert_matches(online, reference, RTOL_ES)


@pytest.mark.parametrize("batch", [None, 2])
def test_sharing_the_postsynaptic_factor_changes_no_gradient(batch, monkeypatch):
    """Behind a leaky readout (cross-group credit), with and without the shared factor and credit trace."""
    xs, ys = _data(batch, seed=5)
    shared = online_grads(_model(batch, "leaky", rec_tau=5.0 * u.ms), xs, ys, "es_d_rtrl", batch)
    monkeypatch.setattr(factorised, "post_owner", lambda algorithm, relations, index: index)
    apart = online_grads(_model(batch, "leaky", rec_tau=5.0 * u.ms), xs, ys, "es_d_rtrl", batch)
    assert_matches(shared, apart, 1e-12)
