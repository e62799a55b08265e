"""Delayed match-to-sample (DMS), the long-term-dependency task of the BrainScale paper, and its
reference network (200 recurrent adaptive neurons, τ = 100 ms, τ_syn = 100 ms, τ_a = 1,500 ms).

Trial layout at dt = 1 ms: fixation (drawn per trial, uniform integer in [10, 500] ms), sample 500 ms,
delay 1,000 ms, test 500 ms. Trials are LEFT-aligned: every trial starts at step 0 with its own
fixation, so its test period is [fix + 1500, fix + 2000) and `mask` marks exactly those steps. Every
trial is padded with silence (no spikes, mask 0) after its test to the common length
T = max fixation + 2000 = 2,500 steps (fixed, whatever the draws). Left alignment keeps the trial's
variable onset relative to the network's reset; right alignment would make the padding look like more
fixation (fixation carries only background input) and so fix every trial's timing.
"""

import brainpy.state as bps
import brainstate
import jax
import numpy as np

from .base import (
    Task,
    as_task,
    bad_argument,
    begin_network,
    check_count,
    current_projection,
    eprop_beta,
    ms,
    mv,
    one_hot,
    spikes,
)

DT_MS = 1.0
N_INPUTS, N_DIRECTIONS, KAPPA = 100, 8, 3.0
SAMPLE_MS, TEST_MS = 500, 500
STIMULUS_HZ, BACKGROUND_HZ = 100.0, 1.0
NON_MATCH, MATCH = 0, 1
IN_SCALE, REC_SCALE = 3.0, 0.75  # Kaiming variance scales: the untrained net fires at ~10 Hz


def tuning(directions: np.ndarray) -> np.ndarray:
    """Von Mises tuning exp(κ (cos(θ − θ_i) − 1)) of the 100 inputs (peak 1 at the preferred
    direction θ_i = 2π i / 100) to each motion direction θ = 2π d / 8; shape (len(directions), 100)."""
    preferred = 2 * np.pi * np.arange(N_INPUTS) / N_INPUTS
    theta = 2 * np.pi * np.asarray(directions)[:, None] / N_DIRECTIONS
    return np.exp(KAPPA * (np.cos(theta - preferred) - 1.0)).astype(np.float32)


def draw_trials(rng: np.random.Generator, batch: int, fixation_ms: tuple[int, int]) -> dict[str, np.ndarray]:
    """The per-trial draws of `delayed_match_to_sample`, in its order: fixation length (uniform
    integer in the inclusive range), sample direction (uniform over 8), match (probability 1/2) and
    test direction (the sample when matching, else uniform over the 7 others). Each (batch,)."""
    fixation = rng.integers(fixation_ms[0], fixation_ms[1] + 1, size=batch)
    sample = rng.integers(0, N_DIRECTIONS, size=batch)
    labels = (rng.random(batch) < 0.5).astype(np.int32)
    other = (sample + rng.integers(1, N_DIRECTIONS, size=batch)) % N_DIRECTIONS
    test = np.where(labels == MATCH, sample, other)
    return {"fixation": fixation, "sample": sample, "test": test, "labels": labels}


def delayed_match_to_sample(
    batch: int, seed: int, *, fixation_ms: tuple[int, int] = (10, 500), delay_ms: int = 1000
) -> Task:
    """Generate `batch` DMS trials.

    A sample direction (one of 8) is shown for 500 ms, then after the delay a test direction for 500 ms;
    each trial matches with probability 1/2 (test = sample), otherwise the test is drawn uniformly from
    the 7 other directions. During a stimulus input i fires at 1 Hz + 100 Hz · tuning_i(direction),
    otherwise at the 1 Hz background; spikes are Bernoulli per step. The label (1 = match,
    0 = non-match) is read during the test period (`mask`).

    Arguments:
        batch: number of trials (>= 1).
        seed: seed of the numpy generator; equal seeds give identical tasks.
        fixation_ms: inclusive range (lo, hi) of the fixation length, drawn uniformly per trial.
        delay_ms: delay between sample and test (1,000 in the definition).

    Returns:
        A `Task` with inputs (T, batch, 100), T = fixation_ms[1] + 1000 + delay_ms, one-hot targets
        (T, batch, 2), labels (batch,) and `info` = {"sample": (batch,), "test": (batch,),
        "fixation": (batch,), "test_start": (batch,)} (directions as integers 0..7).

    Raises:
        TaskError: batch < 1, a negative delay, or a fixation range that is not 0 <= lo <= hi.

    Example:
        >>> task = delayed_match_to_sample(batch=32, seed=0)
        >>> task.inputs.shape
        (2500, 32, 100)
    """
    where = "delayed_match_to_sample(...)"
    batch = check_count(batch, "batch", where)
    delay_ms = check_count(delay_ms, "delay_ms", where, minimum=0)
    integers = len(fixation_ms) == 2 and all(isinstance(value, int) for value in fixation_ms)
    if not (integers and 0 <= fixation_ms[0] <= fixation_ms[1]):
        raise bad_argument(
            what=f"fixation_ms={fixation_ms!r}",
            where=where,
            why="it is the inclusive range of whole milliseconds the fixation length is drawn from",
            fix="pass two integers 0 <= lo <= hi (the definition: (10, 500))",
        )
    high = fixation_ms[1]
    rng = np.random.default_rng(seed)
    trials = draw_trials(rng, batch, fixation_ms)
    fixation, sample, test, labels = trials["fixation"], trials["sample"], trials["test"], trials["labels"]

    n_steps = high + SAMPLE_MS + delay_ms + TEST_MS
    time = np.arange(n_steps)[:, None]
    test_start = fixation + SAMPLE_MS + delay_ms
    sample_on = (time >= fixation) & (time < fixation + SAMPLE_MS)
    test_on = (time >= test_start) & (time < test_start + TEST_MS)
    in_trial = time < test_start + TEST_MS
    rates = np.float32(BACKGROUND_HZ) * in_trial[..., None] + np.float32(STIMULUS_HZ) * (
        sample_on[..., None] * tuning(sample)[None] + test_on[..., None] * tuning(test)[None]
    )
    inputs = spikes(rng, rates, DT_MS)
    targets = np.broadcast_to(one_hot(labels, 2), (n_steps, batch, 2))
    info = {"sample": sample, "test": test, "fixation": fixation, "test_start": test_start}
    return as_task("delayed_match_to_sample", inputs, targets, test_on, labels, DT_MS, info)


class DMSNetwork(brainstate.nn.Module):
    """The DMS reference network: `n_rec` recurrent adaptive LIF neurons (`bps.ALIF`, τ = 100 ms,
    τ_a = 1,500 ms, threshold 1 mV, threshold adaptation β = 1.7 in e-prop's convention, see
    `eprop_beta`: 0.114 mV per spike at dt = 1 ms; not fixed by the definition), input and
    recurrent currents through exponential synapses with τ_syn = 100 ms, and a `LeakyRateReadout`
    (τ = 20 ms; not fixed by the definition) of the new spikes. `update(x_t)` returns the readout.

    With `stop_recurrent_gradient=True` the recurrent spikes reach the synapses through
    `jax.lax.stop_gradient`: the dynamics are unchanged, and BPTT on this network computes exactly the
    gradient of `d_rtrl` on the plain one (tested), which keeps each neuron's own sensitivities and drops
    the paths through other neurons. Training it with BPTT shows what that truncation costs, at BPTT's
    speed.
    """

    def __init__(self, n_in: int = N_INPUTS, n_rec: int = 200, n_out: int = 2, stop_recurrent_gradient: bool = False):
        super().__init__()
        self.stop_recurrent_gradient = stop_recurrent_gradient
        beta = eprop_beta(1500.0, 100.0)
        self.neurons = bps.ALIF(n_rec, tau=ms(100.0), tau_a=ms(1500.0), V_th=mv(1.0), beta=beta)
        self.rec = current_projection(n_rec, self.neurons, n_rec, ms(100.0), scale=REC_SCALE)
        self.inp = current_projection(n_in, self.neurons, n_rec, ms(100.0), scale=IN_SCALE)
        self.out = bps.LeakyRateReadout(n_rec, n_out, tau=ms(20.0))

    def update(self, x):
        recurrent = self.neurons.get_spike()
        self.rec(jax.lax.stop_gradient(recurrent) if self.stop_recurrent_gradient else recurrent)
        self.inp(x)
        return self.out(self.neurons())


def dms_network(
    *, seed: int | None = None, dt_ms: float = DT_MS, n_rec: int = 200, stop_recurrent_gradient: bool = False
) -> DMSNetwork:
    """Build the reference network for `delayed_match_to_sample` (100 inputs, 200 ALIF, 2 outputs).

    Arguments:
        seed: reseeds `brainstate.random` before the weights are drawn (None: keep its state).
        dt_ms: the step; set globally in brainstate before the model is built.
        n_rec: number of recurrent neurons (200 in the definition).
        stop_recurrent_gradient: see `DMSNetwork` (BPTT on it equals d_rtrl on the plain network).
    """
    begin_network(dt_ms, seed)
    return DMSNetwork(n_rec=n_rec, stop_recurrent_gradient=stop_recurrent_gradient)
