"""Train a spiking network online with fusetrace: e-prop's pattern-generation task (../docs/tasks.md).

An unmodified brainpy.state network (Poisson input -> LIF layer with exponential synapses -> leaky
readout) learns to reproduce a sum of sines. Every step the fused learner advances the network and its
eligibility traces and returns a gradient; Adam applies it at once (fully online, memory constant in
time). Prints the loss per pass over the sequence; it falls.

    python examples/train_online.py [--algorithm d_rtrl|es_d_rtrl|e_prop] [--epochs N]
"""

import argparse
import time

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fusetrace


class PatternNet(brainstate.nn.Module):
    def __init__(self, n_in: int, n_rec: int, n_out: int):
        super().__init__()
        self.lif = bps.LIF(n_rec, V_th=1.0 * u.mV, tau=30.0 * u.ms, V_initializer=braintools.init.Constant(0.0 * u.mV))
        self.inp = bps.AlignPostProj(
            comm=brainstate.nn.Linear(
                n_in, n_rec, w_init=braintools.init.KaimingNormal(scale=2.0, unit=u.mA), b_init=None
            ),
            syn=bps.Expon.desc(n_rec, tau=5.0 * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA)),
            out=bps.CUBA.desc(scale=1.0),
            post=self.lif,
        )
        self.out = bps.LeakyRateReadout(n_rec, n_out, tau=30.0 * u.ms, w_init=braintools.init.KaimingNormal(scale=0.5))

    def update(self, x):
        self.inp(x)
        return self.out(self.lif(0.0 * u.mA))


def pattern_task(n_in: int, n_steps: int, seed: int):
    """Frozen 50 Hz Poisson input and a target sum of four sines (periods 1000/500/333/200 ms)."""
    rng = np.random.default_rng(seed)
    spikes = (rng.random((n_steps, n_in)) < 50.0 * 1e-3).astype(np.float32)
    t = np.arange(n_steps) * 1e-3
    periods = np.array([1.0, 0.5, 0.333, 0.2])
    amplitudes, phases = rng.uniform(0.5, 2.0, 4), rng.uniform(0.0, 2 * np.pi, 4)
    target = np.sum(amplitudes * np.sin(2 * np.pi * t[:, None] / periods + phases), axis=1, keepdims=True)
    return jnp.asarray(spikes), jnp.asarray(target / np.abs(target).max(), jnp.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="d_rtrl", choices=["d_rtrl", "es_d_rtrl", "e_prop"])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--neurons", type=int, default=64)
    args = parser.parse_args(argv)

    brainstate.environ.set(dt=1.0 * u.ms)
    brainstate.random.seed(0)
    n_in = 50
    net = PatternNet(n_in, args.neurons, 1)
    xs, ys = pattern_task(n_in, args.steps, seed=1)

    def loss(output, target):
        return 0.5 * jnp.sum((output - target) ** 2)

    learner = fusetrace.compile(net, xs[0], loss=loss, algorithm=args.algorithm)
    print(learner.summary())
    optimizer = optax.adam(1e-3)
    params = learner.params
    opt_state = optimizer.init(params)

    @jax.jit
    def epoch(params, opt_state):
        def body(carry, inputs):
            params, opt_state, state = carry
            state, res = learner.step(params, state, *inputs)
            updates, opt_state = optimizer.update(res.grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, state), res.loss

        (params, opt_state, _), losses = jax.lax.scan(body, (params, opt_state, learner.init()), (xs, ys))
        return params, opt_state, jnp.mean(losses)

    start = time.perf_counter()
    first = None
    for index in range(args.epochs):
        params, opt_state, mean_loss = epoch(params, opt_state)
        first = float(mean_loss) if first is None else first
        print(f"epoch {index + 1:3d}  mean loss per step {float(mean_loss):.5f}")
    print(
        f"loss fell from {first:.5f} to {float(mean_loss):.5f} in {time.perf_counter() - start:.1f} s "
        f"({args.algorithm}, {args.neurons} LIF neurons, {args.steps} steps per epoch)"
    )
    return first, float(mean_loss)


if __name__ == "__main__":
    main()
