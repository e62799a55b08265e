"""Evidence (cue) accumulation, e-prop's task (Bellec et al. 2020, Nat. Commun. 11:3625), its reference
network (100 `Gif` neurons with a readout of their standardised potentials: `gif.GifNetwork`, since issue
16) and e-prop's own network (50 LIF + 50 ALIF neurons and a leaky readout of their spikes: the
reference network before it, and the demo's).

Trial layout at dt = 1 ms (defaults = the published definition):

    cue k (k = 0..6) active during [50 + 150k, 50 + 150k + 100) ms   -> cues end at 1,050 ms
    delay: background noise only, 1,050 ms                            -> recall starts at 2,100 ms
    recall: the last 150 ms                                            -> 2,250 ms in all

`shorten` keeps a fraction of the delay (cue timing and recall length unchanged):
delay = round(1050 · shorten) ms, length = 150 · n_cues + delay + 150.
"""

import brainpy.state as bps
import brainstate
import brainunit as u
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
from .gif import GifNetwork

DT_MS = 1.0
GROUP_SIZE = 10  # channels per group; groups in order: left, right, recall, noise
LEFT, RIGHT, RECALL, NOISE = range(4)
CUE_PERIOD_MS, CUE_ONSET_MS, CUE_MS = 150, 50, 100
DELAY_MS, RECALL_MS = 1050, 150
CUE_HZ, RECALL_HZ, NOISE_HZ = 40.0, 40.0, 10.0
P_LEFT_CHOICES = (0.3, 0.7)
IN_SCALE, REC_SCALE = 30.0, 7.5  # Kaiming variance scales: the untrained net fires at ~10 Hz


def draw_cues(rng: np.random.Generator, batch: int, n_cues: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-trial draws of `evidence_accumulation`: p_left ∈ {0.3, 0.7} with equal odds (batch,),
    then each cue left with probability p_left (batch, n_cues) bool."""
    p_left = rng.choice(np.asarray(P_LEFT_CHOICES), size=batch)
    return p_left, rng.random((batch, n_cues)) < p_left[:, None]


def evidence_accumulation(batch: int, seed: int, *, n_cues: int = 7, shorten: float = 1.0) -> Task:
    """Generate `batch` evidence-accumulation trials.

    Each trial draws p ∈ {0.3, 0.7} (equal odds); each of the `n_cues` cues is left with probability
    p, else right, and its group (10 channels) fires at 40 Hz while the cue is on. The recall group
    fires at 40 Hz during the last 150 ms; the noise group at 10 Hz throughout. The label is the
    majority side (1 = right if #right > n_cues / 2, else 0 = left); the cross-entropy counts over
    the last 150 ms only (`mask`).

    Arguments:
        batch: number of trials (>= 1).
        seed: seed of the numpy generator; equal seeds give identical tasks.
        n_cues: number of cues, odd so that a majority exists (7 in the definition).
        shorten: fraction of the 1,050 ms delay between the last cue and the recall that is kept, in
            [0, 1]; 1.0 is the exact definition.

    Returns:
        A `Task` with inputs (T, batch, 40), one-hot targets (T, batch, 2), labels (batch,) and
        `info` = {"p_left": (batch,), "cue_left": (batch, n_cues) bool, "recall_start": int}.

    Raises:
        TaskError: batch < 1, n_cues not a positive odd integer, or shorten outside [0, 1].

    Example:
        >>> task = evidence_accumulation(batch=64, seed=0)
        >>> task.inputs.shape, task.n_steps
        ((2250, 64, 40), 2250)
    """
    where = "evidence_accumulation(...)"
    batch = check_count(batch, "batch", where)
    n_cues = check_count(n_cues, "n_cues", where)
    if n_cues % 2 == 0:
        raise bad_argument(
            what=f"n_cues={n_cues}",
            where=where,
            why="the label is the majority side, so ties must not occur",
            fix="pass an odd number of cues (7 in the definition)",
        )
    if not 0.0 <= shorten <= 1.0:
        raise bad_argument(
            what=f"shorten={shorten!r}",
            where=where,
            why="it is the fraction of the 1,050 ms delay that is kept",
            fix="pass a value in [0, 1] (1.0: the published task)",
        )
    rng = np.random.default_rng(seed)
    p_left, cue_left = draw_cues(rng, batch, n_cues)
    labels = (np.sum(~cue_left, axis=1) > n_cues // 2).astype(np.int32)

    recall_start = CUE_PERIOD_MS * n_cues + round(DELAY_MS * shorten)
    n_steps = recall_start + RECALL_MS
    time = np.arange(n_steps)[:, None]
    onsets = CUE_ONSET_MS + CUE_PERIOD_MS * np.arange(n_cues)
    cue_on = ((time >= onsets) & (time < onsets + CUE_MS)).astype(np.float32)  # (T, n_cues)
    rates = np.zeros((n_steps, batch, 4), np.float32)
    rates[..., LEFT] = CUE_HZ * (cue_on @ cue_left.T.astype(np.float32))
    rates[..., RIGHT] = CUE_HZ * (cue_on @ (~cue_left).T.astype(np.float32))
    rates[recall_start:, :, RECALL] = RECALL_HZ
    rates[..., NOISE] = NOISE_HZ
    inputs = spikes(rng, np.repeat(rates, GROUP_SIZE, axis=-1), DT_MS)

    mask = np.zeros((n_steps, batch), np.float32)
    mask[recall_start:] = 1.0
    targets = np.broadcast_to(one_hot(labels, 2), (n_steps, batch, 2))
    info = {"p_left": p_left, "cue_left": cue_left, "recall_start": recall_start}
    return as_task("evidence_accumulation", inputs, targets, mask, labels, DT_MS, info)


class EvidenceNetwork(brainstate.nn.Module):
    """e-prop's recurrent network for evidence accumulation: a LIF and an ALIF population, each fed by
    the input and by the previous spikes of both, and a `LeakyRateReadout` of both populations' new
    spikes (concatenated). `update(x_t)` returns the readout (batch, n_out).

    Parameters (e-prop's): τ_v = 20 ms, threshold 0.6 mV (soft reset), ALIF τ_a = 2,000 ms, readout
    τ = 20 ms. Differences from the published network (the first two forced by the stock brainpy.state
    parts):

    * no refractory period: `bps.ALIF` has none, and `bps.LIFRef` reads the environment's clock `t`,
      which one compiled step does not advance (a constant `t` would hold a neuron that fired once
      refractory for ever), so both populations omit it;
    * currents reach the membrane through an exponential synapse (`tau_syn_ms`, 5 ms by default) since
      `AlignPostProj` needs one; e-prop adds them directly;
    * threshold adaptation as in e-prop's code and NEST's port: +β · (1 − ρ) / (1 − α) mV per spike,
      β = 1.7, ρ = e^{−dt/τ_a}, α = e^{−dt/τ_v} (0.0174 mV at dt = 1 ms);
    * self-connections (autapses) are not removed.
    """

    def __init__(self, n_in: int = 40, n_lif: int = 50, n_alif: int = 50, n_out: int = 2, tau_syn_ms: float = 5.0):
        super().__init__()
        tau_v, threshold, tau_syn = ms(20.0), mv(0.6), ms(tau_syn_ms)
        self.lif = bps.LIF(n_lif, tau=tau_v, V_th=threshold)
        self.alif = bps.ALIF(n_alif, tau=tau_v, tau_a=ms(2000.0), V_th=threshold, beta=eprop_beta(2000.0, 20.0))
        n_rec = n_lif + n_alif
        self.rec_lif = current_projection(n_rec, self.lif, n_lif, tau_syn, scale=REC_SCALE)
        self.rec_alif = current_projection(n_rec, self.alif, n_alif, tau_syn, scale=REC_SCALE)
        self.inp_lif = current_projection(n_in, self.lif, n_lif, tau_syn, scale=IN_SCALE)
        self.inp_alif = current_projection(n_in, self.alif, n_alif, tau_syn, scale=IN_SCALE)
        self.out = bps.LeakyRateReadout(n_rec, n_out, tau=ms(20.0))

    def update(self, x):
        previous = u.math.concatenate([self.lif.get_spike(), self.alif.get_spike()], axis=-1)
        self.rec_lif(previous)
        self.rec_alif(previous)
        self.inp_lif(x)
        self.inp_alif(x)
        return self.out(u.math.concatenate([self.lif(), self.alif()], axis=-1))


def evidence_network(*, seed: int | None = None, dt_ms: float = DT_MS) -> GifNetwork:
    """Build the reference network for `evidence_accumulation`: `GifNetwork(40, 100, 2)` (40 inputs, 100
    `Gif` neurons, 2 outputs; docs/tasks.md says why it replaced e-prop's LIF/ALIF network, which
    `ei_evidence_network` builds).

    Arguments:
        seed: reseeds `brainstate.random` before the weights are drawn (None: keep its state).
        dt_ms: the step; set globally in brainstate before the model is built.

    Example:
        >>> net = evidence_network(seed=0)
        >>> learner = fusetrace.compile(net, task.inputs[0], loss=cross_entropy_loss,   # doctest: +SKIP
        ...                             batch_size=task.batch_size)
    """
    begin_network(dt_ms, seed)
    return GifNetwork(40, 100, 2)


def ei_evidence_network(*, seed: int | None = None, dt_ms: float = DT_MS) -> EvidenceNetwork:
    """Build e-prop's network for `evidence_accumulation` (40 inputs, 50 LIF + 50 ALIF, 2 outputs): the
    reference network before issue 16, and the one `fusetrace demo` trains.

    Arguments:
        seed: reseeds `brainstate.random` before the weights are drawn (None: keep its state).
        dt_ms: the step; set globally in brainstate before the model is built.
    """
    begin_network(dt_ms, seed)
    return EvidenceNetwork()
