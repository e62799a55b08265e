"""What the whole-brain side-by-side benchmark runs (`benchmarks/connectome_side_by_side.py`): the same LIF
network on a connectome in fusetrace and in braintrace (the peer), and one compiled program per
configuration that advances it one chunk of steps. Not a script.

The peer's model is the very `ConnectomeNetwork` of `fusetrace.tasks.flybrain` (LIFRef neurons, Expon
current synapse, Poisson drive, neuropil-pooled leaky rates) with one change: its recurrent projection's
`comm` is braintrace's own `braintrace.nn.SparseLinear` on the same CSR matrix and weights, because
braintrace only sees weights that go through its ETP ops. braintrace's `sparse_matmul` binds a raw array,
so it cannot take brainevent's `BinaryArray` (the event-driven product): the peer's layer unwraps the spikes
and runs brainevent's float CSR product (`peer_event_error` records what it raises otherwise).

Configurations (`MODES`), each timed over chunks of `chunk` steps (`chunk` = the gradient period):

* `forward`: the plain model, no learning (`brainstate.transform.for_loop` of `update`);
* `every_step`: online learning with a gradient at every step (summed over the chunk);
* `every_50`: the states and traces advance at every step, a gradient is formed at the chunk's last step
  only (fusetrace: `learner.step(..., gradient=False)`; braintrace: `etrace_evolve` then `etrace_grad`);
* `trace_only`: the states and traces advance, no gradient at all (what the gradient costs is the
  difference to `every_step`);
* `scan`: (fusetrace only) the loss at every step and one gradient per chunk, their sum: `Learner.scan`
  over the chunk with its default `chunk` (issue 17's whole-brain configuration; its binary CSR products
  are deferred and contracted event by event, `passes/events.py`).

fusetrace runs `es_d_rtrl`, braintrace `pp_prop` (its ES-D-RTRL), both with the same decay.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import brainevent
import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import fusetrace
from fusetrace.tasks import Connectome, connectome_network, flybrain, mse_loss

MODES = ("forward", "every_step", "every_50", "trace_only", "scan")
LIBRARIES = ("fusetrace", "braintrace")
PEER_ALGORITHM = "pp_prop"


@dataclasses.dataclass(frozen=True)
class Setup:
    """The network's graph, its driven neurons and the benchmark's input: every driven neuron fires Poisson
    spikes at `rate_hz`, drawn inside each chunk's program from (`seed`, chunk index); the loss pulls every
    neuropil's rate towards `target_hz`."""

    graph: Connectome
    drive: np.ndarray
    chunk: int = 50
    decay: float = 0.99
    rate_hz: float = 100.0
    target_hz: float = 20.0
    seed: int = 0

    @property
    def n_drive(self) -> int:
        return int(self.drive.shape[0])

    def inputs(self, k) -> tuple[jax.Array, u.Quantity]:
        """Chunk `k`'s drive spikes (chunk, n_drive) and clock (chunk,) in ms (steps k·chunk, ...)."""
        p = self.rate_hz * flybrain.DT_MS * 1e-3
        key = jr.fold_in(jr.key(self.seed), k)
        spikes = (jr.uniform(key, (self.chunk, self.n_drive)) < p).astype(jnp.float32)
        steps = k * self.chunk + jnp.arange(self.chunk)
        return spikes, u.Quantity(steps.astype(jnp.float32) * flybrain.DT_MS, unit=u.ms)

    def target(self, weight) -> tuple[jax.Array, Any]:
        """`mse_loss`'s target at a step whose loss counts `weight` (1, or 0 for no loss)."""
        rates = jnp.full((self.graph.n_neuropils,), self.target_hz, jnp.float32)
        return rates, jnp.asarray(weight, jnp.float32)


def setup(graph: Connectome, **options) -> Setup:
    """The benchmark's `Setup` on `graph`: drive to `flybrain.DRIVE_FRACTION` of the neurons (seed 0)."""
    drive = flybrain.drive_neurons(graph, max(1, round(flybrain.DRIVE_FRACTION * graph.n_neurons)))
    return Setup(graph, drive, **options)


def first_inputs(config: Setup) -> tuple:
    """One step's example inputs `(spikes, t)`, for the compilers."""
    return jnp.zeros((config.n_drive,), jnp.float32), flybrain.clock(1)[0]


# --------------------------------------------------------------------------- the two models


def peer_layer_class() -> type:
    """`braintrace.nn.SparseLinear`, taking brainevent's `BinaryArray` spikes as the float array they hold."""
    import braintrace

    class PeerSparseLinear(braintrace.nn.SparseLinear):
        def update(self, x):
            return super().update(x.value if isinstance(x, brainevent.BinaryArray) else x)

    return PeerSparseLinear


def peer_event_error(graph: Connectome) -> str | None:
    """What braintrace's own layer raises when given event-driven (`BinaryArray`) spikes, or None."""
    import braintrace

    layer = braintrace.nn.SparseLinear(graph.csr(), in_size=(graph.n_neurons,))
    try:
        layer(brainevent.BinaryArray(jnp.zeros((graph.n_neurons,), jnp.float32)))
    except Exception as error:  # any refusal is the finding
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    return None


def network(config: Setup, library: str) -> flybrain.ConnectomeNetwork:
    """The unbatched network for `library`: fusetrace's as `connectome_network` builds it; braintrace's the
    same with its recurrent `comm` swapped for braintrace's sparse layer (same CSR, same weights)."""
    model = connectome_network(config.graph, drive=config.drive, batch_size=None)
    if library == "braintrace":
        model.rec.comm = peer_layer_class()(config.graph.csr(), in_size=(config.graph.n_neurons,))
        brainstate.nn.init_all_states(model)
    return model


# --------------------------------------------------------------------------- forward


def forward_program(model: flybrain.ConnectomeNetwork, config: Setup) -> Callable[[int], Any]:
    """`run(k)`: chunk `k` of the plain model; returns (spikes, synaptic events) summed over the chunk."""
    out_degree = jnp.asarray(config.graph.out_degree(), jnp.float32)

    def one(x, t):
        model.update(x, t)
        spikes = u.get_mantissa(model.neurons.get_spike())  # this step's spikes (reset at the next step)
        return jnp.sum(spikes), spikes @ out_degree

    @brainstate.transform.jit
    def sbs_chunk_forward(k):
        spikes, events = brainstate.transform.for_loop(one, *config.inputs(k))
        return jnp.sum(spikes), jnp.sum(events)

    return lambda k: sbs_chunk_forward(jnp.asarray(k, jnp.int32))


# --------------------------------------------------------------------------- fusetrace


def fusetrace_learner(model, config: Setup) -> fusetrace.Learner:
    return fusetrace.compile(
        model, *first_inputs(config), loss=mse_loss, algorithm="es_d_rtrl", batch_size=None, decay=config.decay
    )


def _advance(learner, params, state, xs, ts, config: Setup, constants):
    """Steps without a gradient (and with zero loss) over `xs`, `ts`."""

    def body(state, x):
        state, _ = learner.step(params, state, x, config.target(0.0), gradient=False, constants=constants)
        return state, None

    return jax.lax.scan(body, state, (xs, ts))[0]


def _with_gradients(learner, params, state, xs, ts, config: Setup, constants):
    """Steps with a gradient each over `xs`, `ts`: the new state and the summed gradients."""

    def body(carry, x):
        state, total = carry
        state, result = learner.step(params, state, x, config.target(1.0), constants=constants)
        return (state, jax.tree.map(jnp.add, total, result.grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    return jax.lax.scan(body, (state, zeros), (xs, ts))[0]


def fusetrace_program(learner: fusetrace.Learner, config: Setup, mode: str) -> Callable[[int], Any]:
    """`run(k)`: chunk `k` of fusetrace's online learner in `mode`, its state carried from call to call.
    The graph's index arrays (`learner.constants`) are arguments of the compiled chunk, not constants
    XLA would embed (and fold) in it."""

    def sbs_chunk(params, state, constants, k):
        xs, ts = config.inputs(k)
        if mode == "every_step":
            return _with_gradients(learner, params, state, xs, ts, config, constants)
        if mode == "trace_only":
            state = _advance(learner, params, state, xs, ts, config, constants)
            return state, state["traces"]
        if mode == "scan":
            targets = jax.tree.map(lambda a: jnp.broadcast_to(a, (xs.shape[0], *a.shape)), config.target(1.0))
            state, result = learner.scan(params, state, (xs, ts), targets, constants=constants)
            return state, result.grads
        state = _advance(learner, params, state, xs[:-1], ts[:-1], config, constants)
        return _with_gradients(learner, params, state, xs[-1:], ts[-1:], config, constants)

    program = jax.jit(sbs_chunk, donate_argnums=1)
    # a copy: init() hands out the learner's own initial arrays, which donation would delete
    params, carried = learner.params, {"state": jax.tree.map(jnp.copy, learner.init())}
    constants = learner.constants

    def run(k):
        carried["state"], result = program(params, carried["state"], constants, jnp.asarray(k, jnp.int32))
        return result

    return run


def fusetrace_trace_bytes(learner: fusetrace.Learner) -> int:
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(learner.init()["traces"])))


# --------------------------------------------------------------------------- braintrace


def braintrace_learner(model, config: Setup):
    import braintrace

    return braintrace.compile(model, PEER_ALGORITHM, *first_inputs(config), batch_size=None, decay_or_rank=config.decay)


def braintrace_program(learner, config: Setup, mode: str) -> Callable[[int], Any]:
    """`run(k)`: chunk `k` of braintrace's learner in `mode` through its public sequence drivers
    (`etrace_grad`, `etrace_evolve`); its states live in the learner."""

    def step_loss(x, t):
        return mse_loss(learner(x, t), config.target(1.0))

    def gradients(xs, ts):
        return learner.etrace_grad(xs, ts, step_fn=step_loss, reduction="sum")

    @brainstate.transform.jit
    def sbs_chunk(k):
        xs, ts = config.inputs(k)
        if mode == "every_step":
            return gradients(xs, ts)
        learner.etrace_evolve(xs if mode == "trace_only" else xs[:-1], ts if mode == "trace_only" else ts[:-1])
        if mode == "trace_only":
            return learner.running_index.value
        return gradients(xs[-1:], ts[-1:])

    return lambda k: sbs_chunk(jnp.asarray(k, jnp.int32))


def braintrace_trace_bytes(learner) -> int:
    import braintrace

    traces = learner.states(braintrace.EligibilityTrace)
    return int(sum(leaf.nbytes for state in traces.values() for leaf in jax.tree.leaves(state.value)))


def program(library: str, mode: str, config: Setup) -> tuple[Callable[[int], Any], dict]:
    """Build `library`'s model (and learner) and `run(k)` for `mode`; also what it holds (trace bytes)."""
    model = network(config, library)
    if mode == "forward":
        return forward_program(model, config), {}
    if library == "fusetrace":
        learner = fusetrace_learner(model, config)
        info = {"trace_bytes": fusetrace_trace_bytes(learner)}
        return fusetrace_program(learner, config, mode), info
    learner = braintrace_learner(model, config)
    return braintrace_program(learner, config, mode), {"trace_bytes": braintrace_trace_bytes(learner)}


# --------------------------------------------------------------------------- the fit and BPTT


def _teacher_task(config: Setup, duration_ms: float, seed: int) -> tuple:
    """A trial as `fusetrace.tasks.neuropil_rate_task` draws it, unbatched: every driven neuron at its own
    rate in 50–150 Hz; the targets are the rates of the network with `perturbed_weights` (the optimum)."""
    steps = round(duration_ms / flybrain.DT_MS)
    rng = np.random.default_rng(seed)
    rates = rng.uniform(50.0, 150.0, size=config.n_drive)
    spikes = jnp.asarray(rng.random((steps, config.n_drive)) < rates * flybrain.DT_MS * 1e-3, jnp.float32)
    teacher_weights = flybrain.perturbed_weights(config.graph, seed=1)
    teacher = connectome_network(config.graph, drive=config.drive, weights=teacher_weights, batch_size=None)
    times = flybrain.clock(steps)
    targets = brainstate.transform.jit(lambda xs, ts: brainstate.transform.for_loop(teacher.update, xs, ts))
    return spikes, times, jnp.asarray(targets(spikes, times)), teacher_weights


def fit(config: Setup, *, duration_ms: float, iterations: int, learning_rate: float, seed: int = 0) -> dict:
    """Fit the neuropil rates online with fusetrace (es_d_rtrl, unbatched), one Adam update per read-out
    (every `config.chunk` steps = 10 ms; the steps between carry no loss and form no gradient), the same
    trial `iterations` times from rest. Returns the read-out losses of every iteration and the distance of
    the weights to the teacher's (1 at the start)."""
    import optax

    spikes, times, targets, teacher_weights = _teacher_task(config, duration_ms, seed)
    learner = fusetrace_learner(network(config, "fusetrace"), config)
    optimizer = optax.adam(learning_rate)
    every = config.chunk

    @jax.jit
    def window(params, opt_state, state, constants, xs, ts, target):
        state = _advance(learner, params, state, xs[:-1], ts[:-1], config, constants)
        target = (target, jnp.float32(1.0))
        state, result = learner.step(params, state, (xs[-1], ts[-1]), target, constants=constants)
        updates, opt_state = optimizer.update(result.grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, result.loss

    params = learner.params
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(iterations):
        state, trial = learner.init(), []
        for w in range(spikes.shape[0] // every):
            window_slice = slice(w * every, (w + 1) * every)
            params, opt_state, state, loss = window(
                params,
                opt_state,
                state,
                learner.constants,
                spikes[window_slice],
                times[window_slice],
                targets[(w + 1) * every - 1],
            )
            trial.append(float(loss))
        losses.append(trial)
    weights = np.asarray(u.get_mantissa(params["rec.comm.weight"]["weight"]), np.float64)
    start = np.linalg.norm(config.graph.weights - teacher_weights)
    return {
        "readout_losses": losses,
        "mean_loss_per_iteration": [float(np.mean(trial)) for trial in losses],
        "distance_to_teacher": float(np.linalg.norm(weights - teacher_weights) / start),
        "updates": iterations * (spikes.shape[0] // every),
        "learning_rate": learning_rate,
        "duration_ms": duration_ms,
    }


def bptt_memory(config: Setup, short: int, long: int, steps: int, compiled_memory: Callable, run_below: float) -> dict:
    """BPTT of the plain model (brainstate's grad through a `for_loop`) over `short` and `long` steps:
    XLA's compiled memory of each, the bytes stored per step (their difference over `long - short`) and
    the estimate for `steps` steps. When the estimate is below `run_below` bytes, BPTT over `steps` steps
    also runs (once to compile, once timed), to check the estimate against the peak RSS."""
    model = network(config, "fusetrace")
    weights = model.states(brainstate.ParamState)

    def total(xs, ts):
        losses = brainstate.transform.for_loop(lambda x, t: mse_loss(model.update(x, t), config.target(1.0)), xs, ts)
        return jnp.sum(losses)

    gradient = brainstate.transform.jit(brainstate.transform.grad(total, weights))
    memory = {}
    for length in (short, long):
        xs = jnp.zeros((length, config.n_drive), jnp.float32)
        memory[length] = compiled_memory(gradient.lower(xs, flybrain.clock(length)))
    per_step = (memory[long]["total_bytes"] - memory[short]["total_bytes"]) / (long - short)
    estimate = memory[short]["total_bytes"] + per_step * (steps - short)
    result = {
        "compiled": {str(length): fields for length, fields in memory.items()},
        "bytes_per_step": per_step,
        "steps": steps,
        "estimate_bytes": estimate,
    }
    if estimate < run_below:
        xs, ts = dataclasses.replace(config, chunk=steps).inputs(0)
        jax.block_until_ready(gradient(xs, ts))
        start = time.perf_counter()
        jax.block_until_ready(gradient(xs, ts))
        result["ran"] = {"ms_per_step": 1e3 * (time.perf_counter() - start) / steps}
    else:
        result["ran"] = f"not run: the estimate exceeds {run_below / 1e9:.1f} GB (half of what is available)"
    return result
