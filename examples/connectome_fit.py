"""Fit neuropil firing rates of a connectome-wired LIF network online with fusetrace (es_d_rtrl).

The graph is GENERATED with the statistics of FlyWire v783 (not the real fly connectome; pass
`--connections FILE.csv [--neuropils FILE.csv]` to use a real one, columns `pre,post,weight` and
`neuron,neuropil`). The targets are the neuropil rates of the same network with perturbed weights (a
lognormal gain per postsynaptic neuropil) under the same Poisson drive, read every 10 ms: the teacher's
weights are a known optimum, and the distance to them is printed beside the loss. Every trial is a fresh
batch; Adam updates the connection weights after every read-out (fully online, memory constant in time).

    python examples/connectome_fit.py [--neurons 5000] [--batch 2] [--iterations 20] [--duration-ms 100]

Docs: docs/connectome.md. About 5 s per iteration at the defaults on 2 CPU cores.
"""

import argparse

import brainevent
import brainstate
import jax
import optax
from tqdm import tqdm

import fusetrace
import fusetrace.trainer
from fusetrace.tasks import generate_connectome, load_connectome, mse_loss, rate_fit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=5_000, help="size of the generated graph")
    parser.add_argument("--connections", default=None, help="a real connectome: CSV with pre,post,weight")
    parser.add_argument("--neuropils", default=None, help="its labels: CSV with neuron,neuropil")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--duration-ms", type=float, default=100.0)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--decay", type=float, default=0.99, help="es_d_rtrl's smoothing factor per 0.2 ms step")
    parser.add_argument("--backend", default="jax_raw", choices=["jax_raw", "numba"], help="brainevent's CPU kernels")
    args = parser.parse_args(argv)

    brainstate.environ.set(precision=32)
    brainevent.config.set_backend("cpu", args.backend)
    if args.connections:
        graph = load_connectome(args.connections, neuropils=args.neuropils)
    else:
        graph = generate_connectome(args.neurons, seed=0)
    print(f"{graph.source}: {graph.n_neurons:,} neurons, {graph.n_edges:,} connections, {graph.n_neuropils} neuropils")

    fit = rate_fit(graph, batch=args.batch, duration_ms=args.duration_ms)
    first = jax.tree.map(lambda x: x[0], fit.sample(0).inputs)
    learner = fusetrace.compile(
        fit.network, *first, loss=mse_loss, algorithm="es_d_rtrl", batch_size=args.batch, decay=args.decay
    )
    print(learner.summary())
    every = round(10.0 / fit.dt_ms)  # one optimizer step per read-out
    trainer = fusetrace.trainer.Trainer(
        learner, fit.sample, optax.adam(args.learning_rate), update_every=every, gradient_every=every
    )
    state = trainer.init()
    with tqdm(range(args.iterations), desc="training", unit="trial batch") as bar:
        for _ in bar:
            state, result = trainer.iteration(state)
            distance = fit.distance(state["params"]["rec.comm.weight"]["weight"])
            bar.set_postfix(loss=f"{result.loss:.1f}", distance_to_teacher=f"{distance:.4f}")
    print(f"final loss per step {result.loss:.2f}; distance to the teacher's weights {distance:.4f} (1 at the start)")


if __name__ == "__main__":
    main()
