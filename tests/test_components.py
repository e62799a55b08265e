"""es_d_rtrl's "matched" and "low_rank" factorisations (passes/components.py), float64.

* Tier 2, reference: each equals its dense definition (tests/references.py, which does not import
  fusetrace) on a tiny recurrent LIF layer, input and recurrent weights apart or sharing `F` — to 1e-8.
* Tier 2, exact regimes: on a linear time-invariant group whose neurons share `(D, F)` both equal d_rtrl
  (which is BPTT there), with distinct decays and with a repeated one (a Jordan block); "low_rank" with a
  rank of at least n_pre equals d_rtrl on the recurrent layer, credit through the leaky readout included.
* Tier 3/4: the state holds no n_pre × n_post array; the options are checked.
"""

import collections

import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deep_models
import fusetrace
import references as ref
import zoo
from fusetrace.errors import CompileError
from test_compile_exact import assert_matches, online_grads, online_learner

RTOL_REFERENCE = 1e-8  # the implementation against its dense definition (float64; observed ~1e-13)
RTOL_EXACT = 1e-8  # exact regimes against d_rtrl (float64 algebra; observed ~1e-14)
N_IN, N_REC, N_OUT, STEPS, BATCH = 3, 4, 2, 8, 2


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _loss(output, target):
    return jnp.sum((output - target) ** 2)


def _data(batch=BATCH, seed=1, n_in=N_IN, n_out=N_OUT, steps=STEPS):
    rng = np.random.default_rng(seed)
    xs = jnp.asarray((rng.random((steps, batch, n_in)) < 0.6).astype(np.float64))
    ys = jnp.asarray(rng.normal(size=(steps, batch, n_out)))
    return xs, ys


def _model(readout="linear", **kw):
    return ref.build_recurrent_lif(N_IN, N_REC, N_OUT, batch_size=BATCH, readout=readout, seed=0, **kw)


@pytest.mark.parametrize(
    ("factorisation", "rank", "merged", "metric"),
    [
        ("low_rank", 1, False, None),
        ("low_rank", 2, True, None),
        ("low_rank", 1, False, "balanced"),
        ("low_rank", 2, True, "balanced"),
        ("low_rank", 1, False, "spike"),
        ("low_rank", 2, True, "spike"),
        ("matched", None, False, None),
        ("matched", None, True, None),
    ],
    ids=[
        "rank1-apart",
        "rank2-shared_F",
        "rank1-apart-balanced",
        "rank2-shared_F-balanced",
        "rank1-apart-spike",
        "rank2-shared_F-spike",
        "matched-apart",
        "matched-shared_F",
    ],
)
def test_equals_its_dense_definition(factorisation, rank, merged, metric):
    """Apart: input and recurrent synapses at 5 and 8 ms (each weight its own factors). Shared F: both at
    5 ms (brainpy merges them; one postsynaptic factor, and under "low_rank" one basis for both inputs).
    "balanced": the truncation in the norm that puts each state's block (V, the synapse's current) at unit
    norm; "spike": in the norm of the spike's argument read through the dynamics (per neuron `M ← Dᵀ M D +
    g gᵀ`; the spike reads V only, the synapses through D). On this layer each keeps other directions
    than the plain one (checked, so the case is not vacuous)."""
    xs, ys = _data()
    options = {"rec_tau": 5.0 * u.ms} if merged else {}
    extra = {} if metric is None else {"rank_metric": metric}
    online = online_grads(
        _model(**options), xs, ys, "es_d_rtrl", BATCH, factorisation=factorisation, rank=rank, **extra
    )
    reference = ref.es_d_rtrl_components_naive(
        _model(**options),
        xs,
        ys,
        _loss,
        factorisation,
        rank=rank,
        batch_size=BATCH,
        stacked=merged,
        metric=metric or "plain",
    )
    assert_matches(online, reference, RTOL_REFERENCE)
    if metric is not None:
        plain = ref.es_d_rtrl_components_naive(
            _model(**options), xs, ys, _loss, factorisation, rank=rank, batch_size=BATCH, stacked=merged
        )
        gaps = [
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(plain), strict=True)
        ]
        assert max(gaps) > 1e-4, gaps  # far above the 1e-8 of the agreement


def test_low_rank_of_full_rank_is_d_rtrl_through_the_leaky_readout():
    """With a rank of at least n_pre nothing is ever truncated: the trace and the credit chain through the
    readout (rotated with the basis) are d_rtrl's."""
    xs, ys = _data(seed=2)
    online = online_grads(_model("leaky"), xs, ys, "es_d_rtrl", BATCH, factorisation="low_rank", rank=max(N_IN, N_REC))
    assert_matches(online, online_grads(_model("leaky"), xs, ys, "d_rtrl", BATCH), RTOL_EXACT)


class TwoStates(brainstate.nn.Module):
    """A linear time-invariant group: `h1 ← λ1 h1 + x W`, `h2 ← λ2 h2 + c·h1`; the output reads h2 (scaled
    by `out_scale`), or with `spiking` is the spike of `h1 + out_scale·h2 − 0.5` (then not time-invariant)."""

    def __init__(self, decays, n_in=3, n=4, coupling=0.3, out_scale=1.0, spiking=False):
        super().__init__()
        self.decays, self.n, self.coupling, self.out_scale, self.spiking = decays, n, coupling, out_scale, spiking
        self.spike = braintools.surrogate.Sigmoid()
        self.weight = brainstate.ParamState(braintools.init.KaimingNormal()((n_in, n)))

    def init_state(self, batch_size=None, **kwargs):
        zeros = braintools.init.Constant(0.0)
        self.h1 = brainstate.HiddenState(braintools.init.param(zeros, (self.n,), batch_size))
        self.h2 = brainstate.HiddenState(braintools.init.param(zeros, (self.n,), batch_size))

    def update(self, x):
        self.h1.value = self.decays[0] * self.h1.value + x @ self.weight.value
        self.h2.value = self.decays[1] * self.h2.value + self.coupling * self.h1.value
        if self.spiking:
            return self.spike(self.h1.value + self.out_scale * self.h2.value - 0.5)
        return self.h2.value * self.out_scale


def _two_states(decays, **options):
    brainstate.random.seed(0)
    model = TwoStates(decays, **options)
    brainstate.nn.init_all_states(model, batch_size=BATCH)
    return model


@pytest.mark.parametrize("decays", [(0.9, 0.6), (0.8, 0.8)], ids=["distinct", "repeated"])
@pytest.mark.parametrize(
    ("factorisation", "options"),
    [("matched", {}), ("low_rank", {"rank": 2}), ("low_rank", {"rank": 2, "rank_metric": "balanced"})],
    ids=["matched", "rank2", "rank2-balanced"],
)
def test_exact_on_a_linear_time_invariant_group(decays, factorisation, options):
    """The kernel of each neuron is a combination of the group's own (S = 2 filters; rank S), also when
    the two decays are equal (the kernel n·λ^(n-1) of a Jordan block). The truncation's norm does not
    matter where nothing is truncated. 12 neurons: 24 states per batch entry, above `SMALL_LTI`, so the
    trace is factorised (with 4 the relation would keep d_rtrl's exact trace, `Relation.small_lti`)."""
    xs, ys = _data(seed=3, n_out=12, steps=12)
    model = _two_states(decays, n=12)
    learner, online = online_learner(model, xs, ys, "es_d_rtrl", BATCH, factorisation=factorisation, **options)[:2]
    assert not any(relation.small_lti for relation in learner.analysis.relations)
    assert_matches(online, online_grads(_two_states(decays, n=12), xs, ys, "d_rtrl", BATCH), RTOL_EXACT)


def _rank_one(xs, ys, metric, **options):
    """`(learner, gradients)` of es_d_rtrl's rank-1 trace in the norm `metric` on `TwoStates` (decays 0.9,
    0.6) built with `options`."""
    return online_learner(
        _two_states((0.9, 0.6), **options),
        xs,
        ys,
        "es_d_rtrl",
        BATCH,
        factorisation="low_rank",
        rank=1,
        rank_metric=metric,
    )[:2]


@pytest.mark.parametrize(("metric", "spiking"), [("balanced", False), ("spike", True)])
def test_the_truncation_does_not_depend_on_a_state_s_unit(metric, spiking):
    """The same network with h2 written in a unit 1000x smaller (coupling x1000, the output reading h2 /
    1000), 12 neurons (24 states: above `SMALL_LTI`, so the trace is factorised), rank 1 (a truncation
    at every step): the balanced gradient is the same to rounding (observed 4e-16; d_rtrl's 9e-17), the
    plain one moves by 10% (its norm weighs h2's block 10^6 times more). The "spike" one on the spiking
    form (its metric transforms with the unit: `g` by the inverse scale, the trace by the scale; observed
    3e-16), where it differs from the balanced one by 4%."""
    xs, ys = _data(seed=3, n_out=12, steps=12)
    units = ({"n": 12, "spiking": spiking}, {"n": 12, "coupling": 300.0, "out_scale": 1e-3, "spiking": spiking})

    def gap(a, b):
        return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))

    def unit_gap(norm):
        return gap(*(_rank_one(xs, ys, norm, **options)[1]["weight"] for options in units))

    assert unit_gap(metric) < RTOL_EXACT
    assert unit_gap("plain") > 1e-2
    if metric == "spike":  # not the balanced one under another name (observed: 4% apart)
        assert gap(*(_rank_one(xs, ys, norm, **units[0])[1]["weight"] for norm in ("balanced", "spike"))) > 1e-2


@pytest.mark.parametrize(("factorisation", "rank"), [("matched", None), ("low_rank", 3)])
def test_state_holds_no_pre_by_post_array(factorisation, rank):
    n_in, n_rec = 5, 7  # sizes apart from the number of components
    xs, _ = _data(n_in=n_in)
    model = ref.build_recurrent_lif(n_in, n_rec, N_OUT, batch_size=BATCH, readout="leaky", seed=0)
    learner = fusetrace.compile(
        model,
        xs[0],
        loss=_loss,
        algorithm="es_d_rtrl",
        batch_size=BATCH,
        factorisation=factorisation,
        rank=rank,
    )
    for leaf in jax.tree.leaves(learner.init()["traces"]):
        assert not (n_in in leaf.shape and n_rec in leaf.shape), f"trace of shape {leaf.shape} is n_pre x n_post"
    assert f"'{factorisation}' factors" in learner.explain("inp.comm.weight")
    assert f"es_d_rtrl '{factorisation}'" in learner.summary()
    # the learner's trace memory counts its K pairs of factors (the analysis' figure is the default's one pair)
    allocated = sum(leaf.nbytes for leaf in jax.tree.leaves(learner.init()["traces"]))
    assert learner.trace_bytes() == allocated > learner.analysis.trace_bytes("es_d_rtrl")
    assert f"traces of this learner: {allocated} bytes" in learner.summary()


@pytest.mark.parametrize("rank", [0, 2.5, True])
def test_a_bad_rank_is_refused(rank):
    xs, _ = _data()
    with pytest.raises(CompileError, match="rank"):
        fusetrace.compile(
            _model(), xs[0], loss=_loss, algorithm="es_d_rtrl", batch_size=BATCH, factorisation="low_rank", rank=rank
        )


@pytest.mark.parametrize(("algorithm", "factorisation"), [("es_d_rtrl", "filtered"), ("d_rtrl", "filtered")])
def test_a_rank_without_the_low_rank_factorisation_is_refused(algorithm, factorisation):
    """A rank would be ignored there: refused, naming the option and what to pass instead."""
    xs, _ = _data()
    with pytest.raises(CompileError, match="only es_d_rtrl's 'low_rank' factorisation") as caught:
        fusetrace.compile(
            _model(), xs[0], loss=_loss, algorithm=algorithm, batch_size=BATCH, factorisation=factorisation, rank=4
        )
    assert "factorisation='low_rank'" in str(caught.value)


@pytest.mark.parametrize(
    ("factorisation", "metric", "match"),
    [("low_rank", "spectral", "rank_metric='spectral'"), ("filtered", "balanced", "only es_d_rtrl's 'low_rank'")],
    ids=["unknown", "not-low_rank"],
)
def test_a_bad_rank_metric_is_refused(factorisation, metric, match):
    xs, _ = _data()
    with pytest.raises(CompileError, match=match):
        fusetrace.compile(
            _model(), xs[0], loss=_loss, batch_size=BATCH, factorisation=factorisation, rank_metric=metric
        )


@pytest.mark.parametrize(
    ("metric", "text"),
    [
        ("balanced", "block of the trace scaled to unit norm ('balanced')"),
        ("spike", "how the neurons' spikes read each state through the group's dynamics ('spike')"),
    ],
)
def test_the_truncation_norm_is_shown(metric, text):
    xs, _ = _data()
    learner = fusetrace.compile(
        _model(), xs[0], loss=_loss, batch_size=BATCH, factorisation="low_rank", rank=2, rank_metric=metric
    )
    assert text in learner.explain("inp.comm.weight")
    assert f"'{metric}' truncation" in learner.summary()
    owners = [factors for factors in learner.init()["traces"].values() if "post" in factors]
    assert all(("metric" in factors) == (metric == "spike") for factors in owners)  # an S×S block per neuron
    if metric == "spike":
        assert "an S×S metric per neuron" in learner.summary()


def test_the_spike_truncation_of_a_group_without_spikes_is_the_balanced_one():
    """`TwoStates` emits no spike: "spike" falls back to "balanced" (the same gradient, bit for bit), keeps
    no metric, and `explain` says so."""
    xs, ys = _data(seed=3, n_out=12, steps=12)
    grads = {}
    for metric in ("balanced", "spike"):
        learner, grads[metric] = _rank_one(xs, ys, metric, n=12)
    assert all("metric" not in factors for factors in learner.init()["traces"].values())
    assert "('spike' asked; the group has no spike)" in learner.explain("weight")
    for a, b in zip(jax.tree.leaves(grads["spike"]), jax.tree.leaves(grads["balanced"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_factors_are_placed_by_their_own_layout_on_a_mesh():
    """`shard_step` lays every factor out by its own layout (`components.FACTOR_NEURON_AXIS`): the
    postsynaptic factor and the per-neuron metric split on their neuron axis (not the component axis),
    their state axes whole; a presynaptic factor on its neuron axis when it is a population (the recurrent
    spikes), else whole; the basis rotation only over the batch. One sharded step equals the plain step
    (a one-device mesh: placement is checked)."""
    xs, ys = _data()
    learner = fusetrace.compile(
        _model(), xs[0], loss=_loss, batch_size=BATCH, factorisation="low_rank", rank=2, rank_metric="spike"
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "neurons"))
    sharded = fusetrace.shard_step(learner, mesh, batch_axis="data", neuron_axis="neurons")
    params, state = sharded.place(learner.params, learner.init())
    metrics = [factors["metric"] for factors in state["traces"].values() if "metric" in factors]
    assert metrics and all(tuple(m.sharding.spec) == ("data", "neurons", None, None) for m in metrics)
    specs = collections.defaultdict(set)
    for factors in state["traces"].values():
        for name, value in factors.items():
            specs[name].add(tuple(value.sharding.spec))
    assert specs["post"] == {("data", None, "neurons", None)}
    assert specs["rotation"] == {("data", None, None)}
    assert specs["pre"] == {("data", None, None), ("data", None, "neurons")}  # the input; the recurrent spikes
    plain, step = learner.init(), jax.jit(learner.step)
    for x, y in zip(xs, ys, strict=True):
        plain, want = step(learner.params, plain, x, y)
        state, got = sharded.step(params, state, *sharded.place_inputs(x, y))
    for a, b in zip(jax.tree.leaves((state, got.grads)), jax.tree.leaves((plain, want.grads)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_credit_chains_on_the_basis_are_placed_on_their_neuron_axis():
    """A credit chain riding on a low-rank basis `(B, K, *units[, last stage's units])` is split on its
    neuron axis, not on the component axis (placement only: `shard_step` on a one-device mesh, a
    two-layer stack whose first weights reach the loss through the second population)."""
    brainstate.environ.set(dt=1.0 * u.ms)
    x = (jax.random.uniform(jax.random.PRNGKey(0), (BATCH, deep_models.N_IN)) < 0.5).astype(jnp.float64)
    learner = fusetrace.compile(
        deep_models.build("two_layer_leaky", BATCH),
        x,
        loss=lambda output, target: jnp.sum((u.get_mantissa(output) - target) ** 2),
        batch_size=BATCH,
        example_target=jnp.zeros((BATCH, 3)),
        factorisation="low_rank",
        rank=2,
    )
    chains = [node.key for node in learner.plan.chains if node.key in learner.init()["traces"]]
    assert chains
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "neurons"))
    _, state = fusetrace.shard_step(learner, mesh, batch_axis="data", neuron_axis="neurons").place(
        learner.params, learner.init()
    )
    for key in chains:
        for trace in state["traces"][key]:
            want = ("data", None, "neurons") + (None,) * (trace.ndim - 3)  # a resolved chain: the units last
            assert tuple(trace.sharding.spec) == want, key


@pytest.mark.parametrize("conn", ["sparse"])  # binary_fcnmm, reading a slice of the spikes transposed
def test_low_rank_reads_an_event_input_laid_out_batch_last(conn):
    """brainevent's batched event products read their spikes as `(n_pre, B)`: the basis is kept per batch
    entry all the same (the batch axis followed back to the spikes). On a recurrent E/I layer with event
    projections and a leaky readout, a rank that truncates nothing is d_rtrl (exact there), per step and
    through `scan`'s deferred products; a layout mix-up would mix the batch entries' traces. (It also
    holds the basis still when an input adds no new direction: dropping a tied zero direction of the
    still-zero trace cost the input weight 1.5e-3 of d_rtrl's gradient before.)"""
    rng, steps = np.random.default_rng(4), 40  # long enough for both populations to spike
    xs = jnp.asarray((rng.random((steps, BATCH, 6)) < 0.5).astype(np.float64))
    ys = jnp.asarray(rng.normal(size=(steps, BATCH, N_OUT)))

    def loss(output, target):
        return jnp.sum((u.get_mantissa(output[0]) - target) ** 2)

    def model():
        return zoo.ei_net(BATCH, conn=conn).model

    full = 64  # above every factor's n_pre: capped, nothing truncated
    options = {"factorisation": "low_rank", "rank": full}
    learner, online = online_learner(model(), xs, ys, "es_d_rtrl", BATCH, loss=loss, **options)
    event_ops = {r.op for r in learner.analysis.relations} & {"binary_fcnmm", "binary_densemm"}
    assert event_ops, "the model has no batched event product"
    assert_matches(online, online_grads(model(), xs, ys, "d_rtrl", BATCH, loss=loss), RTOL_EXACT)
    _, result = jax.jit(learner.scan)(learner.params, learner.init(), xs, ys)
    assert_matches(result.grads, online, RTOL_EXACT)
