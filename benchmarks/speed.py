"""Speed: wall time per time step of forward-only simulation, BPTT, fusetrace (d_rtrl, es_d_rtrl) and
braintrace (D_RTRL, pp_prop), measured interleaved in one process and reported as ratios.

    python benchmarks/speed.py [--neurons 512 2048] [--batch 16] [--rounds 30] [--slow-rounds 6] [--out DIR]
                               [--quick] [--fast-only]

Model: one recurrent LIF layer (100 Poisson inputs at 50 Hz, ~5% of neurons firing per step, one merged
Expon synapse per neuron) and a LeakyRateReadout of 10; float32; dt 1 ms. Each method is jit-compiled
and warmed up; per round every method of a group runs in turn (each for at least 50 ms), and the median
over all calls is reported (block_until_ready). The groups: forward, BPTT, es_d_rtrl, pp_prop (fast, 30
rounds), then d_rtrl and D_RTRL (per-weight traces, 6 rounds), all in this one process. BPTT's time is
that of one T=100 sequence (forward + backward) divided by 100. es_d_rtrl and pp_prop use the same
smoothing factor (common.DECAY = 0.9). Writes benchmarks/results/speed.json and
docs/images/bench-speed.png (or under --out).
"""

import argparse

import brainstate
import common
import jax.numpy as jnp
import matplotlib.ticker

BPTT_STEPS = 100
RATE_STEPS = 300  # steps simulated to measure the firing rate (the first third discarded)


def firing_rate(spec: common.Spec, batch: int) -> float:
    """Mean fraction of neurons spiking per step, after a transient, on a fresh copy of the model."""
    model = common.build(spec, batch)
    xs, _ = common.input_bank(spec, batch, RATE_STEPS)

    def step(x):
        model.update(x)
        return jnp.mean(model.lif1.get_spike())

    rates = brainstate.transform.for_loop(step, xs)
    return float(jnp.mean(rates[RATE_STEPS // 3 :]))


def programs(spec: common.Spec, batch: int, bank_steps: int, skip=()) -> dict[str, common.Program]:
    """Every method's program but `skip`'s on ONE model instance (identical weights; the peer's twin copies
    them)."""
    model = common.build(spec, batch)
    bank = common.input_bank(spec, batch, bank_steps)
    names = [name for name in common.methods() if name not in skip]
    return {name: common.step_program(name, model, batch, bank, BPTT_STEPS) for name in names}


# Two groups, each interleaved in its own rounds: a multi-second per-weight-trace call (and the gigabytes it
# allocates and frees) between two millisecond calls would disturb those far more than machine load does.
FAST = ("forward", "bptt", "fusetrace es_d_rtrl", "braintrace pp_prop")
SLOW = ("fusetrace d_rtrl", "braintrace D_RTRL")
COLORS = {"fusetrace": "#4c72b0", "braintrace": "#dd8452"}
RATIOS = {  # name: (numerator, denominator, target or None)
    "fusetrace es_d_rtrl / braintrace pp_prop": ("fusetrace es_d_rtrl", "braintrace pp_prop", 0.7),
    "fusetrace es_d_rtrl / forward": ("fusetrace es_d_rtrl", "forward", 2.0),
    "fusetrace d_rtrl / braintrace D_RTRL": ("fusetrace d_rtrl", "braintrace D_RTRL", 0.3),
    "braintrace pp_prop / forward": ("braintrace pp_prop", "forward", None),
    "bptt / forward": ("bptt", "forward", None),
    "fusetrace d_rtrl / forward": ("fusetrace d_rtrl", "forward", None),
    "braintrace D_RTRL / forward": ("braintrace D_RTRL", "forward", None),
}


def ratios(times: dict) -> dict:
    out = {}
    for name, (top, bottom, target) in RATIOS.items():
        if top in times and bottom in times:
            value = times[top]["median_ms"] / times[bottom]["median_ms"]
            out[name] = {"value": value, "target": target, "met": None if target is None else value <= target}
        else:
            out[name] = {"value": None, "target": target, "met": None, "note": f"braintrace {common.peer_version()}"}
    return out


def plot(rows: list[dict], path) -> None:
    plt = common.pyplot()
    figure, axes = plt.subplots(1, len(rows), figsize=(6.2 * len(rows), 3.8), squeeze=False)
    for axis, row in zip(axes[0], rows, strict=True):
        names = list(row["ms_per_step"])
        values = [row["ms_per_step"][name]["median_ms"] for name in names]
        colors = [COLORS.get(name.split()[0], "#888888") for name in names]
        axis.barh(names, values, color=colors)
        axis.set_xscale("log")
        axis.set_xlim(min(values) / 2, max(values) * 20)
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.invert_yaxis()
        axis.set_xlabel("ms per time step (median, log scale)")
        axis.set_title(f"N = {row['neurons']}, B = {row['batch']}")
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:,.3g}" if value < 1000 else f" {value:,.0f}", va="center", fontsize=8)
    common.save_figure(figure, path, "Per-step wall time: recurrent LIF + leaky readout (float32, CPU)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the fast group")
    parser.add_argument("--slow-rounds", type=int, default=6, help="rounds of the per-weight-trace group")
    parser.add_argument("--out", default=None, help="write results/ and images/ under this folder")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for run_all --quick)")
    parser.add_argument("--fast-only", action="store_true", help="skip the per-weight-trace group (d_rtrl, D_RTRL)")
    args = parser.parse_args(argv)
    if args.quick:
        args.neurons, args.batch, args.rounds, args.slow_rounds = [64], 4, 2, 2
    common.configure(32)
    rows = []
    for n in args.neurons:
        spec = common.Spec(n=n)
        every = programs(spec, args.batch, bank_steps=20, skip=SLOW if args.fast_only else ())
        times = {}
        for group, rounds in ((FAST, args.rounds), (SLOW, args.slow_rounds)):
            chosen = {name: program for name, program in every.items() if name in group}
            if chosen:
                times.update(common.interleaved_ms(chosen, rounds=rounds))
        times = {name: times[name] for name in every}
        row = {
            "neurons": n,
            "batch": args.batch,
            "firing_rate": firing_rate(spec, args.batch),
            "ms_per_step": times,
            "ratios": ratios(times),
        }
        for name, value in times.items():
            print(f"N={n:5d} {name:22s} {value['median_ms']:10.3f} ms/step  ({value['calls']} calls)")
        rows.append(row)
    json_path, png_path = common.output_paths(args.out, "speed")
    common.write_json(json_path, {"model": "recurrent LIF + leaky readout", "bptt_steps": BPTT_STEPS, "rows": rows})
    plot(rows, png_path)


if __name__ == "__main__":
    main()
