"""Gradient fidelity of the online algorithms against BPTT (cosine similarity and norm ratio per weight).

    python benchmarks/fidelity.py [--steps 100] [--batch 8] [--out benchmarks/results/fidelity.json]

Models (float64, dt 1 ms, Poisson-like input, random targets, squared error every step):
  feedforward — one LIF layer (Expon synapse) + LeakyRateReadout (the exact regime of d_rtrl/e_prop);
  recurrent   — the same layer with a recurrent projection from its own previous spikes;
  two_layer   — two feed-forward LIF layers + LeakyRateReadout.
The online estimate is Σ_t res.grads (params fixed); BPTT is brainstate.transform.grad of Σ_t loss.
"""

import argparse
import json
import pathlib
import time

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

import fusetrace

jax.config.update("jax_enable_x64", True)
brainstate.environ.set(precision=64)


def _projection(n_pre, n_post, post, scale, tau):
    return bps.AlignPostProj(
        comm=brainstate.nn.Linear(
            n_pre, n_post, b_init=None, w_init=braintools.init.KaimingNormal(scale=scale, unit=u.mA)
        ),
        syn=bps.Expon.desc(n_post, tau=tau * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA)),
        out=bps.CUBA.desc(scale=1.0),
        post=post,
    )


def _lif(n):
    return bps.LIF(n, V_th=1.0 * u.mV, tau=10.0 * u.ms, V_initializer=braintools.init.Uniform(0.0 * u.mV, 1.0 * u.mV))


class Network(brainstate.nn.Module):
    def __init__(self, kind, n_in=20, n=32, n_out=4):
        super().__init__()
        self.kind = kind
        self.l1 = _lif(n)
        self.inp = _projection(n_in, n, self.l1, 3.0, 5.0)
        if kind == "recurrent":
            self.rec = _projection(n, n, self.l1, 1.0, 8.0)
        last, size = self.l1, n
        if kind == "two_layer":
            self.l2 = _lif(n)
            self.hid = _projection(n, n, self.l2, 3.0, 5.0)
            last = self.l2
        self.out = bps.LeakyRateReadout(size, n_out, tau=20.0 * u.ms)
        self._last = last

    def update(self, x):
        if self.kind == "recurrent":
            self.rec(self.l1.get_spike())
        self.inp(x)
        spikes = self.l1(0.0 * u.mA)
        if self.kind == "two_layer":
            self.hid(spikes)
            spikes = self.l2(0.0 * u.mA)
        return self.out(spikes)


def _build(kind, batch):
    brainstate.random.seed(0)
    model = Network(kind)
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


def _loss(output, target):
    return jnp.sum((output - target) ** 2)


def _flat(tree):
    return np.concatenate(
        [np.ravel(np.asarray(u.get_mantissa(x))) for x in jax.tree.leaves(tree, is_leaf=u.math.is_quantity)]
    )


def bptt(model, xs, ys):
    weights = model.states(brainstate.ParamState)

    def total():
        return jnp.sum(brainstate.transform.for_loop(lambda x, y: _loss(model.update(x), y), xs, ys))

    return {".".join(k): v for k, v in brainstate.transform.grad(total, weights)().items()}


def online(model, xs, ys, algorithm, batch, **options):
    learner = fusetrace.compile(model, xs[0], loss=_loss, algorithm=algorithm, batch_size=batch, **options)
    params = learner.params

    @jax.jit
    def run(xs, ys):
        def body(state, inputs):
            state, res = learner.step(params, state, *inputs)
            return state, res.grads

        _, grads = jax.lax.scan(body, learner.init(), (xs, ys))
        return jax.tree.map(lambda g: g.sum(0), grads, is_leaf=u.math.is_quantity)

    return run(xs, ys)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/fidelity.json")
    args = parser.parse_args()
    brainstate.environ.set(dt=1.0 * u.ms)
    rng = np.random.default_rng(0)
    xs = jnp.asarray((rng.random((args.steps, args.batch, 20)) < 0.1).astype(np.float64))
    ys = jnp.asarray(rng.normal(size=(args.steps, args.batch, 4)))
    configs = [("d_rtrl", {}), ("e_prop", {})] + [("es_d_rtrl", {"decay": d}) for d in (0.5, 0.9, 0.99)]
    rows = []
    start = time.perf_counter()
    for kind in ("feedforward", "recurrent", "two_layer"):
        reference = bptt(_build(kind, args.batch), xs, ys)
        for algorithm, options in configs:
            grads = online(_build(kind, args.batch), xs, ys, algorithm, args.batch, **options)
            for path, value in reference.items():
                want, got = _flat(value), _flat(grads[path])
                cosine = float(np.vdot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want) + 1e-300))
                ratio = float(np.linalg.norm(got) / (np.linalg.norm(want) + 1e-300))
                rows.append(
                    {
                        "model": kind,
                        "algorithm": algorithm,
                        **options,
                        "weight": path,
                        "cosine": cosine,
                        "norm_ratio": ratio,
                    }
                )
                label = f"{algorithm}{'(' + str(options['decay']) + ')' if options else ''}"
                print(f"{kind:12s} {label:16s} {path:24s} cosine {cosine:+.4f}  norm ratio {ratio:.4f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "rows": rows}, indent=1))
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
