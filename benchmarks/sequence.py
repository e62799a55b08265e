"""Learning over a sequence: wall time per time step of a whole T-step sequence with one gradient (the sum
of the per-step gradients), measured interleaved in one process and reported as ratios (issue 17).

    python benchmarks/sequence.py [--neurons 512 2048] [--batch 16] [--steps 100] [--rounds 8] [--out DIR] [--quick]

Model: benchmarks/common.py's recurrent LIF layer (100 Poisson inputs, one merged Expon synapse) and a
LeakyRateReadout of 10, float32, the loss at every step. Methods, each one compiled call per sequence
with its inputs drawn inside:
  forward              — `for_loop` of the plain model (no learning);
  es_d_rtrl scan       — `Learner.scan`: its weight products deferred and contracted once per sequence;
  es_d_rtrl advance    — the same `Learner.scan` with a loss mask of zeros: its forward (dense products over
                         spikes formed event by event on the CPU, `passes/event_product.py`) and traces only;
  es_d_rtrl steps      — `Learner.step` in a `lax.scan`, one weight product per step (the previous path);
  pp_prop              — braintrace's `etrace_grad(..., reduction="sum")` over the same steps;
  d_rtrl scan / D_RTRL — per-weight traces (only at the smaller size: the largest is slow).
Writes benchmarks/results/sequence.json (or under --out).
"""

import argparse

import common
import jax
import jax.numpy as jnp
import jax.random as jr

TARGETS = {  # name: (numerator, denominator, target)
    "es_d_rtrl scan / pp_prop": ("es_d_rtrl scan", "pp_prop", 0.5),
    "es_d_rtrl scan / forward": ("es_d_rtrl scan", "forward", 2.0),
    "es_d_rtrl scan / advance": ("es_d_rtrl scan", "es_d_rtrl advance", None),
    "es_d_rtrl steps / pp_prop": ("es_d_rtrl steps", "pp_prop", None),
    "d_rtrl scan / D_RTRL": ("d_rtrl scan", "D_RTRL", 0.1),
}
PER_WEIGHT_MAX_NEURONS = 512  # d_rtrl and D_RTRL only up to this size (their traces are B·|W|·S)


def scan_program(learner, spec: common.Spec, batch: int, steps: int, learn: bool = True) -> common.Program:
    """`Learner.scan` over `steps` steps (inputs and targets drawn inside, as the other programs do); with
    `learn=False` no step forms a gradient (a loss mask of zeros and no deferred products: the fused
    forward and the traces only)."""
    mask, chunk = (None, None) if learn else (jnp.zeros((steps,), bool), 0)

    @jax.jit
    def sequence(params, state, key):
        # drawn step by step (`lax.map`), as the other programs draw them inside their loops: a `vmap` of the
        # draw became a slow batched generator on this CPU (0.045 ms per step at N = 512, 10% of the scan)
        xs, ys = jax.lax.map(lambda t: common.sample(key, t, batch, spec), jnp.arange(steps))
        state, result = learner.scan(params, state, xs, ys, loss_mask=mask, chunk=chunk)
        return state, result.grads, jnp.sum(result.loss)

    args = (learner.params, learner.init(), jr.key(2))
    return common.Program(run=lambda: sequence(*args), lower=lambda: sequence.lower(*args), steps=steps)


def programs(spec: common.Spec, batch: int, steps: int) -> dict[str, common.Program]:
    model = common.build(spec, batch)
    es = common.learner_of("fusetrace es_d_rtrl", model, batch)
    out = {
        "forward": common.forward_sequence(model, batch, steps),
        "es_d_rtrl scan": scan_program(es, spec, batch, steps),
        "es_d_rtrl advance": scan_program(es, spec, batch, steps, learn=False),
        "es_d_rtrl steps": common.fusetrace_sequence(es, spec, batch, steps),
    }
    if common.peer() is not None:
        out["pp_prop"] = common.peer_sequence(common.learner_of("braintrace pp_prop", model, batch), spec, batch, steps)
    if spec.n <= PER_WEIGHT_MAX_NEURONS:
        out["d_rtrl scan"] = scan_program(common.learner_of("fusetrace d_rtrl", model, batch), spec, batch, steps)
        if common.peer() is not None:
            peer = common.learner_of("braintrace D_RTRL", model, batch)
            out["D_RTRL"] = common.peer_sequence(peer, spec, batch, steps)
    return out


def ratios(times: dict) -> dict:
    out = {}
    for name, (top, bottom, target) in TARGETS.items():
        if top in times and bottom in times:
            value = times[top]["median_ms"] / times[bottom]["median_ms"]
            out[name] = {"ratio": value, "target": target, "met": None if target is None else value <= target}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="one small size, few rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.neurons, args.rounds, args.steps = [128], 2, 20
    common.configure(32)
    results = []
    for n in args.neurons:
        spec = common.Spec(n=n)
        times = common.interleaved_ms(programs(spec, args.batch, args.steps), args.rounds)
        row = {"neurons": n, "batch": args.batch, "steps": args.steps, "ms_per_step": times, "ratios": ratios(times)}
        results.append(row)
        for name, value in times.items():
            print(f"N={n:6d} {name:18s} {value['median_ms']:9.3f} ms/step")
        for name, value in row["ratios"].items():
            print(f"N={n:6d} {name:28s} {value['ratio']:.3f} (target {value['target']}, met {value['met']})")
    json_path, _ = common.output_paths(args.out, "sequence")
    common.write_json(json_path, {"model": "recurrent LIF + leaky readout", "results": results})


if __name__ == "__main__":
    main()
