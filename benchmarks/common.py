"""What every benchmark shares: the models, the inputs, the loss, the program each method runs, timing,
compiled-memory analysis and the results files. Not a script: the benchmarks import it (run them, or
`benchmarks/run_all`).

The model is one or more LIF layers (Expon current synapses, CUBA), optionally recurrent (dense, or sparse
with a fixed number of connections per neuron), and a LeakyRateReadout, fed by Poisson input spikes.
`build(spec, batch)` gives the plain brainpy.state model that fusetrace compiles unchanged;
`twin(model, batch, algorithm)` gives braintrace's learner for the equivalent model (its own
`braintrace.nn.Linear` and `braintrace.nn.LeakyRateReadout`) holding identical weights and initial states.

Every method is a `Program`: `run()` advances it one call (one step, or one whole sequence for BPTT) and
`lower()` gives the jax `Lowered` of that call for XLA's memory analysis.
"""

import contextlib
import dataclasses
import itertools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import brainpy.state as bps
import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import fusetrace

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "images"
DT_MS = 1.0
NO_PEER_ENV = "FUSETRACE_BENCH_NO_PEER"  # set to 1 to run as if braintrace were not installed
NOT_INSTALLED = "not installed"


def configure(precision: int) -> None:
    """Float width for everything built afterwards (32 for speed/memory/scale, 64 for fidelity) and the step."""
    jax.config.update("jax_enable_x64", precision == 64)
    brainstate.environ.set(precision=precision, dt=DT_MS * u.ms)


def peer():
    """The braintrace module, or None when it is not installed (or hidden with FUSETRACE_BENCH_NO_PEER=1)."""
    if os.environ.get(NO_PEER_ENV) == "1":
        return None
    try:
        import braintrace
    except ImportError:
        return None
    return braintrace


def peer_version() -> str:
    module = peer()
    return NOT_INSTALLED if module is None else module.__version__


# --------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Spec:
    """A network: `layers` LIF layers of `n` neurons, input from `n_in` Poisson channels, readout of `n_out`.

    `rec_tau_ms == syn_tau_ms` lets brainpy merge the input and recurrent synapses of a layer into one
    Expon state (2 states per neuron: V and g); a different value keeps them apart (3 states).
    `sparse_conn` makes the recurrent projection an `EventFixedProb` with that many connections per neuron.
    """

    n_in: int = 100
    n: int = 512
    n_out: int = 10
    layers: int = 1
    recurrent: bool = True
    in_scale: float = 20.0
    rec_scale: float = 2.0
    hidden_scale: float = 3.0
    syn_tau_ms: float = 5.0
    rec_tau_ms: float = 5.0
    readout_tau_ms: float = 20.0
    sparse_conn: int | None = None
    input_p: float = 0.05  # spike probability per input channel and step (50 Hz at dt = 1 ms)


@dataclasses.dataclass(frozen=True)
class Kit:
    """The layer classes a model is built from: brainstate's own, or braintrace's ETP-wired twins."""

    linear: type
    readout: type
    readout_weight: str  # the readout's ParamState attribute


PLAIN = Kit(brainstate.nn.Linear, bps.LeakyRateReadout, "weight")


def peer_kit() -> Kit:
    braintrace = peer()
    if braintrace is None:
        raise RuntimeError("braintrace is not installed: pip install -e '.[bench]'")
    return Kit(braintrace.nn.Linear, braintrace.nn.LeakyRateReadout, "W")


def _lif(n: int) -> bps.LIF:
    return bps.LIF(n, V_th=1.0 * u.mV, tau=10.0 * u.ms, V_initializer=braintools.init.Uniform(0.0 * u.mV, 1.0 * u.mV))


def _projection(comm, n_post: int, post, tau_ms: float) -> bps.AlignPostProj:
    synapse = bps.Expon.desc(n_post, tau=tau_ms * u.ms, g_initializer=braintools.init.Constant(0.0 * u.mA))
    return bps.AlignPostProj(comm=comm, syn=synapse, out=bps.CUBA.desc(scale=1.0), post=post)


class Network(brainstate.nn.Module):
    """`spec.layers` LIF layers (layer k: `lif{k}`, input projection `inp{k}`, recurrent `rec{k}`) and `out`."""

    def __init__(self, spec: Spec, kit: Kit = PLAIN):
        super().__init__()
        self.spec = spec

        def dense(n_pre, scale):
            init = braintools.init.KaimingNormal(scale=scale, unit=u.mA)
            return kit.linear(n_pre, spec.n, b_init=None, w_init=init)

        size = spec.n_in
        for k in range(1, spec.layers + 1):
            lif = _lif(spec.n)
            setattr(self, f"lif{k}", lif)
            scale = spec.in_scale if k == 1 else spec.hidden_scale
            setattr(self, f"inp{k}", _projection(dense(size, scale), spec.n, lif, spec.syn_tau_ms))
            if spec.recurrent:
                setattr(self, f"rec{k}", _projection(self._recurrent(dense), spec.n, lif, spec.rec_tau_ms))
            size = spec.n
        self.out = kit.readout(spec.n, spec.n_out, tau=spec.readout_tau_ms * u.ms)

    def _recurrent(self, dense):
        spec = self.spec
        if spec.sparse_conn is None:
            return dense(spec.n, spec.rec_scale)
        std = spec.rec_scale * np.sqrt(2.0 / spec.sparse_conn)  # Kaiming's std with the true fan-in
        weight = braintools.init.Normal(0.0, std, unit=u.mA)
        return brainstate.nn.EventFixedProb(spec.n, spec.n, conn_num=spec.sparse_conn, conn_weight=weight, seed=0)

    def update(self, x):
        for k in range(1, self.spec.layers + 1):
            lif = getattr(self, f"lif{k}")
            if self.spec.recurrent:
                getattr(self, f"rec{k}")(lif.get_spike())
            getattr(self, f"inp{k}")(x)
            x = lif(0.0 * u.mA)
        return self.out(x)


def build(spec: Spec, batch: int, seed: int = 0, kit: Kit = PLAIN) -> Network:
    """The model with its states initialised for `batch` (weights and initial V drawn from `seed`)."""
    brainstate.random.seed(seed)
    model = Network(spec, kit)
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


def _peer_path(path: tuple, kit: Kit) -> tuple:
    return ("out", kit.readout_weight) if path == ("out", PLAIN.readout_weight) else path


def twin(model: Network, batch: int, algorithm: str, **options):
    """braintrace's learner for the equivalent model: same weights and same initial states as `model` now.

    `braintrace.compile` re-initialises the states, so they are copied after it."""
    braintrace = peer()
    kit = peer_kit()
    other = Network(model.spec, kit)
    params = model.states(brainstate.ParamState)
    weights = {_peer_path(path, kit): state.value for path, state in params.items()}
    hidden = {path: state.value for path, state in model.states().items() if path not in params}
    x0 = jnp.zeros((batch, model.spec.n_in), brainstate.environ.dftype())
    learner = braintrace.compile(other, algorithm, x0, batch_size=batch, **options)
    for path, state in other.states(brainstate.ParamState).items():
        state.value = weights[path]
    for path, state in other.states().items():
        if path in hidden:
            state.value = hidden[path]
    return learner


def loss(output, target):
    """Squared error summed over batch and outputs (one step)."""
    return jnp.sum((u.get_mantissa(output) - target) ** 2)


def sample(key, t, batch: int, spec: Spec):
    """Step `t`'s input spikes (batch, n_in) and random target (batch, n_out), drawn inside the program."""
    k_in, k_out = jr.split(jr.fold_in(key, t))
    dtype = brainstate.environ.dftype()
    x = (jr.uniform(k_in, (batch, spec.n_in)) < spec.input_p).astype(dtype)
    return x, jr.normal(k_out, (batch, spec.n_out), dtype)


def input_bank(spec: Spec, batch: int, steps: int, seed: int = 1):
    """`steps` inputs and targets drawn up front (time first), for per-step timing."""
    keys = jnp.arange(steps)
    return jax.vmap(lambda t: sample(jr.key(seed), t, batch, spec))(keys)


# --------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
    """One method's compiled call. `run()` executes it once (updating whatever state it carries) and returns
    something to block on; `lower()` lowers the same call; `steps` is how many time steps one call covers."""

    run: Callable[[], Any]
    lower: Callable[[], Any]
    steps: int = 1


def _cycle(bank):
    """A function giving the bank's (x_t, target_t) in turn, round and round."""
    pairs = itertools.cycle(list(zip(*bank, strict=True)))
    return lambda: next(pairs)


def forward_step(model: Network, bank) -> Program:
    """The plain model's step alone (no learning), through brainstate's jit."""
    step = brainstate.transform.jit(model.update)
    nxt = _cycle(bank)
    return Program(run=lambda: step(nxt()[0]), lower=lambda: step.lower(bank[0][0]))


def _grads_zero(params):
    return jax.tree.map(lambda p: p * 0, params, is_leaf=u.math.is_quantity)


def _tree_add(a, b):
    return jax.tree.map(lambda x, y: x + y, a, b, is_leaf=u.math.is_quantity)


def fusetrace_learner(model: Network, batch: int, algorithm: str, **options) -> fusetrace.Learner:
    """`fusetrace.compile` of the unmodified model with this benchmark's loss."""
    x0 = jnp.zeros((batch, model.spec.n_in), brainstate.environ.dftype())
    return fusetrace.compile(model, x0, loss=loss, algorithm=algorithm, batch_size=batch, **options)


def summed_grads(learner: fusetrace.Learner, xs, ys):
    """Σ_t of `learner.step`'s gradients over the sequence `(xs, ys)` with the weights held fixed, in one
    compiled `lax.scan` (the online estimate that the fidelity benchmarks compare with BPTT)."""
    return summing(learner)(learner.params, xs, ys)


def summing(learner: fusetrace.Learner):
    """`jit((params, xs, ys) -> Σ_t of learner.step's gradients)` from the learner's initial state, the sum
    carried through the scan (no per-step stack); compiled once, for any weights of the same shapes."""

    @jax.jit
    def run(params, xs, ys):
        def body(carry, inputs):
            state, total = carry
            state, result = learner.step(params, state, *inputs)
            return (state, jax.tree.map(lambda a, b: a + b, total, result.grads, is_leaf=u.math.is_quantity)), None

        first = jax.tree.map(lambda a: a[0], (xs, ys))  # (the first step's gradient starts the sum, units and all)
        state, result = learner.step(params, learner.init(), *first)
        rest = jax.tree.map(lambda a: a[1:], (xs, ys))
        (_, total), _ = jax.lax.scan(body, (state, result.grads), rest)
        return total

    return run


def fusetrace_step(learner: fusetrace.Learner, bank) -> Program:
    """fusetrace's fused step, `jax.jit(learner.step)`, with its state carried from call to call. The state is
    donated (each call's old state is dropped), so XLA updates the traces in place instead of writing fresh
    buffers every step. It starts from a copy, as the initial state shares its arrays with the model."""
    step = jax.jit(learner.step, donate_argnums=1)
    params, carried = learner.params, {"state": jax.tree.map(jnp.copy, learner.init())}
    nxt = _cycle(bank)

    def run():
        carried["state"], result = step(params, carried["state"], *nxt())
        return result.grads

    return Program(run=run, lower=lambda: step.lower(params, carried["state"], bank[0][0], bank[1][0]))


def fusetrace_sequence(learner: fusetrace.Learner, spec: Spec, batch: int, steps: int) -> Program:
    """`steps` fused steps in one `lax.scan`, inputs drawn inside, gradients summed: what memory analysis sees."""

    @jax.jit
    def sequence(params, state, key):
        def body(carry, t):
            state, total = carry
            state, result = learner.step(params, state, *sample(key, t, batch, spec))
            return (state, _tree_add(total, result.grads)), result.loss

        (state, grads), losses = jax.lax.scan(body, (state, _grads_zero(params)), jnp.arange(steps))
        return state, grads, jnp.sum(losses)

    args = (learner.params, learner.init(), jr.key(2))
    return Program(run=lambda: sequence(*args), lower=lambda: sequence.lower(*args), steps=steps)


def forward_sequence(model: Network, batch: int, steps: int) -> Program:
    """`steps` plain model steps (no learning) in one loop."""
    spec = model.spec

    @brainstate.transform.jit
    def sequence(key):
        outs = brainstate.transform.for_loop(lambda t: model.update(sample(key, t, batch, spec)[0]), jnp.arange(steps))
        return jnp.sum(u.get_mantissa(outs))

    key = jr.key(2)
    return Program(run=lambda: sequence(key), lower=lambda: sequence.lower(key), steps=steps)


def bptt_sequence(model: Network, batch: int, steps: int) -> Program:
    """BPTT: the gradient of the summed loss of a `steps`-long sequence, from the model's current state."""
    spec = model.spec
    weights = model.states(brainstate.ParamState)

    def total(key):
        def body(t):
            x, y = sample(key, t, batch, spec)
            return loss(model.update(x), y)

        return jnp.sum(brainstate.transform.for_loop(body, jnp.arange(steps)))

    sequence = brainstate.transform.jit(brainstate.transform.grad(total, weights))
    key = jr.key(2)
    return Program(run=lambda: sequence(key), lower=lambda: sequence.lower(key), steps=steps)


def peer_step(learner, bank) -> Program:
    """braintrace's online step: the gradient of one step's loss through its learner (its public API)."""
    grad = brainstate.transform.grad(lambda x, y: loss(learner(x), y), learner.param_states)
    step = brainstate.transform.jit(grad)
    nxt = _cycle(bank)
    return Program(run=lambda: step(*nxt()), lower=lambda: step.lower(bank[0][0], bank[1][0]))


def peer_sequence(learner, spec: Spec, batch: int, steps: int) -> Program:
    """braintrace's `etrace_grad` over `steps` steps, inputs drawn inside, gradients summed."""

    @brainstate.transform.jit
    def sequence(key):
        def step_loss(t):
            x, y = sample(key, t, batch, spec)
            return loss(learner(x), y)

        return learner.etrace_grad(jnp.arange(steps), step_fn=step_loss, reduction="sum")

    key = jr.key(2)
    return Program(run=lambda: sequence(key), lower=lambda: sequence.lower(key), steps=steps)


METHODS = ("forward", "bptt", "fusetrace d_rtrl", "fusetrace es_d_rtrl", "braintrace D_RTRL", "braintrace pp_prop")
DECAY = 0.9  # es_d_rtrl's and pp_prop's smoothing factor


def methods() -> tuple[str, ...]:
    """The methods this installation can run (braintrace's only when it is installed)."""
    return METHODS if peer() is not None else METHODS[:4]


def learner_of(method: str, model: Network, batch: int):
    """The compiled learner behind an online method (compile once, then make programs of any length)."""
    if method == "fusetrace d_rtrl":
        return fusetrace_learner(model, batch, "d_rtrl")
    if method == "fusetrace es_d_rtrl":
        return fusetrace_learner(model, batch, "es_d_rtrl", decay=DECAY)
    if method == "braintrace D_RTRL":
        return twin(model, batch, "d_rtrl")
    if method == "braintrace pp_prop":
        return twin(model, batch, "pp_prop", decay_or_rank=DECAY)
    raise ValueError(f"{method!r} is not an online method: {METHODS[2:]}")


def sequence_maker(method: str, model: Network, batch: int) -> Callable[[int], Program]:
    """`make(steps) -> Program` running `method` over `steps` steps in one compiled call."""
    spec = model.spec
    if method == "forward":
        return lambda steps: forward_sequence(model, batch, steps)
    if method == "bptt":
        return lambda steps: bptt_sequence(model, batch, steps)
    learner = learner_of(method, model, batch)
    if method.startswith("fusetrace"):
        return lambda steps: fusetrace_sequence(learner, spec, batch, steps)
    return lambda steps: peer_sequence(learner, spec, batch, steps)


def step_program(method: str, model: Network, batch: int, bank, bptt_steps: int) -> Program:
    """One call of `method` for per-step timing: one step, or (BPTT) one `bptt_steps`-long sequence."""
    if method == "forward":
        return forward_step(model, bank)
    if method == "bptt":
        return bptt_sequence(model, batch, bptt_steps)
    learner = learner_of(method, model, batch)
    return fusetrace_step(learner, bank) if method.startswith("fusetrace") else peer_step(learner, bank)


# --------------------------------------------------------------------------- measuring


def interleaved_ms(programs: dict[str, Program], rounds: int, warmup: int = 2, min_round_s: float = 0.05) -> dict:
    """Median wall time per time step (ms) of each program, the programs taking turns within every round so
    that machine load falls on all of them alike. Each turn repeats a program until `min_round_s` passed."""
    for program in programs.values():
        for _ in range(warmup):
            jax.block_until_ready(program.run())
    samples: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(rounds):
        for name, program in programs.items():
            start = time.perf_counter()
            while True:
                begin = time.perf_counter()
                jax.block_until_ready(program.run())
                samples[name].append((time.perf_counter() - begin) * 1e3 / program.steps)
                if time.perf_counter() - start >= min_round_s:
                    break
    return {
        name: {
            "median_ms": statistics.median(values),
            "p10_ms": float(np.percentile(values, 10)),
            "p90_ms": float(np.percentile(values, 90)),
            "calls": len(values),
        }
        for name, values in samples.items()
    }


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")


@contextlib.contextmanager
def patched(module, **values):
    """`module`'s attributes set to `values` inside the block, restored after it (an ablation or another
    commit's function, read while a learner's program is traced)."""
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def first_iteration(trainer) -> list:
    """`[trainer, state]` after the trainer's iteration 0, which compiles it (what
    `interleaved_iterations` holds)."""
    return [trainer, trainer.iteration({**trainer.init(), "iteration": jnp.asarray(0)})[0]]


def interleaved_iterations(held: dict[str, list], rounds: int, *, reverse_odd_rounds: bool) -> dict[str, list]:
    """Seconds of each trainer's training iteration in every round, the trainers taking turns on the same
    batches. `held` maps a name to `[trainer, state]` (the state advanced in place; iteration `round + 1`,
    after a compiling one at 0). With `reverse_odd_rounds` every other round runs them in reverse order."""
    times: dict[str, list[float]] = {name: [] for name in held}
    for round_ in range(rounds):
        order = list(held)[::-1] if reverse_odd_rounds and round_ % 2 else list(held)
        for name in order:
            trainer, state = held[name]
            begin = time.perf_counter()
            held[name][1] = jax.block_until_ready(trainer.iteration({**state, "iteration": jnp.asarray(round_ + 1)})[0])
            times[name].append(time.perf_counter() - begin)
    return times


def print_medians(times: dict[str, list[float]]) -> None:
    """One line per name of `interleaved_iterations`' seconds: the median and the 25th percentile."""
    width = max(map(len, times), default=0) + 2
    for name, t in times.items():
        print(f"{name:{width}s} median {np.median(t):.3f} s  p25 {np.percentile(t, 25):.3f} s  ({len(t)} rounds)")


def compiled_memory(lowered) -> dict:
    """XLA's memory analysis of a lowered program: its fields, and `total_bytes` = arguments + outputs +
    temporaries − aliased (what the program holds at its peak, inputs included)."""
    stats = lowered.compile().memory_analysis()
    fields = {name: int(getattr(stats, name)) for name in MEMORY_FIELDS}
    fields["total_bytes"] = (
        fields["argument_size_in_bytes"]
        + fields["output_size_in_bytes"]
        + fields["temp_size_in_bytes"]
        - fields["alias_size_in_bytes"]
    )
    return fields


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: VmHWM of /proc/self/status. (getrusage's ru_maxrss
    would do, but Linux keeps it across execve, so a child would report its parent's peak.)"""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated now without swapping)."""
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


MEMORY_LIMIT_ENV = "FUSETRACE_BENCH_MEMORY_LIMIT"


def run_child(script: str, *args: str, timeout_s: float, memory_limit: int | None = None) -> dict:
    """Run `benchmarks/<script> *args` in a fresh process that prints one JSON line last; its dict, or
    {"error": ...}. With `memory_limit` the child caps its own address space (`apply_memory_limit`), so a
    run that does not fit fails inside the child instead of waking the machine's OOM killer."""
    env = dict(os.environ)
    if memory_limit is not None:
        env[MEMORY_LIMIT_ENV] = str(memory_limit)
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()][-1:] or [""]
        return {"error": f"exit {done.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def apply_memory_limit() -> None:
    """In a child started by `run_child(..., memory_limit=...)`: cap this process's address space."""
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))


# --------------------------------------------------------------------------- results files


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "brainstate": brainstate.__version__,
        "braintrace": peer_version(),
        "fusetrace_commit": _commit(),
        "float": f"float{64 if jax.config.jax_enable_x64 else 32}",
    }


def _commit() -> str:
    """The checkout the numbers were measured on (`-dirty`: with uncommitted changes)."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip() or "unknown"


def network_tag(network: str | None) -> str:
    """A results file's suffix for `--network MODULE:FACTORY`: `_FACTORY` (none for None)."""
    return "" if network is None else "_" + network.rpartition(":")[2]


def write_json(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1) + "\n")
    print(f"wrote {path}")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: pathlib.Path, title: str | None = None) -> None:
    """Title, lay out, write and close `figure`."""
    import matplotlib.pyplot as plt

    if title is not None:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {path}")


def output_paths(out: str | None, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(results JSON, plot PNG) for benchmark `name`: the repository's places, or under `out` when given."""
    if out is None:
        return RESULTS / f"{name}.json", IMAGES / f"bench-{name}.png"
    base = pathlib.Path(out)
    return base / "results" / f"{name}.json", base / "images" / f"bench-{name}.png"
