"""Tier 2: credit that reaches the loss through other groups, against BPTT through brainstate (float64,
one-step windows, Σ_t of the online gradients with fixed weights against the gradient of Σ_t loss).

* Exact through every linear time-invariant path (readouts with a τ per output or a trained τ, a readout
  of last step's spikes, readouts in series): d_rtrl and e_prop equal BPTT to 1e-6, batched and not,
  and the report calls every weight exact.
* Exact into a small last stage kept per unit (a second spiking layer read by a `Linear`, a spiking output
  population, a readout of a normalisation across the neurons), with a negative control.
* Approximate through nonlinear groups in the middle of a path, wide last ones and the E/I loop: the bars
  of issue 14 on direction (cosine) and magnitude (norm ratio), and the report says which path is
  approximate and why.
* Loops followed round by round (`loop_hops`, `own_loop_hops`): equal to BPTT through the model with
  the loop unrolled that many rounds; on the sparse E/I network one round of E's own loop is what takes
  the E -> I weights over the bar at every seed (negative control: without it).
* The claim machinery: a path the plan does not build (here: beyond `credit_depth`) makes the weight
  approximate, with a note, and its gradient really differs from BPTT.
"""

import functools

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deep_models
import fusetrace
from fusetrace.passes import chains
from test_compile_exact import assert_matches, bptt_grads, online_learner

RTOL_EXACT = 1e-6  # the acceptance bound of issue 14 (exact algebra, float64; observed ~1e-15)
COS_DEEP, RATIO_DEEP = 0.95, (0.5, 2.0)  # issue 14's bars for every layer under d_rtrl / e_prop
COS_DEEP_ES = 0.9  # es_d_rtrl's bar on the same networks
COS_EI = 0.9  # the E -> I weights of the E/I loop
BATCH = 2


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _loss(output, target):
    return jnp.sum((u.get_mantissa(output) - target) ** 2)


def _data(batch, steps, n_out=3, seed=1):
    shape = (steps, batch, deep_models.N_IN) if batch else (steps, deep_models.N_IN)
    xs = (jax.random.uniform(jax.random.PRNGKey(seed), shape) < 0.5).astype(jnp.float64)
    ys = 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 1), (*shape[:-1], n_out))
    return xs, ys


def _n_out(name):
    return 2 if name == "readouts_in_series" else 3


def _online(name, batch, steps, algorithm, **options):
    xs, ys = _data(batch, steps, _n_out(name))
    return online_learner(deep_models.build(name, batch), xs, ys, algorithm, batch, loss=_loss, **options)


@functools.cache
def _bptt(name, batch, steps):
    xs, ys = _data(batch, steps, _n_out(name))
    return bptt_grads(deep_models.build(name, batch), xs, ys, loss=_loss)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(u.get_mantissa(x))) for x in jax.tree.leaves(tree)])


def _cos_ratio(got, want):
    a, b = _flat(got), _flat(want)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), float(np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("batch", [None, BATCH])
@pytest.mark.parametrize("name", deep_models.LTI)
def test_linear_time_invariant_paths_are_exact_under_d_rtrl(name, batch):
    learner, online = _online(name, batch, 12, "d_rtrl")
    assert_matches(online, _bptt(name, batch, 12), RTOL_EXACT)
    assert all(report.exact for report in learner.report()), learner.summary()


@pytest.mark.parametrize("name", deep_models.LTI)
def test_linear_time_invariant_paths_are_exact_under_e_prop(name):
    learner, online = _online(name, BATCH, 12, "e_prop")
    assert_matches(online, _bptt(name, BATCH, 12), RTOL_EXACT)
    assert all(report.exact for report in learner.report()), learner.summary()


def test_a_path_beyond_credit_depth_is_reported_approximate_and_is():
    """With credit_depth=1 the input weight's path through the second readout is not built: the report must
    not call it exact, `explain` must say why, and its gradient must really miss BPTT's."""
    learner, online = _online("readouts_in_series", BATCH, 12, "d_rtrl", credit_depth=1)
    (report,) = [r for r in learner.report() if r.path.startswith("inp.")]
    assert not report.exact
    assert "credit_depth" in learner.explain(report.path)
    got, want = _flat(online["inp.comm.weight"]), _flat(_bptt("readouts_in_series", BATCH, 12)["inp.comm.weight"])
    assert np.linalg.norm(got - want) > 0.1 * np.linalg.norm(want)


DEEP = [
    ("two_layer_leaky", BATCH),
    ("two_layer_wide_linear", None),
    ("two_layer_alif_dualexpon", BATCH),
    ("three_layer_leaky", None),
    ("three_layer_alif_linear", BATCH),
]


SMALL_LAST_CASES = [("two_layer_linear", None), *((name, BATCH) for name in deep_models.SMALL_LAST)]


@pytest.mark.parametrize(("name", "batch"), SMALL_LAST_CASES)
def test_a_small_last_stage_is_kept_per_unit_and_exact(name, batch):
    """A nonlinear last stage of at most `RESOLVED_MAX_UNITS` units (a second spiking layer read by a
    `Linear`, a spiking output population, a readout of a normalisation across the neurons) gets one
    credit trace per unit, entered with the path's derivatives at the step the credit passes: d_rtrl and
    e_prop equal BPTT, and the report says so."""
    reference = _bptt(name, batch, 20)
    for algorithm in ("d_rtrl", "e_prop"):
        learner, online = _online(name, batch, 20, algorithm)
        assert_matches(online, reference, RTOL_EXACT)
        assert all(report.exact for report in learner.report()), learner.summary()


def test_without_the_per_unit_traces_the_small_last_stage_is_approximate(monkeypatch):
    """The negative control of the test above: with no stage kept per unit, the same network's first
    layer misses BPTT, and the report says approximate."""
    monkeypatch.setattr(chains, "RESOLVED_MAX_UNITS", 0)
    learner, online = _online("two_layer_linear", BATCH, 20, "d_rtrl")
    (report,) = [r for r in learner.report() if r.path.startswith("p0.")]
    assert not report.exact and "(nonlinear) is approximate" in learner.explain(report.path)
    got, want = _flat(online["p0.comm.weight"]), _flat(_bptt("two_layer_linear", BATCH, 20)["p0.comm.weight"])
    assert np.linalg.norm(got - want) > 1e-3 * np.linalg.norm(want)


@pytest.mark.parametrize(("name", "batch"), DEEP)
@pytest.mark.parametrize("algorithm", ["d_rtrl", "e_prop", "es_d_rtrl"])
def test_every_layer_of_a_feed_forward_stack_gets_its_credit(name, batch, algorithm):
    """Approximate (a nonlinear group in the middle of the path, or a last one too wide to keep per unit):
    issue 14's bars over a 60-step sequence, and `explain` names the nonlinear group the credit crosses."""
    learner, online = _online(name, batch, 60, algorithm)
    reference = _bptt(name, batch, 60)
    for path, want in reference.items():
        cos, ratio = _cos_ratio(online[path], want)
        if algorithm == "es_d_rtrl":
            assert cos >= COS_DEEP_ES, f"{path}: cos {cos:.3f}"
            continue
        assert cos >= COS_DEEP and RATIO_DEEP[0] <= ratio <= RATIO_DEEP[1], f"{path}: cos {cos:.4f} ratio {ratio:.3f}"
    assert "(nonlinear) is approximate" in learner.explain("p0.comm.weight")


EI_SEEDS = {"dense": 2, "sparse": 5}  # 8 + 4 neurons over 60 steps: networks differ (sparse, seed 0 needs E's loop)


@pytest.mark.parametrize("conn", ["dense", "sparse"])
def test_the_e_to_i_weights_of_an_ei_loop_get_credit_through_e(conn):
    """I's spikes reach the loss only through E (E reads I's previous spikes): the E -> I weights get a
    non-zero gradient pointing BPTT's way (cosine ≥ 0.9 on every network), and the recurrent E weights
    keep their per-neuron trace. The credit goes once round E's own recurrent weights (`loop_hops=1`):
    without that round, the sparse network of seed 0 falls to 0.73 (the negative control). On that network
    es_d_rtrl meets the bar with its "low_rank" factorisation (0.94), not with its filtered pair (0.21)."""
    name = f"ei_{conn}"
    for seed in range(EI_SEEDS[conn]):
        xs, ys = _data(BATCH, 60, seed=seed + 1)
        learner, online = online_learner(deep_models.build(name, BATCH, seed), xs, ys, "d_rtrl", BATCH, loss=_loss)
        reference = bptt_grads(deep_models.build(name, BATCH, seed), xs, ys, loss=_loss)
        cos_i, _ = _cos_ratio(online["EI.comm.weight"], reference["EI.comm.weight"])
        cos_e, _ = _cos_ratio(online["EE.comm.weight"], reference["EE.comm.weight"])
        assert cos_i >= COS_EI, f"E -> I, seed {seed}: cos {cos_i:.4f}"
        assert cos_e >= COS_EI, f"E -> E, seed {seed}: cos {cos_e:.4f}"
        if conn == "sparse" and seed == 0:
            model = deep_models.build(name, BATCH, seed)
            _, without = online_learner(model, xs, ys, "d_rtrl", BATCH, loss=_loss, loop_hops=0)
            cos_without, _ = _cos_ratio(without["EI.comm.weight"], reference["EI.comm.weight"])
            assert cos_without < COS_EI, f"without the round through E's loop: cos {cos_without:.4f}"
            # es_d_rtrl: its one pair of filtered factors misses here (0.21); a rank-4 trace per batch
            # entry (the event products read their spikes batch-last) meets the bar
            model = deep_models.build(name, BATCH, seed)
            _, es = online_learner(model, xs, ys, "es_d_rtrl", BATCH, loss=_loss, factorisation="low_rank", rank=4)
            cos_es, _ = _cos_ratio(es["EI.comm.weight"], reference["EI.comm.weight"])
            assert cos_es >= COS_EI, f"es_d_rtrl 'low_rank': cos {cos_es:.4f}"
    explained = learner.explain("EI.comm.weight")
    assert "(nonlinear) is approximate" in explained and "is followed once around the loop" in explained


def _linear(output, target):
    """A loss linear in the output: its learning signal does not depend on the forward values."""
    return jnp.sum(u.get_mantissa(output) * target)


@pytest.mark.parametrize("batch, hops", [(BATCH, 0), (BATCH, 1), (BATCH, 2), (None, 1)])
def test_a_loop_is_followed_round_by_round(batch, hops):
    """`loop_hops=k` / `own_loop_hops=k` give the gradient truncated after k rounds of a group's own
    recurrent weights: d_rtrl on a LIF layer read by a linear recurrent rate population equals BPTT through
    the same model with its loop unrolled into k + 1 copies (`deep_models.LinearLoop`), to rounding — for
    the LIF layer's input weight (a downstream loop) and for the population's own input weight (its own
    loop, beyond d_rtrl's per-neuron trace) — and says so."""
    xs, ys = _data(batch, 30)
    learner, online = online_learner(
        deep_models.build("linear_loop", batch),
        xs,
        ys,
        "d_rtrl",
        batch,
        loss=_linear,
        loop_hops=hops,
        own_loop_hops=hops,
    )
    brainstate.random.seed(0)
    unrolled = deep_models.LinearLoop(rounds=hops)
    brainstate.nn.init_all_states(unrolled, batch_size=batch)
    reference = bptt_grads(unrolled, xs, ys, loss=_linear)
    for path in ("inp.comm.weight", "w_in.weight"):
        got, want = _flat(online[path]), _flat(reference[path])
        np.testing.assert_allclose(got, want, rtol=0, atol=RTOL_EXACT * np.abs(want).max(), err_msg=path)
    times = {0: "is dropped", 1: "is followed once around the loop", 2: "is followed 2 times around the loop"}
    assert times[hops] in learner.explain("inp.comm.weight")
    if hops:  # (none of its own loop is the algorithm's own trace, said by its loop note)
        assert f"{times[hops]} and further rounds are dropped (compile option own_loop_hops)" in learner.explain(
            "w_in.weight"
        )


def test_a_readout_of_a_normalisation_across_the_neurons_passes_credit(monkeypatch):
    """`standardize(V − V_th)` across the layer mixes its neurons: the chain injects the per-neuron trace
    of `V − V_th` and carries the learning signal back through the normalisation's derivative (taken at
    the current step when the readout is too wide to keep per unit, as here; d_rtrl is exact on the
    small readout, `test_a_small_last_stage_is_kept_per_unit_and_exact`)."""
    monkeypatch.setattr(chains, "RESOLVED_MAX_UNITS", 0)
    for algorithm in ("d_rtrl", "es_d_rtrl"):
        learner, online = _online("normalised_readout", BATCH, 60, algorithm)
        cos, _ = _cos_ratio(online["inp.comm.weight"], _bptt("normalised_readout", BATCH, 60)["inp.comm.weight"])
        assert cos >= (COS_DEEP if algorithm == "d_rtrl" else COS_DEEP_ES), f"cos {cos:.4f}"
        assert "mixes the neurons it reads" in learner.explain("inp.comm.weight")


def test_a_trace_kept_per_unit_is_placed_whole_on_a_mesh():
    """`shard_step` lays a per-unit credit trace out like its owner's trace and keeps its unit axis whole;
    one sharded step equals the plain step (a one-device mesh: placement, not parallelism, is checked)."""
    xs, ys = _data(BATCH, 6)
    learner = fusetrace.compile(
        deep_models.build("two_layer_linear", BATCH), xs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH
    )
    assert any(node.resolved for node in learner.plan.chains)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "neurons"))
    sharded = fusetrace.shard_step(learner, mesh, batch_axis="data", neuron_axis="neurons")
    params, state = sharded.place(learner.params, learner.init())
    for node in (node for node in learner.plan.chains if node.resolved):
        for array in state["traces"][node.key]:
            assert len(array.sharding.spec) == array.ndim and array.sharding.spec[-1] is None
    plain, step = learner.init(), jax.jit(learner.step)
    for x, y in zip(xs, ys, strict=True):
        plain, want = step(learner.params, plain, x, y)
        state, got = sharded.step(params, state, *sharded.place_inputs(x, y))
    sharded_leaves, plain_leaves = (
        jax.tree.leaves((state["traces"], got.grads)),
        jax.tree.leaves((plain["traces"], want.grads)),
    )
    for a, b in zip(sharded_leaves, plain_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
