"""Multi-device: `fusetrace.shard_step` against the single-device step (float32, one-step windows).

XLA's device count is fixed when jax starts and this suite's own process runs float64 on one device, so
the checks run in child processes (this file run as a script): one with 4 forced CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`) and two joined by `jax.distributed` over
loopback with gloo CPU collectives. Each prints one JSON line that the tests read.

Models: a dense recurrent LIF network with a leaky readout (`RecurrentLIFReadout`) and a small generated
connectome (CSR weights through brainevent's pure-JAX kernels, which the partitioner can split), both
under `es_d_rtrl`, batch 8, 20 steps. Modes: data-parallel (batch over 4 devices), neuron-parallel
(neurons and the post axis of weights over 4 devices) and both (2 × 2, connectome only).
"""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import fusetrace

RTOL_F32 = 1e-6  # the acceptance bound; a reordered float32 sum differs by ~1e-7 relative
DEVICES = 4
# 20 steps (50 until 2026-12-06: the 4-device child took 83 s of CPU, 44 at 20; both networks spike, 196
# and 47 spikes in 20 steps)
BATCH, STEPS, N_IN, N_REC, N_OUT = 8, 20, 16, 64, 4
CONNECTOME = {"n_neurons": 256, "n_edges": 256 * 40, "n_drive": 16}  # 10,240 connections: divisible by 4
DISTRIBUTED_STEPS = 20  # two processes on 2 cores: each step waits on the other over loopback
CHILD_TIMEOUT_S = 300
COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def _child(*args: str, devices: int, timeout: float = CHILD_TIMEOUT_S) -> subprocess.Popen:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _result(process: subprocess.Popen, timeout: float = CHILD_TIMEOUT_S) -> dict:
    out, err = process.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert process.returncode == 0 and lines, f"child failed (exit {process.returncode}):\n{err[-3000:]}"
    return json.loads(lines[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def children() -> dict:
    """All three child processes, started together (their start-up and compilation overlap)."""
    port = str(_free_port())
    devices = _child("devices", devices=DEVICES)
    processes = [_child("process", str(i), port, devices=2) for i in range(2)]
    return {"devices": _result(devices), "processes": [_result(p) for p in processes]}


@pytest.fixture(scope="module")
def four_devices(children) -> dict:
    return children["devices"]


def _cases(report: dict):
    return [(name, mode, case) for name, modes in report.items() for mode, case in modes.items()]


def test_sharded_steps_equal_the_single_device_step(four_devices):
    """States (model and traces), outputs, losses and gradients of every step, all `STEPS`."""
    for name, mode, case in _cases(four_devices):
        assert case["steps"] == STEPS
        assert case["max_relative_error"] <= RTOL_F32, f"{name} {mode}: {case['max_relative_error']:.3g}"
        assert case["spikes"] > 0, f"{name} {mode}: no spike in {STEPS} steps; the comparison would prove little"


RTOL_F32_SUM = 1e-5  # 20 float32 steps summed in another order (and es_d_rtrl's products deferred: one GEMM)


def test_sharded_scan_equals_the_summed_single_device_steps(four_devices):
    for name, mode, case in _cases(four_devices):
        assert case["scan_relative_error"] <= RTOL_F32_SUM, f"{name} {mode}: {case['scan_relative_error']:.3g}"


def _float_arrays(case: dict, ops: tuple[str, ...]) -> list[int]:
    """Sizes of the float arrays moved by the given collectives."""
    return [
        int(np.prod(shape, dtype=int))
        for op, arrays in case["collectives"]
        if op in ops
        for dtype, shape in arrays
        if dtype.startswith("f")
    ]


MOVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def test_data_parallel_all_reduces_the_gradients(four_devices):
    """The gradient (a sum over the batch) is all-reduced; nothing else moves more than batch × neurons."""
    for name in four_devices:
        case = four_devices[name]["data"]
        assert case["largest_weight"] in _float_arrays(case, ("all-reduce",)), case["collectives"]
        others = _float_arrays(case, tuple(op for op in MOVES if op != "all-reduce"))
        assert all(size <= case["activity"] for size in others), case["collectives"]


def test_neuron_parallel_moves_activity_never_weights(four_devices):
    """Presynaptic activity is all-gathered; no collective moves more than batch × neurons floats, so never
    a weight (n_pre × n_post, or the connections of a sparse matrix) nor its gradient or trace. (The
    connectome also all-gathers n_edges int32: brainevent's pure-JAX kernel recomputes each connection's
    row from `indptr` every step — index bookkeeping, not a weight; see docs/connectome.md.)"""
    for name, modes in four_devices.items():
        case = modes["neuron"]
        assert _float_arrays(case, ("all-gather",)), (name, case["collectives"])
        assert max(_float_arrays(case, MOVES)) <= case["activity"] < case["largest_weight"], (name, case["collectives"])


def test_both_axes_all_reduce_only_each_devices_slice_of_the_gradient(four_devices):
    """On a 2 × 2 mesh the gradient is summed over the data axis slice by slice: each all-reduce carries
    the device's half of the connections, never the whole weight."""
    case = four_devices["connectome"]["both"]
    assert case["largest_weight"] // 2 in _float_arrays(case, ("all-reduce",)), case["collectives"]
    assert max(_float_arrays(case, MOVES)) < case["largest_weight"], case["collectives"]
    others = _float_arrays(case, tuple(op for op in MOVES if op != "all-reduce"))
    assert max(others) <= case["activity"], case["collectives"]


def test_weights_and_states_are_split(four_devices):
    """Each device holds a quarter of the recurrent weight (by post neuron, or by connection) and of the
    hidden state (by batch entry or by neuron)."""
    dense, sparse = four_devices["dense"], four_devices["connectome"]
    assert dense["neuron"]["local_shapes"]["rec.comm.weight"] == [N_REC, N_REC // DEVICES]
    assert sparse["neuron"]["local_shapes"]["rec.comm.weight"] == [CONNECTOME["n_edges"] // DEVICES]
    assert dense["data"]["local_shapes"]["rec.comm.weight"] == [N_REC, N_REC]  # replicated
    assert dense["data"]["local_shapes"]["neurons.V"] == [BATCH // DEVICES, N_REC]
    assert dense["neuron"]["local_shapes"]["neurons.V"] == [BATCH, N_REC // DEVICES]
    assert sparse["both"]["local_shapes"]["rec.comm.weight"] == [CONNECTOME["n_edges"] // 2]


def test_two_processes_give_the_gradients_of_one(children):
    """`jax.distributed` on loopback (gloo CPU collectives), 2 processes × 2 devices, data-parallel: each
    process feeds only its own batch rows; the gradients and losses of 20 steps equal those of one process
    with the whole batch."""
    for i, result in enumerate(children["processes"]):
        assert result["process"] == i and result["global_devices"] == 4 and result["local_devices"] == 2
        assert result["max_relative_error"] <= RTOL_F32, result


def test_shard_step_refuses_what_it_cannot_split():
    import brainstate

    from fusetrace.tasks import base

    base.begin_network(1.0, 0)
    net = base.RecurrentLIFReadout(3, 4, 2, tau_m_ms=20.0, readout_tau_ms=20.0, in_scale=4.0, rec_scale=2.0)
    brainstate.nn.init_all_states(net)
    learner = fusetrace.compile(net, np.zeros(3), loss=_loss, algorithm="es_d_rtrl")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    for options in ({"batch_axis": "data"}, {"neuron_axis": "model"}, {}):
        with pytest.raises(fusetrace.errors.CompileError):
            fusetrace.shard_step(learner, mesh, **options)


# --------------------------------------------------------------------------- child processes


def _loss(output, target):
    import brainunit as u
    import jax.numpy as jnp

    return jnp.sum((u.get_mantissa(output) - target) ** 2)


def _dense_case():
    import brainstate
    import jax.numpy as jnp

    from fusetrace.tasks import base

    base.begin_network(1.0, 0)
    net = base.RecurrentLIFReadout(N_IN, N_REC, N_OUT, tau_m_ms=20.0, readout_tau_ms=20.0, in_scale=4.0, rec_scale=2.0)
    brainstate.nn.init_all_states(net, batch_size=BATCH)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.random((STEPS, BATCH, N_IN)) < 0.2, jnp.float32)
    ys = jnp.asarray(rng.normal(size=(STEPS, BATCH, N_OUT)), jnp.float32)
    return net, [xs[t] for t in range(STEPS)], ys


def _connectome_case():
    import jax.numpy as jnp

    from fusetrace.tasks import clock, connectome_network, drive_neurons, generate_connectome

    graph = generate_connectome(CONNECTOME["n_neurons"], CONNECTOME["n_edges"], seed=0)
    drive = drive_neurons(graph, CONNECTOME["n_drive"])
    net = connectome_network(graph, drive=drive, batch_size=BATCH)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.random((STEPS, BATCH, drive.shape[0])) < 0.05, jnp.float32)
    ys = jnp.asarray(rng.random((STEPS, BATCH, graph.n_neuropils)) * 20.0, jnp.float32)
    times = clock(STEPS)
    return net, [(xs[t], times[t]) for t in range(STEPS)], ys


def _run(step, params, state, inputs, targets) -> list:
    history = []
    for x, y in zip(inputs, targets, strict=True):
        state, result = step(params, state, x, y)
        history.append((state, result))
    return history


def _relative(a, b) -> float:
    import brainunit as u

    a = np.asarray(u.get_mantissa(a), np.float64)
    b = np.asarray(u.get_mantissa(b), np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else float(np.linalg.norm(a))


def _max_error(history, reference) -> float:
    import brainunit as u

    worst = 0.0
    for got, want in zip(history, reference, strict=True):
        pairs = zip(
            jax.tree.leaves(got, is_leaf=u.math.is_quantity),
            jax.tree.leaves(want, is_leaf=u.math.is_quantity),
            strict=True,
        )
        worst = max([worst, *(_relative(a, b) for a, b in pairs)])
    return worst


def _collectives(hlo: str) -> list:
    found = []
    for line in hlo.splitlines():
        match = COLLECTIVE.search(line)
        if match:
            arrays = [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims in ARRAY.findall(match.group(1))]
            found.append((match.group(2), arrays))
    return found


def _path_of(learner, state) -> str:
    """The key of a model state in `learner.init()["model"]` (states are keyed by identity, not path)."""
    captured = learner.analysis.captured
    index = next(i for i, other in enumerate(captured.states) if other is state)
    return next(leaf.state_path for i, leaf in enumerate(captured.leaves) if captured.leaf_state[i] == index)


def _local_shapes(params, state, v_path) -> dict:
    import brainunit as u

    def shape(x):
        return list(u.get_mantissa(x).addressable_shards[0].data.shape)

    weight = params["rec.comm.weight"]
    weight = weight["weight"] if isinstance(weight, dict) else weight
    return {"rec.comm.weight": shape(weight), "neurons.V": shape(state["model"][v_path])}


def _spike_count(history, v_path, threshold) -> int:
    import brainunit as u

    return int(sum(np.sum(np.asarray(u.get_mantissa(state["model"][v_path])) >= threshold) for state, _ in history))


def _devices_main() -> dict:
    import brainevent
    import brainstate
    import brainunit as u
    from jax.sharding import Mesh

    brainstate.environ.set(precision=32)
    brainevent.config.set_backend("cpu", "jax_raw")  # numba kernels are custom calls the partitioner cannot split
    devices = np.array(jax.devices())
    assert devices.size == DEVICES, devices
    modes = {
        "data": (Mesh(devices, ("data",)), {"batch_axis": "data"}),
        "neuron": (Mesh(devices, ("neurons",)), {"neuron_axis": "neurons"}),
        "both": (Mesh(devices.reshape(2, 2), ("data", "neurons")), {"batch_axis": "data", "neuron_axis": "neurons"}),
    }
    report = {}
    for name, make, mode_names in (
        ("dense", _dense_case, ("data", "neuron")),
        ("connectome", _connectome_case, tuple(modes)),
    ):
        net, inputs, targets = make()
        example = inputs[0] if isinstance(inputs[0], tuple) else (inputs[0],)
        learner = fusetrace.compile(net, *example, loss=_loss, algorithm="es_d_rtrl", batch_size=BATCH)
        reference = _run(jax.jit(learner.step), learner.params, learner.init(), inputs, targets)
        v_path = _path_of(learner, net.neurons.V)
        threshold = float(np.max(u.get_mantissa(net.neurons.V_th)))
        weights = jax.tree.leaves(learner.params, is_leaf=u.math.is_quantity)
        largest = max(int(np.prod(np.shape(u.get_mantissa(w)))) for w in weights)
        activity = BATCH * int(np.prod(net.neurons.varshape))
        report[name] = {}
        for mode in mode_names:
            mesh, axes = modes[mode]
            sharded = fusetrace.shard_step(learner, mesh, **axes)
            params, state = sharded.place(learner.params, learner.init())
            compiled = sharded.lower(params, state, inputs[0], targets[0]).compile()  # run what the HLO shows
            history = _run(compiled, params, state, inputs, targets)
            hlo = compiled.as_text()
            report[name][mode] = {
                "steps": len(history),
                "max_relative_error": _max_error(history, reference),
                "collectives": _collectives(hlo),
                "largest_weight": largest,
                "activity": activity,
                "local_shapes": _local_shapes(params, state, v_path),
                "replicated": list(sharded.replicated),
                "spikes": _spike_count(reference, v_path, threshold),
                "scan_relative_error": _scan_error(sharded, learner, inputs, targets, reference),
            }
    return report


def _scan_error(sharded, learner, inputs, targets, reference) -> float:
    """`ShardedStep.scan` over the whole sequence against the sum of the single-device steps' gradients."""
    params, state = sharded.place(learner.params, learner.init())
    stack = lambda items: jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *items)
    _, result = sharded.scan(params, state, stack(inputs), stack(targets), np.ones(len(inputs), bool))
    summed = jax.tree.map(
        lambda *leaves: sum(np.asarray(leaf, np.float64) for leaf in leaves), *[r.grads for _, r in reference]
    )
    return max(
        _relative(got, want) for got, want in zip(jax.tree.leaves(result.grads), jax.tree.leaves(summed), strict=True)
    )


def _process_main(process: int, port: str) -> dict:
    """One of two processes: data-parallel over 2 × 2 devices, fed only this process's batch rows."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process, initialization_timeout=120)
    import brainstate
    import jax.numpy as jnp
    from jax.sharding import Mesh

    brainstate.environ.set(precision=32)
    net, inputs, targets = _dense_case()
    learner = fusetrace.compile(net, inputs[0], loss=_loss, algorithm="es_d_rtrl", batch_size=BATCH)
    sharded = fusetrace.shard_step(learner, Mesh(np.array(jax.devices()), ("data",)), batch_axis="data")
    params, state = sharded.place(learner.params, learner.init())
    rows = slice(process * BATCH // 2, (process + 1) * BATCH // 2)
    reference_step, reference_state = jax.jit(learner.step), learner.init()
    worst = 0.0
    for x, y in zip(inputs[:DISTRIBUTED_STEPS], targets[:DISTRIBUTED_STEPS], strict=True):
        x_local = sharded.from_local(np.asarray(x)[rows], sharded.inputs, x)
        y_local = sharded.from_local(np.asarray(y)[rows], sharded.target, y)
        state, result = sharded.step(params, state, x_local, y_local)
        reference_state, reference = reference_step(learner.params, reference_state, jnp.asarray(x), jnp.asarray(y))
        grads = jax.tree.map(lambda g: g.addressable_data(0), jax.tree.leaves(result.grads))  # replicated
        for got, want in zip(grads, jax.tree.leaves(reference.grads), strict=True):
            worst = max(worst, _relative(got, want))
        worst = max(worst, _relative(result.loss.addressable_data(0), reference.loss))
    report = {
        "process": jax.process_index(),
        "global_devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
        "max_relative_error": worst,
    }
    jax.distributed.shutdown()
    return report


if __name__ == "__main__":
    mode = sys.argv[1]
    payload = _devices_main() if mode == "devices" else _process_main(int(sys.argv[2]), sys.argv[3])
    print(json.dumps(payload))
