"""Whole brain, side by side: fusetrace against braintrace (the peer) on the GENERATED connectome with
FlyWire v783's statistics (138,639 LIF neurons, 15,091,983 CSR connections; not the real graph — see
docs/connectome.md), identical weights, unbatched states, float32, CPU.

    python benchmarks/connectome_side_by_side.py [--quick] [--neurons N] [--steps 5000] [--only NAME ...]
                                                 [--fit-iterations 3] [--backend numba|jax_raw] [--out DIR]

Every configuration runs in its own process (so its peak RSS, VmHWM, is its own): the forward model, online
learning with a gradient at every step, with a gradient every 50 steps (= 10 ms of model time; the steps
between advance states and traces only), and with no gradient at all (`trace only`: what the gradient
costs is the difference), for fusetrace (`es_d_rtrl`) and braintrace (`pp_prop`, its ES-D-RTRL), decay
0.99 for both; then an online fit of the neuropil rates with fusetrace (the loss must fall) and XLA's
memory estimate for BPTT over the same steps. Each timed configuration runs `--steps` steps (default 5,000
= 1 s of model time at dt 0.2 ms) in compiled chunks of 50, after two chunks that compile, and reports
the mean ms per step, the machine's load average around it (the machine may be shared) and where the
time goes (XLA's per-op profile of one more chunk). The models and programs:
benchmarks/connectome_runs.py. `--quick`: 5,000 neurons and 1,000 steps.

Progress bars go to stderr; results go to benchmarks/results/connectome.json (with `--quick`, or `--out`,
under runs/bench-quick/ or DIR), and a markdown table is printed at the end.
"""

import argparse
import collections
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import common

from fusetrace.tasks.connectome import FLYWIRE_NEURONS

FLYWIRE_STEPS = 5_000  # 1 s of model time at dt 0.2 ms

CONFIGS = {
    "fusetrace forward": ("fusetrace", "forward"),
    "braintrace forward": ("braintrace", "forward"),
    "fusetrace every step": ("fusetrace", "every_step"),
    "braintrace every step": ("braintrace", "every_step"),
    "fusetrace every 50": ("fusetrace", "every_50"),
    "braintrace every 50": ("braintrace", "every_50"),
    "fusetrace trace only": ("fusetrace", "trace_only"),
    "fusetrace scan": ("fusetrace", "scan"),
    "braintrace trace only": ("braintrace", "trace_only"),
    "fusetrace fit": ("fusetrace", "fit"),
    "bptt": ("fusetrace", "bptt"),
}
QUICK_NEURONS, QUICK_STEPS = 5_000, 1_000
CHILD_TIMEOUT_S = 3600.0
PROFILE_TOP = 8
DUMP_ENV = "FUSETRACE_SBS_DUMP"  # where a child asked XLA to dump its chunk programs' optimised HLO
CHUNK_MODULES = r"sbs_chunk|jaxpr_call"  # XLA module names of the chunk programs (jax.jit, brainstate's jit)
WARMUP_CHUNKS = 2
MODEL_NOTES = (
    "Both libraries run the same fusetrace.tasks.flybrain.ConnectomeNetwork: LIFRef (refractory 2.2 ms), "
    "Expon current synapse, Poisson drive to 5% of the neurons, per-neuron leaky rates pooled per neuropil "
    "(no trainable readout; loss mse_loss towards 20 Hz per neuropil). The only difference: braintrace's "
    "recurrent comm is braintrace.nn.SparseLinear on the same CSR and weights (it sees only weights routed "
    "through its ETP ops), fed the spikes as a float array (its sparse_matmul refuses brainevent's "
    "BinaryArray), so its product is brainevent's float csrmv; fusetrace's is the binary (event-driven) one."
)


# --------------------------------------------------------------------------- the parent


def _child(argv: list[str], name: str, args) -> dict:
    """Run configuration `name` in a fresh process (its progress bar on this stderr); its JSON line."""
    dump = tempfile.mkdtemp(prefix="sbs-hlo-")
    flags = f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*(sbs_chunk|jaxpr_call).*"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(), DUMP_ENV: dump}
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", name, *argv]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=CHILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S:.0f} s"}
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 and "error" not in result:
        result["error"] = f"exit {done.returncode} (killed?)" if done.returncode < 0 else f"exit {done.returncode}"
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def _graph_file(args, folder: str) -> str:
    """Generate the graph once, in a child, into an .npz every configuration loads."""
    path = os.path.join(folder, "graph.npz")
    code = (
        "import sys, numpy as np; from fusetrace.tasks import generate_connectome as g; "
        f"c = g({args.neurons}, seed=0); "
        "np.savez(sys.argv[1], indptr=c.indptr, indices=c.indices, weights=c.weights, neuropil=c.neuropil, "
        "names=np.asarray(c.neuropil_names), source=np.asarray(c.source))"
    )
    subprocess.run([sys.executable, "-c", code, path], check=True)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_NEURONS} neurons, {QUICK_STEPS} steps")
    parser.add_argument("--neurons", type=int, default=None, help="default: FlyWire's 138,639")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5000)")
    parser.add_argument("--chunk", type=int, default=50, help="steps per compiled call = the gradient period")
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--backend", default="numba", choices=["numba", "jax_raw"], help="brainevent's CPU kernels")
    parser.add_argument("--fit-iterations", type=int, default=3)
    parser.add_argument("--fit-duration-ms", type=float, default=100.0)
    parser.add_argument("--fit-learning-rate", type=float, default=0.05)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME")
    parser.add_argument("--out", default=None, help="write results/connectome.json under this folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--graph", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.neurons = args.neurons or (QUICK_NEURONS if args.quick else FLYWIRE_NEURONS)
    args.steps = args.steps or (QUICK_STEPS if args.quick else FLYWIRE_STEPS)
    if args.steps % args.chunk:
        parser.error(f"--steps {args.steps} is not a multiple of --chunk {args.chunk}")
    if args.child:
        return child(args)
    passed = ["--steps", str(args.steps), "--chunk", str(args.chunk), "--decay", str(args.decay)]
    passed += ["--backend", args.backend, "--fit-iterations", str(args.fit_iterations)]
    passed += ["--fit-duration-ms", str(args.fit_duration_ms), "--fit-learning-rate", str(args.fit_learning_rate)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="sbs-graph-") as folder:
        passed += ["--neurons", str(args.neurons), "--graph", _graph_file(args, folder)]
        for name in args.only:
            print(f"== {name}", file=sys.stderr, flush=True)
            results[name] = _child(passed, name, args)
    arguments = {k: v for k, v in vars(args).items() if k not in ("child", "graph")}
    payload = {"args": arguments, "model": MODEL_NOTES, "configs": results}
    out = args.out or (str(common.ROOT / "runs" / "bench-quick") if args.quick else None)
    path, _ = common.output_paths(out, "connectome")
    common.configure(32)
    common.write_json(path, payload)
    print(table(results, args))
    return payload


# --------------------------------------------------------------------------- a child: one configuration


def child(args) -> dict:
    """Run one configuration in this process and print its result as one JSON line (errors included)."""
    library, mode = CONFIGS[args.child]
    result: dict = {"library": library, "mode": mode, "load_average_at_start": os.getloadavg()}
    try:
        result.update(_run(args, library, mode))
    except Exception as error:  # a refusal is a result: recorded, not raised
        result["error"] = f"{type(error).__name__}: {str(error).strip()[:2000]}"
    result["peak_rss_bytes"] = common.peak_rss_bytes()
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result), flush=True)
    return result


def _load_graph(path: str):
    import numpy as np

    from fusetrace.tasks import Connectome

    data = np.load(path)
    names = tuple(str(name) for name in data["names"])
    return Connectome(data["indptr"], data["indices"], data["weights"], data["neuropil"], names, str(data["source"]))


def _run(args, library: str, mode: str) -> dict:
    import brainevent
    import connectome_runs as runs

    common.configure(32)
    brainevent.config.set_backend("cpu", args.backend)
    start = time.perf_counter()
    graph = _load_graph(args.graph)
    config = runs.setup(graph, chunk=args.chunk, decay=args.decay)
    info = {"neurons": graph.n_neurons, "connections": graph.n_edges, "driven": config.n_drive}
    if library == "braintrace":
        info["braintrace"] = common.peer_version()
        info["event_driven_error"] = runs.peer_event_error(graph)
    if mode == "fit":
        fitted = runs.fit(
            config,
            duration_ms=args.fit_duration_ms,
            iterations=args.fit_iterations,
            learning_rate=args.fit_learning_rate,
        )
        return {**info, **fitted, "seconds": round(time.perf_counter() - start, 1)}
    if mode == "bptt":
        available = common.available_bytes()
        short, long = args.chunk // 5, 2 * (args.chunk // 5)
        memory = runs.bptt_memory(config, short, long, args.steps, common.compiled_memory, run_below=available / 2)
        return {**info, **memory, "available_bytes": available}
    run, held = runs.program(library, mode, config)
    info.update(held, setup_s=round(time.perf_counter() - start, 1))
    return {**info, **_timed(run, args, f"{library} {mode}")}


def _timed(run, args, label: str) -> dict:
    """Two chunks that compile (brainstate's jit compiles again on its second call, once its states hold
    what the first call wrote), then `args.steps` steps timed chunk by chunk; one more chunk profiled."""
    import jax
    import numpy as np
    from tqdm import tqdm

    start = time.perf_counter()
    for k in range(WARMUP_CHUNKS):
        jax.block_until_ready(run(k))
    compile_s = time.perf_counter() - start
    chunks, seconds, activity = args.steps // args.chunk, [], np.zeros(2)
    with tqdm(total=args.steps, file=sys.stderr, desc=label, unit="step", mininterval=5.0) as bar:
        for k in range(WARMUP_CHUNKS, WARMUP_CHUNKS + chunks):
            begin = time.perf_counter()
            out = jax.block_until_ready(run(k))
            seconds.append(time.perf_counter() - begin)
            bar.update(args.chunk)
            if label.endswith("forward"):
                activity += np.asarray([float(out[0]), float(out[1])])
    per_step = 1e3 * np.asarray(seconds) / args.chunk
    result = {
        "warmup_s": round(compile_s, 2),
        "steps": args.steps,
        "ms_per_step": float(per_step.mean()),
        "ms_per_step_chunk_p10_p50_p90": [float(np.percentile(per_step, q)) for q in (10, 50, 90)],
    }
    if label.endswith("forward"):
        result["spikes_per_step"] = activity[0] / args.steps
        result["synaptic_events_per_step"] = activity[1] / args.steps
    result["profile"] = op_profile(run, WARMUP_CHUNKS + chunks, args.chunk)
    return result


# --------------------------------------------------------------------------- where the time goes


def op_profile(run, k: int, steps: int) -> dict:
    """XLA's per-instruction times (ms per step) of chunk `k`, the top `PROFILE_TOP` with what they are
    (the optimised HLO's op name and, for a custom call, its target), and the total over all of them.
    Instructions that hold others (while, conditional, call) are not counted: their insides are."""
    import jax

    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        jax.block_until_ready(run(k))
        jax.profiler.stop_trace()
        (trace,) = pathlib.Path(folder).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(trace))
    warnings.filterwarnings("ignore", "builtin type event_stats", DeprecationWarning)
    totals: collections.Counter = collections.Counter()
    programs: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                op, module = str(stats.get("hlo_op", "")), str(stats.get("hlo_module", ""))
                if op and re.search(CHUNK_MODULES, module) and not op.startswith(("while", "conditional", "call")):
                    totals[op] += event.duration_ns / 1e6 / steps
                    programs[int(stats.get("program_id", -1))] += 1
    program = programs.most_common(1)[0][0] if programs else None
    labels = _hlo_labels(os.environ.get(DUMP_ENV), program)
    top = [{"op": op, "ms_per_step": round(ms, 3), "what": labels.get(op, "")} for op, ms in totals.most_common()]
    return {"ops_ms_per_step": round(sum(totals.values()), 3), "top": top[:PROFILE_TOP]}


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")


def _hlo_labels(folder: str | None, program: int | None) -> dict[str, str]:
    """HLO instruction name -> its custom-call target and jax op name, from the optimised HLO dump of
    module `program` (else the last chunk program dumped)."""
    paths = sorted(pathlib.Path(folder).glob("module_*after_optimizations.txt")) if folder else []
    paths = [path for path in paths if re.search(CHUNK_MODULES, path.name)]
    chosen = [path for path in paths if program is not None and path.name.startswith(f"module_{program:04d}.")]
    labels: dict[str, str] = {}
    for line in (chosen or paths[-1:])[0].read_text().splitlines() if paths else []:
        match = _INSTRUCTION.match(line)
        if match:
            target = re.search(r'custom_call_target="([^"]+)"', match["rest"])
            op_name = re.search(r'op_name="([^"]+)"', match["rest"])
            parts = (target and f"[{target[1]}]", op_name and op_name[1][-120:])
            labels.setdefault(match["name"], " ".join(part for part in parts if part))
    return labels


# --------------------------------------------------------------------------- the table


def _ms(result: dict | None) -> str:
    if not result:
        return "—"
    if "error" in result:
        return "error (see below)"
    return f"{result['ms_per_step']:.1f}"


def _gb(result: dict | None) -> str:
    return "—" if not result or "peak_rss_bytes" not in result else f"{result['peak_rss_bytes'] / 1e9:.2f} GB"


def table(results: dict, args) -> str:
    """The markdown summary: ms/step and peak RSS per configuration, both libraries; the fit; BPTT."""
    rows = [
        f"Generated FlyWire-statistics connectome, {args.neurons:,} neurons, {args.steps:,} steps "
        f"({args.steps * 0.2:.0f} ms), unbatched, float32, brainevent {args.backend}; decay {args.decay}.",
        "",
        "| configuration | fusetrace es_d_rtrl ms/step | braintrace pp_prop ms/step | fusetrace peak RSS "
        "| braintrace peak RSS |",
        "|---|---|---|---|---|",
    ]
    for mode, title in (
        ("forward", "forward only"),
        ("every step", "gradient every step"),
        ("every 50", f"gradient every {args.chunk} steps"),
        ("trace only", "states + traces, no gradient"),
        ("scan", f"loss every step, one summed gradient per {args.chunk} steps (`Learner.scan`)"),
    ):
        ours, peer = results.get(f"fusetrace {mode}"), results.get(f"braintrace {mode}")
        rows.append(f"| {title} | {_ms(ours)} | {_ms(peer)} | {_gb(ours)} | {_gb(peer)} |")
    rows += ["", *_fit_lines(results.get("fusetrace fit")), *_bptt_lines(results.get("bptt"))]
    errors = [f"* {name}: {result['error']}" for name, result in results.items() if "error" in result]
    event = next((r["event_driven_error"] for r in results.values() if r.get("event_driven_error")), None)
    if event:
        errors.append(f"* braintrace with event-driven (BinaryArray) spikes: {event} (it runs the float CSR product)")
    return "\n".join(rows + (["", "Errors and refusals:", *errors] if errors else []))


def _fit_lines(fit: dict | None) -> list[str]:
    if not fit:
        return []
    if "error" in fit:
        return [f"fusetrace fit: error — {fit['error'][:300]}"]
    losses = fit["mean_loss_per_iteration"]
    return [
        f"fusetrace neuropil-rate fit ({fit['updates']} Adam updates, one per read-out): mean read-out loss "
        f"{' → '.join(f'{x:.1f}' for x in losses)} over {len(losses)} passes of a {fit['duration_ms']:.0f} ms trial; "
        f"distance to the teacher {fit['distance_to_teacher']:.4f} (1 at the start).",
    ]


def _bptt_lines(bptt: dict | None) -> list[str]:
    if not bptt:
        return []
    if "error" in bptt:
        return [f"BPTT: error — {bptt['error'][:300]}"]
    ran = bptt["ran"]
    if isinstance(ran, dict):
        ran = f"ran: {ran['ms_per_step']:.1f} ms/step, peak RSS {bptt['peak_rss_bytes'] / 1e9:.2f} GB"
    return [
        f"BPTT over {bptt['steps']:,} steps (XLA's compiled memory, extrapolated): "
        f"{bptt['bytes_per_step'] / 1e6:.2f} MB stored per step → {bptt['estimate_bytes'] / 1e9:.1f} GB "
        f"(available now: {bptt['available_bytes'] / 1e9:.1f} GB); {ran}.",
    ]


if __name__ == "__main__":
    main()
