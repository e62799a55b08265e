"""The sparse weight gradient over a batch: XLA's temporary memory and the time of es_d_rtrl's step and of
a `Learner.scan` window, against the batch size, for a binary CSR projection (issue 17, item 4).

    python benchmarks/sparse_batch.py [--n 2000] [--p 0.1] [--batches 1 4 16 64] [--steps 20] [--out FILE]

Model (float32): N Poisson inputs at 10% per step through a `brainstate.nn.SparseLinear` over a random
CSR matrix (each pair connected with probability p: E ≈ p·N² connections, trainable values), fed as
events (`BinaryArray`), into an Expon synapse,
N LIF neurons, a `Linear` readout of 4; squared error every step. For each batch size B: the compiled
step's and window's temporary bytes (`memory_analysis().temp_size_in_bytes`), and their median time over
5 calls after a warm-up. A gradient formed as a B × E (or steps × B × E) array shows as temporary bytes
growing with B·E; formed one batch entry at a time, they stay at a few E.

Writes benchmarks/results/sparse_batch.json (or --out). Uses only the public API, so the same script runs
on an earlier commit for a before/after comparison (`--label`).
"""

import argparse
import json
import pathlib
import statistics
import time

import brainevent
import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

import fusetrace

N_OUT = 4


class Net(brainstate.nn.Module):
    def __init__(self, n: int, p: float):
        super().__init__()
        rng = np.random.default_rng(3)
        weights = (rng.random((n, n)) < p) * rng.uniform(0.0, 0.2, (n, n))
        csr = brainevent.CSR.fromdense(jnp.asarray(weights, jnp.float32))
        self.comm = brainstate.nn.SparseLinear(csr, in_size=(n,))
        self.syn = bps.Expon(n, tau=5.0 * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA))
        self.neuron = bps.LIF(n, tau=10.0 * u.ms, V_th=1.0 * u.mV, V_reset=0.0 * u.mV, V_rest=0.0 * u.mV)
        self.out = brainstate.nn.Linear(n, N_OUT)

    def update(self, spikes):
        current = self.comm(brainevent.BinaryArray(spikes)) * u.mA
        self.syn.add_delta_input("in", current)
        self.neuron(self.syn())
        return self.out(self.neuron.get_spike())


def loss(output, target):
    return jnp.sum((u.get_mantissa(output) - target) ** 2)


def _median_ms(function, *args) -> float:
    jax.block_until_ready(function(*args))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(n: int, p: float, batch: int, steps: int) -> dict:
    brainstate.environ.set(dt=1.0 * u.ms)
    model = Net(n, p)
    keys = jax.random.split(jax.random.PRNGKey(0), steps)
    xs = jnp.stack([(jax.random.uniform(k, (batch, n)) < 0.1).astype(jnp.float32) for k in keys])
    ys = jnp.zeros((steps, batch, N_OUT), jnp.float32)
    learner = fusetrace.compile(model, xs[0], loss=loss, algorithm="es_d_rtrl", batch_size=batch)
    params, state = learner.params, learner.init()
    step = jax.jit(learner.step)
    window = jax.jit(lambda params, state, xs, ys: learner.scan(params, state, xs, ys))
    compiled_step = step.lower(params, state, xs[0], ys[0]).compile()
    compiled_window = window.lower(params, state, xs, ys).compile()
    return {
        "batch": batch,
        "connections": int(np.size(jax.tree.leaves(model.comm.weight.value)[0])),
        "step_temp_bytes": int(compiled_step.memory_analysis().temp_size_in_bytes),
        "window_temp_bytes": int(compiled_window.memory_analysis().temp_size_in_bytes),
        "step_ms": _median_ms(compiled_step, params, state, xs[0], ys[0]),
        "window_ms_per_step": _median_ms(compiled_window, params, state, xs, ys) / steps,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--label", default="this commit")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "sparse_batch.json"
    )
    args = parser.parse_args(argv)
    rows = []
    for batch in args.batches:
        row = measure(args.n, args.p, batch, args.steps)
        rows.append(row)
        print(
            f"B={batch:3d} E={row['connections']:,}: step temp {row['step_temp_bytes'] / 2**20:8.2f} MiB, "
            f"{row['step_ms']:8.2f} ms; window temp {row['window_temp_bytes'] / 2**20:8.2f} MiB, "
            f"{row['window_ms_per_step']:8.2f} ms/step",
            flush=True,
        )
    result = {"label": args.label, "n": args.n, "p": args.p, "steps": args.steps, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
