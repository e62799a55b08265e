"""Whole-brain scale: time and memory per simulated step of the LIF network on a GENERATED connectome with
FlyWire v783's statistics (138,639 neurons, 15,091,983 connections by default; not the real graph — see
docs/connectome.md), forward only and trained online with es_d_rtrl (gradient every step).

    python benchmarks/connectome.py [--neurons 138639] [--batch 0] [--steps 20] [--backend numba|jax_raw]
                                    [--decay 0.99] [--out FILE.json]

`--batch 0` runs unbatched states (brainevent's vector kernels); `--batch B` batched ones. Each phase
(generate the graph, build the network, compile the learner, forward steps, learning steps) reports its
wall time and the process's peak resident memory (VmHWM) after it; the step phases also report XLA's
memory analysis of the compiled program. Steps run `--steps` at a time inside one `lax.scan` (no Python
dispatch per step), after one warm-up call that compiles. A progress bar goes to stderr; one JSON line
goes to stdout (and to `--out` when given). float32.
"""

import argparse
import json
import sys
import time

import brainevent
import common
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import fusetrace
from fusetrace.leaves import leaves_from
from fusetrace.tasks import connectome, flybrain, mse_loss


def _phase(report: dict, name: str, start: float, **more) -> float:
    now = time.perf_counter()
    report[name] = {"seconds": round(now - start, 3), "peak_rss_mib": round(common.peak_rss_bytes() / 2**20, 1), **more}
    return now


def _inputs(graph, drive, batch, steps: int, seed: int = 0):
    """`steps` drive spikes at 100 Hz, the clock, and random neuropil-rate targets with the mask at 1 (so
    every step has a learning signal)."""
    rng = np.random.default_rng(seed)
    shape = (steps, *((batch,) if batch else ()), drive.shape[0])
    spikes = jnp.asarray(rng.random(shape) < 100.0 * flybrain.DT_MS * 1e-3, jnp.float32)
    targets = jnp.asarray(rng.random((*shape[:-1], graph.n_neuropils)) * 20.0, jnp.float32)
    mask = jnp.ones(shape[:-1], jnp.float32)
    return (spikes, flybrain.clock(steps)), (targets, mask)


def _forward_program(learner):
    captured = learner.analysis.captured

    @jax.jit
    def run(params, model, inputs):
        leaves = leaves_from(captured, params, model)

        def body(leaves, x):
            outputs, leaves = captured.step(captured.strip_inputs(*x), leaves)
            return leaves, outputs[0]

        leaves, outputs = jax.lax.scan(body, leaves, inputs)
        return leaves, outputs

    return run


def _learning_program(learner):
    @jax.jit
    def run(params, state, inputs, targets):
        def body(carry, step_inputs):
            state, total = carry
            x, target = step_inputs
            state, result = learner.step(params, state, x, target)
            return (state, jax.tree.map(jnp.add, total, result.grads)), result.loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        (state, grads), losses = jax.lax.scan(body, (state, zeros), (inputs, targets))
        return state, grads, losses

    return run


def _time_calls(call, args, repeats: int, bar) -> tuple[float, dict]:
    """(seconds per call, XLA memory analysis): one warm-up call (compiles), then `repeats` timed calls."""
    lowered = call.lower(*args)
    memory = common.compiled_memory(lowered)
    jax.block_until_ready(call(*args))
    bar.update(1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call(*args))
        times.append(time.perf_counter() - start)
        bar.update(1)
    return float(np.median(times)), memory


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=connectome.FLYWIRE_NEURONS)
    parser.add_argument("--edges", type=int, default=None, help="default: FlyWire's mean degree")
    parser.add_argument("--batch", type=int, default=0, help="0: unbatched states")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed call (one lax.scan)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="numba", choices=["numba", "jax_raw"])
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    common.configure(32)
    if args.backend == "jax_raw":
        brainevent.config.set_backend("cpu", "jax_raw")
    batch = args.batch or None
    report: dict = {"args": vars(args), "machine": common.machine()}
    bar = tqdm(total=4 + 2 * (1 + args.repeats), file=sys.stderr, desc="connectome benchmark")

    start = time.perf_counter()
    graph = connectome.generate_connectome(args.neurons, args.edges, seed=0)
    report["graph"] = {"neurons": graph.n_neurons, "connections": graph.n_edges, "source": graph.source}
    start = _phase(report, "generate", start)
    bar.update(1)
    drive = flybrain.drive_neurons(graph, round(flybrain.DRIVE_FRACTION * graph.n_neurons))
    network = flybrain.connectome_network(graph, drive=drive, batch_size=batch)
    start = _phase(report, "build", start)
    bar.update(1)
    inputs, targets = _inputs(graph, drive, batch, args.steps)
    first = jax.tree.map(lambda x: x[0], inputs)
    learner = fusetrace.compile(
        network, *first, loss=mse_loss, algorithm="es_d_rtrl", batch_size=batch, decay=args.decay
    )
    start = _phase(report, "compile_learner", start, trace_bytes=learner.analysis.trace_bytes("es_d_rtrl"))
    bar.update(1)

    forward = _forward_program(learner)
    seconds, memory = _time_calls(forward, (learner.params, learner.init()["model"], inputs), args.repeats, bar)
    start = _phase(report, "forward", start, ms_per_step=1e3 * seconds / args.steps, xla_memory=memory)
    if not args.skip_learning:
        learning = _learning_program(learner)
        call_args = (learner.params, learner.init(), inputs, targets)
        seconds, memory = _time_calls(learning, call_args, args.repeats, bar)
        _phase(report, "es_d_rtrl", start, ms_per_step=1e3 * seconds / args.steps, xla_memory=memory)
    bar.update(1)
    bar.close()
    line = json.dumps(report)
    print(line)
    if args.out:
        with open(args.out, "w") as file:
            file.write(line + "\n")
    return report


if __name__ == "__main__":
    main()
