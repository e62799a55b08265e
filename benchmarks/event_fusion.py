"""What fusing the deferred contraction's event visit into the forward's would save (issue 17, whole brain).

    python benchmarks/event_fusion.py [--steps 50] [--spikes 4000]

The whole-brain `Learner.scan` visits each step's synaptic events twice: the forward's event-driven
product (`y[j] += w[k]` over the outgoing connections k = (i, j) of every spiking i) and the contraction's
per-step update of the same connections (`G[k] += c̃[j]`, `passes/events.py`). With a forward-filtered
identity the second visit could happen inside the first, at the same step: for `ε_t = α ε_{t-1} + u_t`
and `R_t = Σ_{s<=t} α^s c_s`,

    Σ_t ε_t ⊗ c_t = (ε_0 + Σ_k α^{-k} u_k) ⊗ R_T − Σ_k α^{-k} u_k ⊗ R_{k-1},

whose second term reads only `R_{k-1}`, known when step k's forward runs. This script measures, alone,
with plain Numba loops on a random graph of the generated connectome's size (138,639 neurons, 15,091,983
connections, `--spikes` spiking neurons per step), the forward's visit, the contraction's, the two one
after the other, and the two fused into one loop (`y[j] += w[k]; G[k] -= s·R[j]`), in ms per step (best of
5 runs of `--steps` steps), and the one pass over every connection the identity needs per chunk.

`--kernel`: instead, the shipped contraction kernel (`passes/events.py`, the backward filter, the first
pass and every step's spiking rows in one call) on the same graph, per step of a `--steps` chunk: on one
thread and on Numba's threads, at `--prefetch` rows ahead (0: no prefetching).
"""

import argparse
import functools
import time

import numba
import numpy as np

N_NEURONS, N_CONNECTIONS = 138_639, 15_091_983


@numba.njit(cache=False)
def forward(spikes, indptr, indices, w, y):
    for i in range(spikes.shape[0]):
        if spikes[i]:
            for k in range(indptr[i], indptr[i + 1]):
                y[indices[k]] += w[k]


@numba.njit(cache=False)
def contraction(spikes, indptr, indices, r, g, scale):
    for i in range(spikes.shape[0]):
        if spikes[i]:
            for k in range(indptr[i], indptr[i + 1]):
                g[k] -= scale * r[indices[k]]


@numba.njit(cache=False)
def fused(spikes, indptr, indices, w, y, r, g, scale):
    for i in range(spikes.shape[0]):
        if spikes[i]:
            for k in range(indptr[i], indptr[i + 1]):
                j = indices[k]
                y[j] += w[k]
                g[k] -= scale * r[j]


@numba.njit(cache=False)
def full_pass(indptr, indices, a, r, g):
    for i in range(a.shape[0]):
        scale = a[i]
        for k in range(indptr[i], indptr[i + 1]):
            g[k] += scale * r[indices[k]]


def best_of_5(run, steps: int) -> float:
    """ms per step of `steps`, the best of 5 calls of `run()` (after one that compiles)."""
    run()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e3


def _each_step(run, steps: int) -> None:
    for t in range(steps):
        run(t)


def shipped_kernel(args, rng, indptr, indices, spikes) -> None:
    from fusetrace.passes import events

    n = N_NEURONS
    now = rng.standard_normal((args.steps, 1, n)).astype(np.float32)
    start = rng.random((1, n)).astype(np.float32)
    scalars = np.asarray([0.99, 1.0], np.float32)
    out = np.zeros(N_CONNECTIONS, np.float32)
    no_prev = np.zeros((0, 1, n), np.float32)
    events.PREFETCH_ROWS = args.prefetch
    operands = (out, indices, indptr, start, now, no_prev, spikes[:, None], scalars, out)
    for threaded in (False, True):
        events._kernel.cache_clear()
        ms = best_of_5(functools.partial(events._kernel(threaded), *operands), args.steps)
        where = "threads" if threaded else "one thread"
        print(f"shipped kernel, {where}, {args.prefetch} rows ahead: {ms:.3f} ms per step", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--spikes", type=int, default=4000)
    parser.add_argument("--kernel", action="store_true", help="time the shipped contraction kernel instead")
    parser.add_argument("--prefetch", type=int, default=4, help="with --kernel: rows ahead (0: none)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    counts = rng.multinomial(N_CONNECTIONS, np.full(N_NEURONS, 1 / N_NEURONS))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = rng.integers(0, N_NEURONS, N_CONNECTIONS).astype(np.int32)
    w = rng.standard_normal(N_CONNECTIONS).astype(np.float32)
    spikes = np.zeros((args.steps, N_NEURONS), np.bool_)
    for t in range(args.steps):
        spikes[t, rng.choice(N_NEURONS, args.spikes, replace=False)] = True
    if args.kernel:
        shipped_kernel(args, rng, indptr, indices, spikes)
        return 0
    r = rng.standard_normal((args.steps, N_NEURONS)).astype(np.float32)
    y, g = np.zeros(N_NEURONS, np.float32), np.zeros(N_CONNECTIONS, np.float32)

    def separate(t):
        forward(spikes[t], indptr, indices, w, y)
        contraction(spikes[t], indptr, indices, r[t], g, 1.0)

    runs = {
        "forward": lambda t: forward(spikes[t], indptr, indices, w, y),
        "contraction": lambda t: contraction(spikes[t], indptr, indices, r[t], g, 1.0),
        "forward, then contraction": separate,
        "fused": lambda t: fused(spikes[t], indptr, indices, w, y, r[t], g, 1.0),
    }
    for name, run in runs.items():
        ms = best_of_5(functools.partial(_each_step, run, args.steps), args.steps)
        print(f"{name}: {ms:.3f} ms per step", flush=True)
    full_pass(indptr, indices, r[0], r[1], g)
    start = time.perf_counter()
    full_pass(indptr, indices, r[0], r[1], g)
    print(f"one pass over every connection: {(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
