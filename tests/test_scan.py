"""`Learner.scan`: the steps of a sequence in one `lax.scan` equal a Python loop of `Learner.step`
(float64 rounding), for every algorithm and relation kind; masked steps form no gradient; the sequence is
checked."""

import functools

import brainstate
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import fusetrace
import zoo
import zoo_coverage
from fusetrace import sequence
from fusetrace.passes import events
from fusetrace.passes.structure import prev_read_states

RTOL_SUM = 1e-12  # the same per-step arithmetic, summed in another order (float64)
STEPS = 6


def _loss(output, target):
    return sum(jnp.sum((o - target) ** 2) for o in jax.tree.leaves(output))


def _sequence(x0, seed=3):
    keys = jax.random.split(jax.random.PRNGKey(seed), STEPS)
    return jnp.stack([(jax.random.uniform(k, jnp.shape(x0)) < 0.6).astype(jnp.asarray(x0).dtype) for k in keys])


def _flat(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_close(got, want):
    """Every leaf of the pytree `got` equals `want`'s to float64 rounding of a reordered sum."""
    for a, b in zip(_flat(got), _flat(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL_SUM, atol=1e-14)


def _loop(learner, xs, targets, mask):
    state, total, losses = learner.init(), None, []
    step = jax.jit(learner.step, static_argnames="gradient")
    for x, y, m in zip(xs, targets, mask, strict=True):
        state, res = step(learner.params, state, x, y, gradient=bool(m))
        losses.append(res.loss)
        if m:
            total = res.grads if total is None else jax.tree.map(jnp.add, total, res.grads)
    return state, total, jnp.stack(losses)


CASES = [
    ("leaky_readout", "d_rtrl"),  # dense, with a credit chain through the readout
    ("ei_net_sparse", "es_d_rtrl"),  # event / sparse, factorised
    ("csr_event", "es_d_rtrl"),  # a binary CSR product over a batch: one loop over steps and batch entries
    ("fixed_prob_scalar", "e_prop"),  # a shared scalar weight
    ("conv1d", "es_d_rtrl"),  # a convolution
    ("bias_current", "d_rtrl"),  # a per-neuron parameter
    ("gru", "es_d_rtrl"),  # per-gate relations, a gate crossing a product, per-neuron bias products
]


@pytest.mark.parametrize(
    ("name", "algorithm", "batch"),
    [(*case, 2) for case in CASES] + [("gru", "es_d_rtrl", None)],  # unbatched: `x @ W` on vectors
)
def test_scan_equals_summed_steps(name, algorithm, batch):
    model, inputs, _ = {**zoo.ZOO, **vars(zoo_coverage)}[name](batch_size=batch)
    (x0,) = inputs
    xs = _sequence(x0)
    targets = jnp.full((STEPS,), 0.3)
    learner = fusetrace.compile(model, x0, loss=_loss, algorithm=algorithm, batch_size=batch)
    # a step before the first that forms a gradient and one after the last (advanced alone), a masked step
    # inside the span; es_d_rtrl defers its products in chunks within the span (here 3 steps, then 1 alone)
    mask = np.array([0, 1, 0, 1, 1, 0], bool)
    if algorithm == "es_d_rtrl":
        assert sequence.deferrable(learner) and sequence.deferred_bytes(learner) > 0
    run = jax.jit(functools.partial(learner.scan, chunk=3))
    state, result = run(learner.params, learner.init(), xs, targets, loss_mask=mask)
    want_state, want_grads, want_losses = _loop(learner, xs, targets, mask)
    np.testing.assert_allclose(np.asarray(result.loss), np.asarray(want_losses), rtol=RTOL_SUM)
    _assert_close(result.grads, want_grads)
    _assert_close(state, want_state)
    assert jax.tree.leaves(result.output)[0].shape[0] == STEPS


@pytest.mark.parametrize("ones", [0, STEPS])
def test_a_mask_of_no_step_or_every_step(ones):
    """No step forms a gradient (a zero sum, the states advanced as by the loop), or every step does."""
    model, (x0,), _ = zoo.ZOO["ei_net_sparse"](batch_size=2)
    learner = fusetrace.compile(model, x0, loss=_loss, algorithm="es_d_rtrl", batch_size=2)
    xs, targets, mask = _sequence(x0), jnp.full((STEPS,), 0.3), np.arange(STEPS) < ones
    want_state, want_grads, want_losses = _loop(learner, xs, targets, mask)
    state, result = jax.jit(functools.partial(learner.scan, chunk=4))(
        learner.params, learner.init(), xs, targets, loss_mask=mask
    )
    np.testing.assert_allclose(np.asarray(result.loss), np.asarray(want_losses), rtol=RTOL_SUM)
    _assert_close(state, want_state)
    if want_grads is None:
        assert all(not np.any(g) for g in _flat(result.grads))
    else:
        _assert_close(result.grads, want_grads)


def test_scan_refuses_a_ragged_sequence():
    model, (x0,), _ = zoo.ZOO["leaky_readout"](batch_size=2)
    learner = fusetrace.compile(model, x0, loss=_loss, algorithm="d_rtrl", batch_size=2)
    xs = _sequence(x0)
    with pytest.raises(fusetrace.errors.CompileError, match="lengths"):
        learner.scan(learner.params, learner.init(), xs, jnp.zeros((STEPS + 1,)))
    with pytest.raises(fusetrace.errors.CompileError, match="loss_mask"):
        learner.scan(learner.params, learner.init(), xs, jnp.zeros((STEPS,)), loss_mask=jnp.ones((STEPS, 2)))


def test_unbatched_csr_products_are_deferred_event_by_event():
    """An unbatched binary CSR product (rows: the presynaptic neurons) defers its products by default and
    contracts them event by event (`passes.events`), its sum equal to the loop of steps; contracted as
    pairs of factors ("matched": one pair per component) it is not deferred by default (slower there:
    benchmarks.md), and equals the loop either way."""
    model, x0 = _csr_event(None)
    learner = fusetrace.compile(model, x0, loss=_loss, algorithm="es_d_rtrl", batch_size=None)
    assert sequence.event_driven(learner) and sequence.deferral_pays(learner)
    assert "event by event" in learner.summary(program=False)
    model, x0 = _csr_event(None)
    matched = fusetrace.compile(model, x0, loss=_loss, algorithm="es_d_rtrl", factorisation="matched")
    assert sequence.deferrable(matched) and not sequence.event_driven(matched)
    assert not sequence.deferral_pays(matched)
    assert "taken step by step by default" in matched.summary(program=False)
    xs, targets, mask = _sequence(x0), jnp.full((STEPS,), 0.3), np.array([1, 0, 1, 1, 0, 1], bool)
    for each in (learner, matched):
        _, want, _ = _loop(each, xs, targets, mask)
        for chunk in (None, 4):
            _, result = jax.jit(functools.partial(each.scan, chunk=chunk))(
                each.params, each.init(), xs, targets, loss_mask=mask
            )
            _assert_close(result.grads, want)


class PreviousAndNewSpikes(brainstate.nn.Module):
    """Event spikes through a CSR matrix into LIF; two readouts, of LAST step's spikes (read before the layer
    advances) and of the new ones: the input weight's gradient has both a `δ·ε_t` and a `δ_prev·ε_{t-1}`
    term, which the event-driven contraction pairs across the chunk's steps and its boundary."""

    def __init__(self):
        super().__init__()
        self.layer = zoo_coverage.Layer(zoo_coverage.EventCSR(8, 12), zoo_coverage._lif(12), 12)
        self.before = brainstate.nn.Linear(12, 2)
        self.after = brainstate.nn.Linear(12, 2)

    def update(self, x):
        previous = self.before(self.layer.N.get_spike())
        return previous + self.after(self.layer(x))


@pytest.mark.parametrize("batch", [None, 2])
def test_event_driven_contraction_pairs_last_steps_factor(batch):
    zoo_coverage._begin(0)
    model = PreviousAndNewSpikes()
    brainstate.nn.init_all_states(model, batch_size=batch)
    x0 = jnp.zeros((8,) if batch is None else (batch, 8))
    learner = fusetrace.compile(model, x0, loss=_loss, algorithm="es_d_rtrl", batch_size=batch, decay=0.7)
    assert sequence.event_driven(learner) == ["layer.inp.comm.weight"]
    index = next(i for i in learner.plan.traced if learner.analysis.relations[i].weight == "layer.inp.comm.weight")
    assert prev_read_states(learner.analysis, learner.analysis.group_named(learner.analysis.relations[index].group))
    xs, targets = _sequence(x0, seed=5), jnp.full((STEPS,), 0.3)
    mask = np.array([1, 1, 0, 1, 1, 1], bool)  # a masked step inside a chunk, then chunk boundaries
    _, want, _ = _loop(learner, xs, targets, mask)
    assert np.linalg.norm(np.asarray(want["layer.inp.comm.weight"])) > 0
    for chunk in (1, 4, STEPS):
        _, result = jax.jit(functools.partial(learner.scan, chunk=chunk))(
            learner.params, learner.init(), xs, targets, loss_mask=mask
        )
        _assert_close(result.grads, want)


@pytest.mark.parametrize("batch, with_prev", [(1, True), (3, False)])
def test_the_cpu_kernel_and_the_per_step_plasticity_calls_form_the_same_sum(batch, with_prev):
    """`events.contract` takes one Numba call on the CPU (`_one_pass`, on Numba's threads or on one: the
    same result to the bit) and brainevent's plasticity kernel step by step elsewhere (`_per_step`, which
    the CPU suite would not run otherwise): both equal the chunk's sum by its definition,
    `Σ_t ε_t ⊗ now_t + ε_{t-1} ⊗ prev_t` with the filtered presynaptic factor `ε_t = α ε_{t-1} + a·u_t`
    from `ε_{-1} = start` (`x ⊗ c` the product of the connection's two ends), added to a given sum, on a
    random CSR matrix with empty rows and a start that is partly zero."""
    rng = np.random.default_rng(batch)
    n_pre, n_post, steps = 13, 11, 5
    alpha, gain = 0.8, 0.3
    dense = rng.random((n_pre, n_post)) < 0.3
    dense[[2, 7]] = False  # rows without connections
    pre, post = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum(dense.sum(1))]).astype(np.int32)
    start = rng.standard_normal((batch, n_pre)) * (rng.random((batch, n_pre)) < 0.6)
    spikes = rng.random((steps, batch, n_pre)) < 0.3
    now = rng.standard_normal((steps, batch, n_post))
    prev = rng.standard_normal((steps if with_prev else 0, batch, n_post))
    into = rng.standard_normal(len(pre))  # the sum so far, one entry per connection
    want = _chunk_sum(start, spikes, now, prev, alpha, gain)
    operands = [jnp.asarray(a) for a in (into, post.astype(np.int32), indptr, start, now, prev, spikes, [alpha, gain])]
    threaded, one = (jax.jit(functools.partial(events._one_pass, threaded=t))(*operands) for t in (True, False))
    per_step = jax.jit(
        functools.partial(events._per_step, pre=jnp.asarray(pre), post=jnp.asarray(post), shape=(n_pre, n_post))
    )(*operands)
    np.testing.assert_allclose(np.asarray(one), into + want[pre, post], rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(np.asarray(threaded), np.asarray(one))  # the same additions in the same order
    np.testing.assert_allclose(np.asarray(per_step), into + want[pre, post], rtol=1e-13, atol=1e-13)


def _chunk_sum(start, spikes, now, prev, alpha, gain) -> np.ndarray:
    """`Σ_t ε_t ⊗ now_t + ε_{t-1} ⊗ prev_t` (dense, presynaptic × postsynaptic), the presynaptic factor
    `ε_t = α ε_{t-1} + gain·spikes_t` stepped from `ε_{-1} = start`; `prev` may have no step."""
    want, trace = np.zeros((start.shape[1], now.shape[2])), start
    for t in range(now.shape[0]):
        if prev.shape[0]:
            want += np.einsum("bi,bj->ij", trace, prev[t])
        trace = alpha * trace + gain * spikes[t]
        want += np.einsum("bi,bj->ij", trace, now[t])
    return want


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(0, 40), st.integers(1, 30), st.integers(1, 6), st.integers(1, 3)),
    density=st.floats(0.0, 1.0),
    with_prev=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_threaded_kernel_splits_any_graph_into_the_same_sum(shape, density, with_prev, seed):
    """The CPU kernel on Numba's threads (`events._kernel(True)`, called directly) on random CSR graphs of
    any shape — none or every connection, empty and full rows, fewer rows than threads — equals the
    chunk's sum by its definition and the one-thread kernel to the bit."""
    n_pre, n_post, steps, batch = shape
    rng = np.random.default_rng(seed)
    dense = rng.random((n_pre, n_post)) < density
    pre, post = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum(dense.sum(1))]).astype(np.int32)
    start = rng.standard_normal((batch, n_pre))
    spikes = rng.random((steps, batch, n_pre)) < 0.5
    now = rng.standard_normal((steps, batch, n_post))
    prev = rng.standard_normal((steps if with_prev else 0, batch, n_post))
    scalars = np.asarray([0.9, 0.2])
    sums = []
    for threaded in (True, False):
        out = np.zeros(len(pre))
        events._kernel(threaded)(out, post.astype(np.int32), indptr, start, now, prev, spikes, scalars, out)
        sums.append(out)
    want = _chunk_sum(start, spikes, now, prev, 0.9, 0.2)[pre, post]
    np.testing.assert_allclose(sums[0], want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(sums[0], sums[1])


def _csr_event(batch_size):
    model, (x0,), _ = {**zoo.ZOO, **vars(zoo_coverage)}["csr_event"](batch_size=batch_size)
    return model, x0
