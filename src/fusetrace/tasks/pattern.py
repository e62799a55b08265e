"""Pattern generation, e-prop's regression task, and its reference network (100 recurrent LIF,
τ_m = 30 ms, leaky readout τ = 30 ms).

The input is a frozen Poisson pattern: the same seed gives the same input and target, so training on
`pattern_generation(seed)` over and over is e-prop's setting. Time origin: step n is at t = n · dt.
"""

import numpy as np

from .base import RecurrentLIFReadout, Task, as_task, begin_network, check_count, spikes

DT_MS = 1.0
INPUT_HZ = 50.0
PERIODS_MS = (1000.0, 500.0, 333.0, 200.0)
AMPLITUDE_RANGE, PHASE_RANGE = (0.5, 2.0), (0.0, 2 * np.pi)
IN_SCALE, REC_SCALE = 15.0, 3.0  # Kaiming variance scales: the untrained net fires at ~10 Hz


def pattern_generation(seed: int, *, batch: int = 1, n_in: int = 100, duration_ms: int = 1000) -> Task:
    """Generate the pattern-generation task: frozen 50 Hz Poisson input, target a sum of four sines.

    target(t) = Σ_k A_k sin(2π t / P_k + φ_k), P = (1000, 500, 333, 200) ms, A_k ~ U(0.5, 2),
    φ_k ~ U(0, 2π), not normalised. The mask is 1 at every step (loss ½ Σ err², `mse_loss`).

    Arguments:
        seed: seed of the numpy generator; equal seeds give identical tasks.
        batch: independent patterns (each its own input, amplitudes and phases); 1 in the definition.
        n_in: input channels (100 in the definition).
        duration_ms: length (1,000 in the definition).

    Returns:
        A `Task` with inputs (T, batch, n_in), targets (T, batch, 1), no labels and `info` =
        {"amplitudes": (batch, 4), "phases": (batch, 4), "periods_ms": (4,)}.

    Raises:
        TaskError: batch, n_in or duration_ms < 1.

    Example:
        >>> task = pattern_generation(seed=0)
        >>> task.inputs.shape, task.targets.shape
        ((1000, 1, 100), (1000, 1, 1))
    """
    where = "pattern_generation(...)"
    batch = check_count(batch, "batch", where)
    n_in = check_count(n_in, "n_in", where)
    n_steps = check_count(duration_ms, "duration_ms", where)
    rng = np.random.default_rng(seed)
    inputs = spikes(rng, np.full((n_steps, batch, n_in), INPUT_HZ), DT_MS)
    amplitudes = rng.uniform(*AMPLITUDE_RANGE, size=(batch, len(PERIODS_MS)))
    phases = rng.uniform(*PHASE_RANGE, size=(batch, len(PERIODS_MS)))
    time_ms = DT_MS * np.arange(n_steps)[:, None, None]
    periods = np.asarray(PERIODS_MS)
    target = np.sum(amplitudes * np.sin(2 * np.pi * time_ms / periods + phases), axis=-1, keepdims=True)
    info = {"amplitudes": amplitudes, "phases": phases, "periods_ms": periods}
    return as_task("pattern_generation", inputs, target, np.ones((n_steps, batch)), None, DT_MS, info)


class PatternNetwork(RecurrentLIFReadout):
    """e-prop's pattern-generation network: `n_rec` recurrent LIF neurons (τ_m = 30 ms, threshold
    1 mV, soft reset), input and recurrent currents through exponential synapses (τ_syn = 5 ms: the
    stock `AlignPostProj` needs one; e-prop adds currents directly), and a `LeakyRateReadout`
    (τ = 30 ms) of the new spikes. `update(x_t)` returns the readout (batch, n_out).
    """

    def __init__(self, n_in: int = 100, n_rec: int = 100, n_out: int = 1):
        super().__init__(n_in, n_rec, n_out, tau_m_ms=30.0, readout_tau_ms=30.0, in_scale=IN_SCALE, rec_scale=REC_SCALE)


def pattern_network(*, seed: int | None = None, dt_ms: float = DT_MS) -> PatternNetwork:
    """Build the reference network for `pattern_generation` (100 inputs, 100 LIF, 1 output).

    Arguments:
        seed: reseeds `brainstate.random` before the weights are drawn (None: keep its state).
        dt_ms: the step; set globally in brainstate before the model is built.
    """
    begin_network(dt_ms, seed)
    return PatternNetwork()
