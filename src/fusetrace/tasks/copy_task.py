"""The copy task and a small recurrent LIF network for it.

A sequence of lag + 20 symbols over {0..9}: ten tokens uniform in {1..8}, `lag` blanks (0), then ten
recall markers (9). The network must emit the ten tokens, in order, during the ten recall steps. One
step per symbol; the input is one-hot, so exactly one of the 10 channels spikes at every step.
"""

import numpy as np

from .base import RecurrentLIFReadout, Task, as_task, begin_network, check_count, one_hot

DT_MS = 1.0
N_SYMBOLS, N_TOKENS = 10, 10
BLANK, RECALL = 0, 9
TOKEN_RANGE = (1, 8)  # inclusive
IN_SCALE, REC_SCALE = 10.0, 2.0  # Kaiming variance scales; untrained: ~40 Hz (an input spikes every step)


def copy_task(batch: int, seed: int, lag: int) -> Task:
    """Generate `batch` copy-task sequences of length lag + 20.

    Steps [0, 10): the tokens; [10, 10 + lag): blank (0); [10 + lag, 20 + lag): recall marker (9).
    The target is one-hot over 10 classes: the token sequence during the last 10 steps, blank (class 0)
    elsewhere; `mask` is 1 on the last 10 steps only (per-step cross-entropy, `step_accuracy`).

    Arguments:
        batch: number of sequences (>= 1).
        seed: seed of the numpy generator; equal seeds give identical tasks.
        lag: blank steps between the tokens and the recall (>= 0).

    Returns:
        A `Task` with inputs (lag + 20, batch, 10), targets (lag + 20, batch, 10), no trial labels
        (each recall step has its own class) and `info` = {"tokens": (batch, 10)}.

    Raises:
        TaskError: batch < 1 or lag < 0.

    Example:
        >>> task = copy_task(batch=8, seed=0, lag=5)
        >>> task.inputs.shape
        (25, 8, 10)
    """
    where = "copy_task(...)"
    batch = check_count(batch, "batch", where)
    lag = check_count(lag, "lag", where, minimum=0)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(TOKEN_RANGE[0], TOKEN_RANGE[1] + 1, size=(batch, N_TOKENS))
    n_steps = lag + 2 * N_TOKENS
    recall_start = lag + N_TOKENS
    symbols = np.full((n_steps, batch), BLANK)
    symbols[:N_TOKENS] = tokens.T
    symbols[recall_start:] = RECALL
    wanted = np.full((n_steps, batch), BLANK)
    wanted[recall_start:] = tokens.T
    mask = np.zeros((n_steps, batch), np.float32)
    mask[recall_start:] = 1.0
    info = {"tokens": tokens}
    return as_task("copy", one_hot(symbols, N_SYMBOLS), one_hot(wanted, N_SYMBOLS), mask, None, DT_MS, info)


class CopyNetwork(RecurrentLIFReadout):
    """A small recurrent network for the copy task (not fixed by the definition): `n_rec` LIF neurons
    (τ_m = 20 ms, threshold 1 mV), exponential current synapses (τ_syn = 5 ms), and a
    `LeakyRateReadout` with a short τ = 2 ms so that consecutive recall steps can differ.
    `update(x_t)` returns the readout (batch, 10).
    """

    def __init__(self, n_in: int = N_SYMBOLS, n_rec: int = 64, n_out: int = N_SYMBOLS):
        super().__init__(n_in, n_rec, n_out, tau_m_ms=20.0, readout_tau_ms=2.0, in_scale=IN_SCALE, rec_scale=REC_SCALE)


def copy_network(*, seed: int | None = None, dt_ms: float = DT_MS) -> CopyNetwork:
    """Build the reference network for `copy_task` (10 inputs, 64 LIF, 10 outputs).

    Arguments:
        seed: reseeds `brainstate.random` before the weights are drawn (None: keep its state).
        dt_ms: the step; set globally in brainstate before the model is built.
    """
    begin_network(dt_ms, seed)
    return CopyNetwork()
