"""The generated tasks against their definitions (TASKS.md, docs/tasks.md), and the reference networks
against fusetrace.

Spikes are checked against expected-rate maps the tests write out on their own, trial by trial, from
the definition. Where the expected rate is 0 there must be no spike at all. Elsewhere spikes are
counted in cells (a partition of the elements, e.g. by input group and time step, or by group and
rate): a cell's count is a sum of independent Bernoulli draws with mean λ = Σ rate · dt. Each count
must lie inside the two-sided Poisson(λ) interval of level P_FALSE / (number of cells) (Poisson's
variance λ ≥ Σ p (1 − p): slightly conservative for these p ≤ 0.1), and over the cells with λ >= 5 the
chi-square statistic Σ (count − λ)² / Σ p (1 − p) must have a p-value above P_FALSE. Partitions by
time step pin the timing (a step missing from a window leaves a cell with λ > 40 empty); partitions by
rate pin the levels (smallest detectable error: a few percent on the 40 Hz groups).
"""

import math

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import fusetrace
from fusetrace import tasks
from fusetrace.tasks import base as base_module
from fusetrace.tasks import dms as dms_module
from fusetrace.tasks import evidence as evidence_module
from references import state_grad

P_FALSE = 1e-6  # a correct generator fails one statistical check with probability below this
Z = float(stats.norm.isf(P_FALSE / 2))  # ~4.9 standard errors, two-sided, for means of many draws
MIN_CHI2_MEAN = 5.0  # cells expecting fewer spikes stay out of the chi-square (its approximation)
ATOL_F32 = 1e-5  # targets are computed in float64 and stored as float32
DT_S = 1e-3


@pytest.fixture(autouse=True)
def _restore_dt():
    """The network factories set brainstate's global dt; leave it as we found it."""
    before = brainstate.environ.get("dt", default=None)
    yield
    if before is not None:
        brainstate.environ.set(dt=before)


def _np(x) -> np.ndarray:
    return np.asarray(x)


def _assert_spikes(spikes: np.ndarray, expected_hz: np.ndarray, *partitions: np.ndarray):
    """0/1 spikes, none where the expected rate is 0, and the counts of every partition's cells within
    the Poisson interval and the chi-square bound of the module docstring."""
    assert spikes.shape == expected_hz.shape
    assert set(np.unique(spikes)) <= {0.0, 1.0}
    assert not np.any(spikes[expected_hz == 0.0]), "spikes where the definition has no input"
    p = (expected_hz * DT_S).ravel()
    for cells in partitions:
        labels = np.broadcast_to(cells, spikes.shape).ravel()
        count = np.bincount(labels, weights=spikes.ravel())
        mean = np.bincount(labels, weights=p, minlength=count.size)
        variance = np.bincount(labels, weights=p * (1 - p), minlength=count.size)
        live = mean > 0
        alpha = P_FALSE / (2 * live.sum())
        low = stats.poisson.cdf(count[live], mean[live]) <= alpha
        high = stats.poisson.sf(count[live] - 1, mean[live]) <= alpha
        bad = np.flatnonzero(live)[low | high]
        assert bad.size == 0, f"cells {bad[:5]}: counts {count[bad[:5]]}, expected {mean[bad[:5]]}"
        big = mean >= MIN_CHI2_MEAN
        if not big.any():
            continue
        statistic = np.sum((count[big] - mean[big]) ** 2 / variance[big])
        assert stats.chi2.sf(statistic, big.sum()) > P_FALSE, (statistic, big.sum())


def _rate_cells(expected_hz: np.ndarray, groups: np.ndarray | int = 0) -> np.ndarray:
    """Cells = (group, distinct expected rate)."""
    levels = np.unique(expected_hz[::97])  # the maps hold few distinct rates: find them on a sample
    if not np.isin(expected_hz, levels).all():
        levels = np.unique(expected_hz)
    return np.searchsorted(levels, expected_hz) * (np.max(groups) + 1) + groups


def _assert_bernoulli_mean(values: np.ndarray, p: float):
    assert abs(values.mean() - p) < Z * math.sqrt(p * (1 - p) / values.size), (values.mean(), p)


# --------------------------------------------------------------------------- evidence accumulation


def _evidence_rates(cue_left: np.ndarray, n_steps: int, recall_start: int) -> np.ndarray:
    """The definition, written out per trial and per cue: (time, batch, 40) in Hz."""
    batch, n_cues = cue_left.shape
    rates = np.zeros((n_steps, batch, 4))
    for b in range(batch):
        for k in range(n_cues):
            group = 0 if cue_left[b, k] else 1
            rates[50 + 150 * k : 50 + 150 * k + 100, b, group] = 40.0
    rates[recall_start:, :, 2] = 40.0
    rates[:, :, 3] = 10.0
    return np.repeat(rates, 10, axis=-1)


def test_evidence_layout_labels_and_mask():
    task = tasks.evidence_accumulation(batch=32, seed=3)
    assert task.inputs.shape == (2250, 32, 40) and task.inputs.dtype == jnp.float32
    assert task.targets.shape == (2250, 32, 2) and task.dt_ms == 1.0
    cue_left, p_left = task.info["cue_left"], task.info["p_left"]
    assert cue_left.shape == (32, 7) and set(np.unique(p_left)) <= {0.3, 0.7}
    np.testing.assert_array_equal(_np(task.labels), (np.sum(~cue_left, axis=1) > 3).astype(int))
    assert task.info["recall_start"] == 2100
    np.testing.assert_array_equal(_np(task.mask), np.repeat((np.arange(2250) >= 2100)[:, None], 32, 1))
    np.testing.assert_array_equal(_np(task.targets), np.broadcast_to(np.eye(2)[_np(task.labels)], (2250, 32, 2)))


def _evidence_cells(expected_hz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group, time step) cells for the timing and (group, rate) cells for the levels."""
    n_steps = expected_hz.shape[0]
    group = np.arange(40) // 10
    by_time = np.arange(n_steps)[:, None, None] * 4 + group
    return by_time, _rate_cells(expected_hz, group)


def test_evidence_cue_timing_and_group_rates():
    task = tasks.evidence_accumulation(batch=256, seed=0)
    expected = _evidence_rates(task.info["cue_left"], task.n_steps, task.info["recall_start"])
    _assert_spikes(_np(task.inputs), expected, *_evidence_cells(expected))


def test_evidence_cue_sides_follow_p():
    p_left, cue_left = evidence_module.draw_cues(np.random.default_rng(1), 20000, 7)
    _assert_bernoulli_mean(p_left == 0.3, 0.5)
    for p in (0.3, 0.7):
        _assert_bernoulli_mean(cue_left[p_left == p], p)


def test_evidence_shortened_keeps_cues_and_recall():
    for shorten, recall_start in [(0.2, 1050 + 210), (0.0, 1050)]:
        task = tasks.evidence_accumulation(batch=64, seed=2, shorten=shorten)
        assert task.n_steps == recall_start + 150 and task.info["recall_start"] == recall_start
        assert float(jnp.sum(task.mask)) == 150 * 64
        expected = _evidence_rates(task.info["cue_left"], task.n_steps, recall_start)
        _assert_spikes(_np(task.inputs), expected, *_evidence_cells(expected))


@pytest.mark.parametrize(
    "kwargs", [{"batch": 0}, {"batch": 2.5}, {"n_cues": 6}, {"n_cues": 0}, {"shorten": 1.5}, {"shorten": -0.1}]
)
def test_evidence_rejects_bad_arguments(kwargs):
    arguments = {"batch": 4, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match="evidence_accumulation"):
        tasks.evidence_accumulation(**arguments)


# --------------------------------------------------------------------------- delayed match-to-sample


def _von_mises(direction: int) -> np.ndarray:
    preferred = np.linspace(0.0, 2 * np.pi, 100, endpoint=False)
    return np.exp(3.0 * (np.cos(2 * np.pi * direction / 8 - preferred) - 1.0))


def _dms_rates(info: dict, n_steps: int) -> np.ndarray:
    batch = len(info["sample"])
    rates = np.zeros((n_steps, batch, 100))
    for b in range(batch):
        fixation = int(info["fixation"][b])
        rates[: fixation + 2000, b] = 1.0
        rates[fixation : fixation + 500, b] += 100.0 * _von_mises(info["sample"][b])
        rates[fixation + 1500 : fixation + 2000, b] += 100.0 * _von_mises(info["test"][b])
    return rates


def test_dms_layout_mask_and_labels():
    task = tasks.delayed_match_to_sample(batch=64, seed=0)
    info = task.info
    assert task.inputs.shape == (2500, 64, 100) and task.targets.shape == (2500, 64, 2)
    assert np.all((info["fixation"] >= 10) & (info["fixation"] <= 500))
    np.testing.assert_array_equal(_np(task.labels), (info["sample"] == info["test"]).astype(int))
    for b in range(64):
        expected = (np.arange(2500) >= info["fixation"][b] + 1500) & (np.arange(2500) < info["fixation"][b] + 2000)
        np.testing.assert_array_equal(_np(task.mask[:, b]), expected)


def test_dms_rates_follow_the_tuning():
    """Cells: the distinct rates (the tuning curves and the background), and the time since each trial's
    sample onset (pooled over trials and inputs: the window edges)."""
    task = tasks.delayed_match_to_sample(batch=48, seed=1)
    expected = _dms_rates(task.info, task.n_steps)
    since_onset = np.arange(task.n_steps)[:, None] - task.info["fixation"] + 500  # >= 0
    _assert_spikes(_np(task.inputs), expected, _rate_cells(expected), since_onset[..., None])


def test_dms_population_vector_points_at_the_stimulus():
    """Decoding each stimulus window's spike counts (population vector over the preferred directions)
    recovers the shown direction in every trial: the tuning peaks at the stimulus direction."""
    task = tasks.delayed_match_to_sample(batch=32, seed=2)
    inputs, info = _np(task.inputs), task.info
    preferred = np.linspace(0.0, 2 * np.pi, 100, endpoint=False)
    for b in range(32):
        for start, direction in [(info["fixation"][b], info["sample"][b]), (info["test_start"][b], info["test"][b])]:
            counts = inputs[start : start + 500, b].sum(axis=0)
            angle = np.angle(np.sum(counts * np.exp(1j * preferred)))
            assert round(angle / (2 * np.pi / 8)) % 8 == direction


def test_dms_trial_draws():
    """Match with probability 1/2; non-match test directions uniform over the 7 others; fixation
    uniform over the inclusive range."""
    trials = dms_module.draw_trials(np.random.default_rng(0), 20000, (10, 500))
    match = trials["sample"] == trials["test"]
    np.testing.assert_array_equal(match, trials["labels"] == 1)
    _assert_bernoulli_mean(match, 0.5)
    offsets = ((trials["test"] - trials["sample"]) % 8)[~match]
    for offset in range(1, 8):
        _assert_bernoulli_mean(offsets == offset, 1 / 7)
    fixation = trials["fixation"]
    assert fixation.min() == 10 and fixation.max() == 500
    standard_error = math.sqrt((491**2 - 1) / 12 / fixation.size)
    assert abs(fixation.mean() - 255.0) < Z * standard_error


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"fixation_ms": (20, 10)}, {"fixation_ms": (1.5, 10)}])
def test_dms_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="delayed_match_to_sample"):
        tasks.delayed_match_to_sample(**{"batch": 2, "seed": 0, **kwargs})


# --------------------------------------------------------------------------- pattern generation


def test_pattern_target_formula_and_input_rate():
    task = tasks.pattern_generation(seed=4)
    assert task.inputs.shape == (1000, 1, 100) and task.targets.shape == (1000, 1, 1)
    assert task.labels is None and np.all(_np(task.mask) == 1.0)
    amplitudes, phases = task.info["amplitudes"][0], task.info["phases"][0]
    assert np.all((amplitudes >= 0.5) & (amplitudes <= 2.0)) and np.all((phases >= 0) & (phases < 2 * np.pi))
    t_ms = np.arange(1000.0)
    expected = sum(
        a * np.sin(2 * np.pi * t_ms / period + phi)
        for a, phi, period in zip(amplitudes, phases, (1000.0, 500.0, 333.0, 200.0), strict=True)
    )
    np.testing.assert_allclose(_np(task.targets[:, 0, 0]), expected, atol=ATOL_F32)
    steps, channels = np.arange(1000)[:, None, None], np.arange(100)
    _assert_spikes(_np(task.inputs), np.full((1000, 1, 100), 50.0), steps, channels)


def test_pattern_amplitude_and_phase_distributions():
    task = tasks.pattern_generation(seed=5, batch=4000, n_in=1, duration_ms=1)
    amplitudes, phases = task.info["amplitudes"], task.info["phases"]
    for values, (low, high) in [(amplitudes, (0.5, 2.0)), (phases, (0.0, 2 * np.pi))]:
        standard_error = (high - low) / math.sqrt(12 * values.size)
        assert abs(values.mean() - (low + high) / 2) < Z * standard_error


# --------------------------------------------------------------------------- copy task


@pytest.mark.parametrize("lag", [0, 7])
def test_copy_structure(lag):
    task = tasks.copy_task(batch=16, seed=0, lag=lag)
    tokens = task.info["tokens"]
    assert task.inputs.shape == (lag + 20, 16, 10) and task.targets.shape == (lag + 20, 16, 10)
    np.testing.assert_array_equal(_np(task.inputs).sum(-1), 1.0)  # one-hot: one channel per step
    symbols = np.argmax(_np(task.inputs), -1)
    np.testing.assert_array_equal(symbols[:10], tokens.T)
    np.testing.assert_array_equal(symbols[10 : 10 + lag], 0)
    np.testing.assert_array_equal(symbols[10 + lag :], 9)
    wanted = np.argmax(_np(task.targets), -1)
    np.testing.assert_array_equal(wanted[-10:], tokens.T)
    np.testing.assert_array_equal(wanted[:-10], 0)
    np.testing.assert_array_equal(_np(task.mask), (np.arange(lag + 20) >= lag + 10)[:, None] * np.ones(16))
    assert task.labels is None


def test_copy_tokens_uniform_over_one_to_eight():
    tokens = tasks.copy_task(batch=2000, seed=1, lag=0).info["tokens"]
    assert tokens.min() == 1 and tokens.max() == 8
    for token in range(1, 9):
        _assert_bernoulli_mean(tokens == token, 1 / 8)


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"lag": -1}])
def test_copy_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="copy_task"):
        tasks.copy_task(**{"batch": 2, "seed": 0, "lag": 3, **kwargs})


# --------------------------------------------------------------------------- shared behaviour

GENERATORS = {
    "evidence": lambda seed: tasks.evidence_accumulation(batch=4, seed=seed, shorten=0.1),
    "dms": lambda seed: tasks.delayed_match_to_sample(batch=4, seed=seed, delay_ms=100),
    "pattern": lambda seed: tasks.pattern_generation(seed=seed, batch=2),
    "copy": lambda seed: tasks.copy_task(batch=4, seed=seed, lag=5),
    "xor": lambda seed: tasks.temporal_xor(batch=4, seed=seed),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_same_task_other_seed_differs(name):
    first, again, other = (GENERATORS[name](seed) for seed in (11, 11, 12))
    for field in ("inputs", "targets", "mask"):
        np.testing.assert_array_equal(_np(getattr(first, field)), _np(getattr(again, field)))
    assert not np.array_equal(_np(first.inputs), _np(other.inputs))
    assert first.inputs.dtype == first.targets.dtype == first.mask.dtype == jnp.float32


def test_task_rejects_inconsistent_shapes():
    ones = jnp.ones((5, 2, 3))
    with pytest.raises(tasks.TaskError, match="mask"):
        tasks.Task("bad", ones, ones, jnp.ones((5, 3)), None, 1.0)
    with pytest.raises(ValueError, match="labels"):
        tasks.Task("bad", ones, ones, jnp.ones((5, 2)), jnp.zeros(3, jnp.int32), 1.0)


def test_a_rate_above_one_spike_per_step_is_an_error():
    with pytest.raises(tasks.TaskError, match="rate"):
        base_module.spikes(np.random.default_rng(0), np.array([1500.0]), dt_ms=1.0)


def test_losses_are_masked_sums_over_the_batch():
    output = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    target = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mask = jnp.array([1.0, 1.0, 0.0])
    by_hand = -(2.0 - math.log(math.exp(2.0) + 1.0)) - (0.0 - math.log(1.0 + math.e))
    assert float(tasks.cross_entropy_loss(output, (target, mask))) == pytest.approx(by_hand, rel=1e-12)
    assert float(tasks.mse_loss(output, (target, mask))) == pytest.approx(0.5 * (1.0 + 0.0 + 1.0 + 1.0), rel=1e-12)
    assert float(tasks.cross_entropy_loss(output, (target, jnp.zeros(3)))) == 0.0


def test_accuracy_reads_the_masked_period():
    task = tasks.evidence_accumulation(batch=8, seed=0, shorten=0.0)
    right = task.targets * task.mask[..., None]
    assert float(tasks.accuracy(right, task)) == 1.0
    assert float(tasks.accuracy(right[..., ::-1], task)) == 0.0
    # the unmasked steps do not count, however loud
    assert float(tasks.accuracy(right + 100.0 * (1 - task.mask[..., None]) * right[..., ::-1], task)) == 1.0
    copy = tasks.copy_task(batch=4, seed=0, lag=2)
    assert float(tasks.step_accuracy(copy.targets, copy)) == 1.0
    with pytest.raises(ValueError, match="step_accuracy"):
        tasks.accuracy(copy.targets, copy)
    with pytest.raises(ValueError, match="differ"):
        tasks.accuracy(right[:-1], task)


# --------------------------------------------------------------------------- temporal XOR


def _xor_rates(side_1: np.ndarray, side_2: np.ndarray) -> np.ndarray:
    """TASKS.md's definition, written out per trial: (220, batch, 40) in Hz."""
    batch = side_1.size
    rates = np.full((220, batch, 4), 2.0)
    for b in range(batch):
        for cue, (start, stop), right in ((0, (20, 70), side_1[b]), (1, (100, 150), side_2[b])):
            rates[start:stop, b, 2 * cue + int(right)] = 40.0
    return np.repeat(rates, 10, axis=-1)


def test_xor_layout_labels_rates_and_mask():
    task = tasks.temporal_xor(batch=256, seed=3)
    side_1, side_2 = _np(task.info["side_1"]), _np(task.info["side_2"])
    assert task.inputs.shape == (220, 256, 40) and task.targets.shape == (220, 256, 2)
    np.testing.assert_array_equal(_np(task.labels), (side_1 != side_2).astype(int))
    _assert_bernoulli_mean(side_1.astype(float), 0.5)
    _assert_bernoulli_mean((side_1 == side_2).astype(float), 0.5)  # independent sides
    mask = _np(task.mask)
    assert mask[170:].all() and not mask[:170].any()
    expected = _xor_rates(side_1, side_2)
    time = np.arange(220)[:, None, None]
    group = np.arange(40)[None, None, :] // 10
    _assert_spikes(_np(task.inputs), expected, time * 4 + group, _rate_cells(expected, group))


# --------------------------------------------------------------------------- networks and registry

BATCH = 2
SHORT = {"evidence": {"shorten": 0.0}, "dms": {"delay_ms": 0, "fixation_ms": (10, 20)}, "copy": {"lag": 2}}
N_OUT = {"evidence": 2, "dms": 2, "pattern": 1, "copy": 10, "xor": 2}


@pytest.mark.parametrize("name", sorted(tasks.REGISTRY))
def test_reference_network_compiles_and_steps(name):
    spec = tasks.REGISTRY[name]
    brainstate.environ.set(dt=spec.dt_ms * u.ms)
    brainstate.random.seed(0)
    model = spec.network()
    batch = spec.sample(batch=BATCH, seed=0, **SHORT.get(name, {}))
    last_target = jax.tree.map(lambda a: a[-1], batch.targets)  # a step where the mask is 1
    learner = fusetrace.compile(
        model, batch.inputs[-1], loss=spec.loss, algorithm="es_d_rtrl", batch_size=BATCH, example_target=last_target
    )
    assert all(r.status == "traced" for r in learner.analysis.relations), learner.summary()
    _, result = jax.jit(learner.step)(learner.params, learner.init(), batch.inputs[-1], last_target)
    assert result.output.shape == (BATCH, N_OUT[name])
    assert np.isfinite(float(result.loss))
    assert all(np.all(np.isfinite(_np(u.get_mantissa(g)))) for g in jax.tree.leaves(result.grads))
    assert set(spec.metric(jnp.zeros_like(batch.task.targets), batch)) <= {"accuracy", "normalised_mse"}


# seed 3's initial weights of `benchmarks.peer_networks:gif_evidence_network` as its code before the network
# moved into the package drew them (commit 320e3e0, in the suite's float64): (path, sum, first two entries)
GIF_EVIDENCE_SEED3 = {
    ("inp", "comm", "weight"): (9.004715437825922, (-0.487361261965851, -0.6263859240153085)),
    ("out", "weight"): (-0.0980049122514921, (0.02850994588691471, -0.23205146863414616)),
    ("rec", "comm", "weight"): (9.056444114573354, (-0.15933656253521788, -0.1334741974863688)),
}
GIF_EVIDENCE_SEED3_K2_SUM = 0.16183277967220744  # Σ 1/τ_I2 (per ms)


def test_evidence_reference_network_is_the_gif_design_with_its_draws():
    """`evidence_network` is `GifNetwork(40, 100, 2)` with the draws of the GIF runs made before it became the
    reference (so their commands and seeds carry over); its readout is traced from the standardised
    potentials of the 100 neurons, and `Gif`'s four states and the synapse's current are one group."""
    net = tasks.evidence_network(seed=3)
    assert isinstance(net, tasks.GifNetwork)
    weights = {
        path: np.asarray(
            _np(u.get_mantissa(state.value["weight"] if isinstance(state.value, dict) else state.value)), np.float64
        )
        for path, state in net.states(brainstate.ParamState).items()
    }
    assert set(weights) == set(GIF_EVIDENCE_SEED3)
    for path, (total, first) in GIF_EVIDENCE_SEED3.items():
        np.testing.assert_allclose(weights[path].sum(), total, rtol=1e-12, err_msg=str(path))
        np.testing.assert_allclose(weights[path].ravel()[:2], first, rtol=1e-12, err_msg=str(path))
    np.testing.assert_allclose(np.sum(_np(u.get_mantissa(net.neurons.k2))), GIF_EVIDENCE_SEED3_K2_SUM, rtol=1e-12)
    task = tasks.evidence_accumulation(batch=BATCH, seed=0, shorten=0.0)
    analysis = fusetrace.analyze(net, task.inputs[0], batch_size=BATCH)
    (readout,) = analysis.relations_of("out.weight")
    assert readout.status == "traced" and readout.n_pre == 100
    assert sorted(len(group.leaves) for group in analysis.groups) == [1, 5]  # readout {r}; Gif {V, I1, I2, V_th, g}


def test_evidence_readout_reads_both_populations():
    """e-prop's network (`ei_evidence_network`, the demo's): the readout is traced from the concatenated new
    spikes of the LIF and the ALIF population."""
    net = tasks.ei_evidence_network(seed=0)
    task = tasks.evidence_accumulation(batch=BATCH, seed=0, shorten=0.0)
    analysis = fusetrace.analyze(net, task.inputs[0], batch_size=BATCH)
    (readout,) = analysis.relations_of("out.weight")
    assert readout.status == "traced" and readout.n_pre == 100
    assert len(analysis.groups) == 3  # LIF {V, g}, ALIF {V, a, g}, readout {r}


def _lively_dms_network(stop_recurrent_gradient: bool):
    """A small DMS reference network with weights scaled up so that its neurons spike and adapt."""
    net = tasks.dms_network(seed=0, n_rec=12, stop_recurrent_gradient=stop_recurrent_gradient)
    for weight in net.states(brainstate.ParamState).values():
        weight.value = jax.tree.map(lambda w: 3.0 * w, weight.value)
    brainstate.nn.init_all_states(net, batch_size=BATCH)
    return net


def _brainstate_bptt(net, task) -> dict:
    """{path: weight gradient} of the summed masked cross-entropy, by BPTT through the brainstate model."""

    def sequence_loss():
        step = lambda x, y: tasks.cross_entropy_loss(net.update(x), y)
        return jnp.sum(brainstate.transform.for_loop(step, task.inputs, task.step_targets()))

    grads = state_grad(sequence_loss, net.states(brainstate.ParamState))
    return {".".join(map(str, path)): _np(u.get_mantissa(jax.tree.leaves(g)[0])) for path, g in grads.items()}


def test_dms_d_rtrl_equals_bptt_with_recurrent_spike_gradients_stopped():
    """On the DMS reference network (adaptive neurons, recurrent exponential synapses), d_rtrl's
    summed online gradient is BPTT's through the same network with its recurrent spikes detached
    (each neuron's own sensitivities exact, the paths through other neurons dropped), and differs
    from full BPTT's. The BPTT references run the brainstate model itself."""
    brainstate.environ.set(dt=1.0 * u.ms)
    task = tasks.delayed_match_to_sample(batch=BATCH, seed=3, fixation_ms=(10, 20), delay_ms=60)
    targets = task.step_targets()
    counter = _lively_dms_network(False)
    spikes = brainstate.transform.for_loop(lambda x: (counter.update(x), counter.neurons.get_spike())[1], task.inputs)
    assert float(jnp.mean(spikes)) > 0.01, "too few spikes: the recurrent paths would be empty"

    learner = fusetrace.compile(
        _lively_dms_network(False),
        task.inputs[0],
        loss=tasks.cross_entropy_loss,
        algorithm="d_rtrl",
        batch_size=BATCH,
        example_target=jax.tree.map(lambda a: a[0], targets),
    )
    step, state, online = jax.jit(learner.step), learner.init(), None
    for x, target in zip(task.inputs, zip(*targets, strict=True), strict=True):
        state, result = step(learner.params, state, x, target)
        online = result.grads if online is None else jax.tree.map(jnp.add, online, result.grads)

    truncated = _brainstate_bptt(_lively_dms_network(True), task)
    full = _brainstate_bptt(_lively_dms_network(False), task)
    assert set(online) == set(truncated)
    for path, want in truncated.items():
        got = _np(u.get_mantissa(jax.tree.leaves(online[path])[0]))
        assert np.linalg.norm(want) > 0, path
        assert np.linalg.norm(got - want) <= 1e-10 * np.linalg.norm(want), path  # float64: ~1e-14 measured
    gap = np.linalg.norm(full["rec.comm.weight"] - truncated["rec.comm.weight"])
    assert gap > 1e-2 * np.linalg.norm(truncated["rec.comm.weight"]), "the truncation dropped nothing"
