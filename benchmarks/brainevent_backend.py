"""Forward-step time of a sparse E/I network under brainevent's two CPU backends.

    python benchmarks/brainevent_backend.py [--neurons 4000] [--repeats 200]

Needs numba for the 'numba' backend (`pip install numba`); without it only 'jax_raw' is timed.
Prints one JSON line per backend: median and 10th/90th percentile ms per step (jit-compiled, after
warm-up, `block_until_ready`), plus the fused-learner step time under the same backend.
"""

import argparse
import json
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


class SparseNet(brainstate.nn.Module):
    def __init__(self, n: int, conn: int):
        super().__init__()
        self.n = n
        self.N = bps.LIF(n, V_th=1.0 * u.mV, tau=20.0 * u.ms, V_initializer=braintools.init.Uniform(0 * u.mV, 1 * u.mV))
        self.rec = bps.AlignPostProj(
            comm=brainstate.nn.EventFixedProb(
                n, n, conn_num=conn / n, seed=0, conn_weight=braintools.init.Uniform(0.1 * u.mA, 0.3 * u.mA)
            ),
            syn=bps.Expon.desc(n, tau=5.0 * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA)),
            out=bps.CUBA.desc(scale=1.0),
            post=self.N,
        )
        self.out = bps.LeakyRateReadout(n, 10, tau=10.0 * u.ms)

    def update(self, drive):
        self.rec(self.N.get_spike())
        return self.out(self.N(drive))


def _median_ms(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--neurons", type=int, default=4000)
    parser.add_argument("--conn", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    brainstate.environ.set(dt=0.1 * u.ms)
    backends = ["jax_raw"]
    try:
        import numba  # noqa: F401

        backends.append("numba")
    except ImportError:
        print(json.dumps({"backend": "numba", "skipped": "numba is not installed"}))
    for backend in backends:
        brainevent.config.set_backend("cpu", backend)
        brainstate.random.seed(0)
        net = SparseNet(args.neurons, args.conn)
        brainstate.nn.init_all_states(net)
        drive = 1.2 * u.mA * jnp.ones(args.neurons)
        # brainstate states cannot be written under a raw jax.jit: time through brainstate's own jit
        step = brainstate.transform.jit(net.update)
        med, p10, p90 = _median_ms(step, drive, repeats=args.repeats)
        learner = fusetrace.compile(net, drive, loss=lambda o, t: jnp.sum((o - t) ** 2), algorithm="es_d_rtrl")
        learn = jax.jit(learner.step)
        state = learner.init()
        lmed, lp10, lp90 = _median_ms(learn, learner.params, state, drive, jnp.zeros(10), repeats=args.repeats // 4)
        print(
            json.dumps(
                {
                    "backend": backend,
                    "neurons": args.neurons,
                    "connections_per_neuron": args.conn,
                    "forward_ms": {"median": med, "p10": p10, "p90": p90},
                    "es_d_rtrl_step_ms": {"median": lmed, "p10": lp10, "p90": lp90},
                }
            )
        )


if __name__ == "__main__":
    main()
