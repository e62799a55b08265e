"""The generated connectome (FlyWire v783 statistics, NOT the real graph), its loader, the LIF network on
it and a scaled-down online fit of neuropil rates (docs/connectome.md).

Sizes here are at most 5,000 neurons; the full 138,639-neuron graph is exercised by
`benchmarks/connectome.py`.
"""

import dataclasses
import re

import brainevent
import brainstate
import brainunit as u
import jax
import numpy as np
import optax
import pytest

import fusetrace
import fusetrace.trainer
from fusetrace.tasks import (
    TaskError,
    clock,
    connectome_network,
    drive_neurons,
    generate_connectome,
    load_connectome,
    mse_loss,
    rate_fit,
)
from fusetrace.tasks.connectome import FLYWIRE_CONNECTIONS, FLYWIRE_NEURONS, MEAN_SYNAPSES, Connectome
from fusetrace.tasks.flybrain import TAU_REF_MS

SMALL = 5_000  # the scaled-down graph: same generator, FlyWire's mean degree


@pytest.fixture(scope="module")
def graph() -> Connectome:
    return generate_connectome(SMALL, seed=0)


@pytest.fixture
def float32_jax_raw():
    """float32 and brainevent's pure-JAX kernels (its numba float CSR × matrix kernel is ~20x slower than
    them at this size: docs/connectome.md), restored afterwards."""
    backend = brainevent.config.get_backend("cpu")
    brainstate.environ.set(precision=32)
    brainevent.config.set_backend("cpu", "jax_raw")
    yield
    brainevent.config.set_backend("cpu", backend)
    brainstate.environ.set(precision=64)


def test_generated_graph_has_flywire_statistics(graph):
    n, e = graph.n_neurons, graph.n_edges
    assert n == SMALL and e == round(SMALL * FLYWIRE_CONNECTIONS / FLYWIRE_NEURONS)
    pre, post = graph.pre(), graph.indices
    keys = pre.astype(np.int64) * n + post
    assert np.all(np.diff(keys) > 0), "connections are sorted (pre, post) and distinct"
    assert not np.any(pre == post), "no self-loops"
    for degree in (graph.out_degree(), graph.in_degree()):  # heavy-tailed (lognormal propensities)
        assert degree.max() > 5 * degree.mean() and degree.std() > 0.8 * degree.mean()
    sending = graph.out_degree() > 0
    excitatory = np.bincount(pre, weights=graph.weights > 0, minlength=n) == graph.out_degree()
    assert abs(excitatory[sending].mean() - 0.8) < 0.03, "80% excitatory neurons"
    assert abs(np.abs(graph.weights).mean() - MEAN_SYNAPSES) < 0.2 and np.all(np.abs(graph.weights) >= 1)
    sizes = graph.neuropil_sizes()
    assert graph.n_neuropils == 78 and sizes.min() >= 1 and np.all(np.diff(graph.neuropil) >= 0)
    assert graph.indices.dtype == np.int32 and graph.weights.dtype == np.float32


def test_every_neuron_keeps_one_sign(graph):
    """Dale's law: all outgoing weights of a neuron share its sign."""
    pre = graph.pre()
    positive = np.bincount(pre, weights=graph.weights > 0, minlength=graph.n_neurons)
    assert np.all((positive == 0) | (positive == graph.out_degree()))


def test_generator_is_deterministic_in_its_seed():
    a, b, c = (generate_connectome(400, 6_000, n_neuropils=8, seed=s) for s in (3, 3, 4))
    for name in ("indptr", "indices", "weights", "neuropil"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.indices, c.indices)


def test_generator_refuses_impossible_graphs():
    with pytest.raises(TaskError):
        generate_connectome(10, 100)  # more than half of the 90 ordered pairs
    with pytest.raises(TaskError):
        generate_connectome(100, 50, local_fraction=1.5)


def test_csv_round_trip_with_flywire_style_ids(tmp_path):
    """A real connectome's rows (arbitrary int64 ids, repeated pairs) load into the same structure."""
    small = generate_connectome(300, 3_000, n_neuropils=5, seed=1)
    ids = np.sort(np.random.default_rng(0).choice(10**18, small.n_neurons, replace=False)) + 720575940000000000
    small = dataclasses.replace(small, ids=ids.astype(np.int64))
    connections, neuropils = tmp_path / "connections.csv", tmp_path / "neuropils.csv"
    small.to_csv(connections, neuropils)
    with open(connections, "a") as file:  # a repeated pair: its weights add
        file.write(f"{ids[small.pre()[0]]},{ids[small.indices[0]]},2.5\n")
    loaded = load_connectome(connections, neuropils=neuropils)
    np.testing.assert_array_equal(loaded.ids, ids)
    np.testing.assert_array_equal(loaded.indptr, small.indptr)
    np.testing.assert_array_equal(loaded.indices, small.indices)
    expected = small.weights.copy()
    expected[0] += 2.5
    np.testing.assert_allclose(loaded.weights, expected, rtol=1e-6)
    assert [loaded.neuropil_names[k] for k in loaded.neuropil] == [small.neuropil_names[k] for k in small.neuropil]
    unlabelled = load_connectome(connections, n_blocks=4)
    assert unlabelled.neuropil_names == ("block00", "block01", "block02", "block03")


def test_loader_names_a_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("source,target,weight\n1,2,3.0\n")
    with pytest.raises(TaskError, match="pre"):
        load_connectome(path)
    assert load_connectome(path, columns=("source", "target", "weight")).n_edges == 1


def test_refractory_period_holds_under_strong_drive(float32_jax_raw):
    """`LIFRef` reads the clock passed as the second input: no neuron fires twice within 2.2 ms."""
    small = generate_connectome(200, 2_000, n_neuropils=4, seed=2)
    drive = drive_neurons(small, 40)
    net = connectome_network(small, drive=drive, batch_size=1)
    steps = 200
    inputs = np.ones((steps, 1, drive.shape[0]), np.float32)  # a drive spike every step

    @brainstate.transform.jit
    def run(xs, times):
        def one(x, t):
            net.update(x, t)
            return net.neurons.get_spike()

        return brainstate.transform.for_loop(one, xs, times)

    spikes = np.asarray(u.get_mantissa(run(inputs, clock(steps)))) > 0
    gap_steps = round(TAU_REF_MS / 0.2)
    for neuron in drive:
        times = np.flatnonzero(spikes[:, 0, neuron])
        assert times.size >= 3, "a driven neuron fires repeatedly"
        assert np.diff(times).min() > gap_steps - 1


def test_network_compiles_to_one_group_and_a_traced_sparse_weight(float32_jax_raw):
    small = generate_connectome(300, 3_000, n_neuropils=6, seed=0)
    fit = rate_fit(small, batch=2)
    x0 = np.zeros((2, fit.drive.shape[0]), np.float32)
    learner = fusetrace.compile(fit.network, x0, clock(1)[0], loss=mse_loss, algorithm="es_d_rtrl", batch_size=2)
    (group,) = learner.analysis.groups
    assert group.n_states == 3 and group.n_neurons == small.n_neurons  # V, the merged synapse, the rate
    (relation,) = [r for r in learner.analysis.relations if r.status == "traced"]
    assert relation.weight == "rec.comm.weight.weight" and relation.op == "binary_csrmm"
    assert learner.params["rec.comm.weight"]["weight"].shape == (small.n_edges,)


@pytest.mark.long  # a learning study: 32 s on 2 cores
def test_scaled_down_connectome_fits_neuropil_rates_online(graph, float32_jax_raw):
    """5,000 neurons, 544,291 connections trained online with es_d_rtrl (decay 0.99, Adam after every
    10 ms read-out) on one fixed 60 ms batch, 3 passes: the loss falls and the weights move towards the teacher's
    (the known optimum). 15–32 s on 2 cores: in the long mode."""
    fit = rate_fit(graph, batch=2, duration_ms=60.0)
    batch = fit.sample(0)
    learner = fusetrace.compile(
        fit.network,
        *jax.tree.map(lambda x: x[0], batch.inputs),
        loss=mse_loss,
        algorithm="es_d_rtrl",
        batch_size=2,
        decay=0.99,
    )
    every = round(10.0 / fit.dt_ms)
    trainer = fusetrace.trainer.Trainer(
        learner, lambda seed: batch, optax.adam(0.05), update_every=every, gradient_every=every
    )
    state = trainer.init()
    losses, distances = [], []
    for _ in range(3):
        state, result = trainer.iteration(state)
        losses.append(result.loss)
        distances.append(fit.distance(state["params"]["rec.comm.weight"]["weight"]))
    assert np.all(np.isfinite(losses)) and losses[0] > 0
    assert losses[-1] < 0.5 * losses[0], losses
    assert distances[-1] < distances[0] < 1.0, distances


def _hlo_constant_sizes(lowered) -> list[int]:
    """Element counts of the array constants embedded in a lowered program (StableHLO text)."""
    sizes = []
    for line in lowered.as_text().splitlines():
        if "stablehlo.constant" in line or "arith.constant" in line:
            for dims in re.findall(r"tensor<((?:\d+x)+)\w+>", line):
                sizes.append(int(np.prod([int(d) for d in dims.rstrip("x").split("x")])))
    return sizes


@pytest.fixture(scope="module")
def graph_learner(graph):
    """An unbatched es_d_rtrl learner on the 5,000-neuron graph, its drive and a 30-step input."""
    backend = brainevent.config.get_backend("cpu")
    brainstate.environ.set(precision=32)
    brainevent.config.set_backend("cpu", "jax_raw")
    drive = drive_neurons(graph, 250)
    net = connectome_network(graph, drive=drive, batch_size=None)
    x0 = np.zeros((drive.shape[0],), np.float32)
    learner = fusetrace.compile(net, x0, clock(1)[0], loss=mse_loss, algorithm="es_d_rtrl", decay=0.99)
    rng = np.random.default_rng(0)
    xs = (rng.random((30, drive.shape[0])) < 0.1).astype(np.float32)
    target = (np.full((graph.n_neuropils,), 20.0, np.float32), np.float32(1.0))
    yield learner, xs, clock(30), target, net
    brainevent.config.set_backend("cpu", backend)
    brainstate.environ.set(precision=64)


def _run_steps(learner, xs, times, target, *, pass_constants: bool):
    """30 steps under one jit; the graph's arrays passed as an argument or left to be embedded."""

    @jax.jit
    def run(params, constants):
        def body(state, step_inputs):
            options = {"constants": constants} if pass_constants else {}
            state, result = learner.step(params, state, step_inputs, target, **options)
            return state, result.grads

        return jax.lax.scan(body, learner.init(), (xs, times))

    return run, (learner.params, learner.constants)


def test_constants_hold_the_graph_and_its_row_index(graph, graph_learner):
    learner = graph_learner[0]
    (indices,) = learner.constants["step"]
    (rows,) = learner.constants["csr_rows"]
    np.testing.assert_array_equal(indices, graph.indices)
    np.testing.assert_array_equal(rows, graph.pre())  # row of every connection, computed once at compile


def test_constants_passed_as_arguments_give_the_same_steps_and_stay_out_of_the_program(graph, graph_learner):
    """The same states and gradients over 30 steps; the passed graph is an argument of the compiled
    program, the closed-over one an embedded constant of its size."""
    learner, xs, times, target, _ = graph_learner
    results, sizes = [], []
    for pass_constants in (True, False):
        run, args = _run_steps(learner, xs, times, target, pass_constants=pass_constants)
        results.append(run(*args))
        sizes.append(max(_hlo_constant_sizes(run.lower(*args)), default=0))
    passed, embedded = results
    spikes = float(np.sum(np.asarray(passed[0]["traces"]["r0"]["pre"]) != 0))
    assert spikes > 0, "the drive makes neurons fire: the trace is not trivially zero"
    for a, b in zip(jax.tree.leaves(passed), jax.tree.leaves(embedded), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert sizes[0] < graph.n_edges <= sizes[1], sizes


def test_row_index_computed_in_the_program_when_not_precomputed(graph_learner, monkeypatch):
    """Without the compile-time row index (an indptr that is not a constant of the step), the program
    computes it: the same gradients."""
    learner, xs, times, target, net = graph_learner
    run, args = _run_steps(learner, xs, times, target, pass_constants=False)
    expected = run(*args)
    monkeypatch.setattr(fusetrace.api.derive, "twin_row_indptrs", lambda analysis: [])
    again = fusetrace.compile(net, *learner.snapshot.inputs, loss=mse_loss, algorithm="es_d_rtrl", decay=0.99)
    assert again.constants["csr_rows"] == ()
    run, args = _run_steps(again, xs, times, target, pass_constants=True)
    for a, b in zip(jax.tree.leaves(run(*args)), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_constants_of_another_shape_are_refused(graph_learner):
    learner, xs, times, target, _ = graph_learner
    wrong = {"step": (np.zeros(3, np.int32),), "csr_rows": learner.constants["csr_rows"]}
    with pytest.raises(fusetrace.errors.CaptureError, match="`constants` are not the learner's"):
        learner.step(learner.params, learner.init(), (xs[0], times[0]), target, constants=wrong)


def test_jax_simplified_constants_give_the_same_steps(graph_learner):
    """Under JAX's transitional `jax_use_simplified_jaxpr_constants` (closed-over arrays become literals
    of the jaxpr, hoisted into arguments by jit; JAX means to make it the default) the learner compiles
    and steps as without it."""
    learner, xs, times, target, net = graph_learner
    run, args = _run_steps(learner, xs, times, target, pass_constants=False)
    expected = run(*args)
    before = jax.config.jax_use_simplified_jaxpr_constants
    jax.config.update("jax_use_simplified_jaxpr_constants", True)
    try:
        again = fusetrace.compile(net, *learner.snapshot.inputs, loss=mse_loss, algorithm="es_d_rtrl", decay=0.99)
        # the graph is a literal of the step now (jit hoists it), its row index still computed at compile
        assert again.constants["step"] == () and len(again.constants["csr_rows"]) == 1
        run, args = _run_steps(again, xs, times, target, pass_constants=True)
        result = run(*args)
    finally:
        jax.config.update("jax_use_simplified_jaxpr_constants", before)
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_shard_step_passes_the_graph_as_an_argument(graph, graph_learner):
    """`shard_step` binds `learner.constants` as a replicated argument: the lowered program holds no
    constant of the graph's size, and its steps equal the learner's."""
    learner, xs, times, target, _ = graph_learner
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("neurons",))
    sharded = fusetrace.shard_step(learner, mesh, neuron_axis="neurons", example_target=target)
    params, state = sharded.place(learner.params, learner.init())
    assert max(_hlo_constant_sizes(sharded.lower(params, state, (xs[0], times[0]), target)), default=0) < graph.n_edges
    reference, step = learner.init(), jax.jit(learner.step)
    for k in range(5):
        state, result = sharded.step(params, state, (xs[k], times[k]), target)
        reference, expected = step(learner.params, reference, (xs[k], times[k]), target)
    for a, b in zip(jax.tree.leaves((state, result.grads)), jax.tree.leaves((reference, expected.grads)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
