"""Temporal XOR, a task where depth matters (`../shared/TASKS.md`), and its reference network: two
feed-forward ALIF layers and a leaky readout.

Trial layout at dt = 1 ms (the definition):

    cue 1 during [20, 70) ms, cue 2 during [100, 150) ms, response window [170, 220) ms

40 input channels in 4 groups of 10: cue-1 left, cue-1 right, cue-2 left, cue-2 right. During a cue the
chosen side's group fires at 40 Hz, the other at 2 Hz; every channel has 2 Hz background throughout.
Sides are drawn independently, 50/50; the label is 1 when they differ. Neither cue alone says anything
about the label, and it is not a linear function of the input: the network has to hold cue 1 across a
30 ms gap and combine it non-linearly with cue 2.
"""

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import numpy as np

from .base import Task, as_task, begin_network, check_count, ms, mv, one_hot, spikes

DT_MS = 1.0
GROUP_SIZE = 10  # channels per group; groups in order: cue-1 left, cue-1 right, cue-2 left, cue-2 right
CUE_1_MS, CUE_2_MS, RESPONSE_MS = (20, 70), (100, 150), (170, 220)
CUE_HZ, OTHER_HZ, BACKGROUND_HZ = 40.0, 2.0, 2.0
IN_SCALE, HIDDEN_SCALE = 100.0, 60.0  # Kaiming variance scales: the untrained layers fire at ~20 Hz during a cue


def temporal_xor(batch: int, seed: int) -> Task:
    """Generate `batch` temporal-XOR trials (220 ms at dt = 1 ms).

    Arguments:
        batch: number of trials (>= 1).
        seed: seed of the numpy generator; equal seeds give identical tasks.

    Returns:
        A `Task` with inputs (220, batch, 40), one-hot targets (220, batch, 2), labels (batch,) (1: the
        two cues' sides differ) and `info` = {"side_1": (batch,), "side_2": (batch,)} (1: right); the
        cross-entropy counts over the response window only (`mask`).

    Raises:
        TaskError: batch < 1.

    Example:
        >>> task = temporal_xor(batch=8, seed=0)
        >>> task.inputs.shape, int(task.mask.sum())
        ((220, 8, 40), 400)
    """
    batch = check_count(batch, "batch", "temporal_xor(...)")
    rng = np.random.default_rng(seed)
    sides = rng.random((2, batch)) < 0.5  # per cue, True: right
    labels = (sides[0] != sides[1]).astype(np.int32)
    n_steps = RESPONSE_MS[1]
    rates = np.full((n_steps, batch, 4), BACKGROUND_HZ, np.float32)
    for cue, (start, stop) in enumerate((CUE_1_MS, CUE_2_MS)):
        right = sides[cue]
        rates[start:stop, :, 2 * cue] = np.where(right, OTHER_HZ, CUE_HZ)
        rates[start:stop, :, 2 * cue + 1] = np.where(right, CUE_HZ, OTHER_HZ)
    inputs = spikes(rng, np.repeat(rates, GROUP_SIZE, axis=-1), DT_MS)
    mask = np.zeros((n_steps, batch), np.float32)
    mask[RESPONSE_MS[0] : RESPONSE_MS[1]] = 1.0
    targets = np.broadcast_to(one_hot(labels, 2), (n_steps, batch, 2))
    info = {"side_1": sides[0].astype(np.int32), "side_2": sides[1].astype(np.int32)}
    return as_task("temporal_xor", inputs, targets, mask, labels, DT_MS, info)


def _layer(n_in: int, n: int, post, scale: float) -> bps.AlignPostProj:
    comm = brainstate.nn.Linear(n_in, n, w_init=braintools.init.KaimingNormal(scale=scale, unit=u.mA), b_init=None)
    zero = braintools.init.Constant(u.Quantity(0.0, unit=u.mA))
    return bps.AlignPostProj(
        comm=comm, syn=bps.Expon.desc(n, tau=ms(10.0), g_initializer=zero), out=bps.CUBA.desc(scale=1.0), post=post
    )


class XorNetwork(brainstate.nn.Module):
    """The reference network for `temporal_xor`: input -> ALIF layer `l1` -> ALIF layer `l2` -> leaky
    readout, feed-forward (no recurrent weights), each layer reading the previous one's new spikes.

    ALIF: τ_m = 20 ms, τ_a = 200 ms (the adaptation carries cue 1 across the gap), threshold 1 mV, soft
    reset, adaptation +0.5 mV per spike; Expon current synapses τ = 10 ms; readout τ = 50 ms. The weights
    are `in1.comm.weight` (layer 1), `l1_l2.comm.weight` (layer 2) and `out.weight`.
    """

    def __init__(self, n_in: int = 40, n1: int = 16, n2: int = 64, n_out: int = 2):
        super().__init__()

        def alif(n):
            return bps.ALIF(n, tau=ms(20.0), tau_a=ms(200.0), V_th=mv(1.0), beta=mv(0.5))

        self.l1, self.l2 = alif(n1), alif(n2)
        self.in1 = _layer(n_in, n1, self.l1, IN_SCALE)
        self.l1_l2 = _layer(n1, n2, self.l2, HIDDEN_SCALE)
        self.out = bps.LeakyRateReadout(n2, n_out, tau=ms(50.0))

    def update(self, x):
        self.in1(x)
        self.l1_l2(self.l1())
        return self.out(self.l2())


def xor_network(*, seed: int | None = None, dt_ms: float = DT_MS, n1: int = 16, n2: int = 64) -> XorNetwork:
    """Build the reference network for `temporal_xor` (40 inputs, two ALIF layers, 2 outputs).

    Arguments:
        seed: reseeds `brainstate.random` before the weights are drawn (None: keep its state).
        dt_ms: the step; set globally in brainstate before the model is built.
        n1: the first layer's size.
        n2: the second layer's size.
    """
    begin_network(dt_ms, seed)
    return XorNetwork(n1=n1, n2=n2)
