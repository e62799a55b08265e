"""Run a `Learner`'s fused step on several devices with `jax.sharding`.

`shard_step(learner, mesh, batch_axis=..., neuron_axis=...)` gives a `ShardedStep`: the `NamedSharding` of
every leaf of the params, the state, the inputs, the target and the result, and ONE `jax.jit` of
`learner.step` with those `in_shardings`/`out_shardings`. XLA's SPMD partitioner inserts every collective;
nothing here communicates by hand.

* **Data-parallel** (`batch_axis`): the batch axis of the model states, of every trace and of the inputs
  and targets is split over that mesh axis; weights are replicated, so each step's gradient — a sum over
  the batch — comes out of an all-reduce. A sparse weight's gradient is formed by a loop over the batch
  (`derive.connection_products`); the step is traced under `derive.batch_groups(devices)`, so each
  device's part of the batch is summed on that device, then all-reduced.
* **Neuron-parallel** (`neuron_axis`): the neuron axis of the hidden states (and of the other states of
  the same shape), of the traces' postsynaptic factors, of presynaptic factors that are a neuron
  population, and the post axis of the weights are split: a dense `(n_pre, n_post)` weight by its columns,
  a per-synapse sparse weight (CSR data, fixed-probability rows) by its connections. The gradient of a
  split weight stays split; presynaptic activity (`batch × n_pre`) moves between devices, never a weight.
* Both at once on a 2-d mesh.

An axis whose size the mesh axis does not divide stays replicated (a small readout of 2 outputs, a sparse
weight with an odd number of connections); `ShardedStep.replicated` lists what was left whole and why.

Multi-host: call `jax.distributed.initialize(...)` first and build the mesh over `jax.devices()` (all
processes); `ShardedStep.from_local(...)` assembles global arrays from each process's own batch rows.

Sharp edge: brainevent's CPU kernels (numba) and GPU kernels are custom calls, which the partitioner cannot
split: it gathers their operands. With sparse weights choose its pure-JAX kernels,
`brainevent.config.set_backend("cpu", "jax_raw")`, before the first call (docs/connectome.md).
"""

import dataclasses
from typing import Any

import brainunit as u
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .api import Learner, StepResult
from .errors import CompileError, four_part
from .passes.components import FACTOR_NEURON_AXIS, UNBATCHED_FACTORS
from .passes.derive import batch_groups
from .passes.factorised import factorised, has_components
from .passes.layout import layout_kind
from .sequence import ScanResult


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedStep:
    """A learner's step placed on a mesh. Every sharding attribute is a pytree shaped like the value it
    places (a `NamedSharding` per array; a Quantity's sharding is that of its mantissa).

    Attributes:
        learner: the compiled learner.
        mesh: the device mesh.
        params: shardings of `learner.params` (and of the gradients).
        state: shardings of `learner.init()`.
        inputs: shardings of one step's input `x_t`.
        target: shardings of one step's target.
        result: shardings of the `StepResult`.
        step: `step(params, state, x_t, target_t) -> (state, StepResult)`, jit-compiled with these shardings;
            the learner's `constants` (a graph's index arrays) are a replicated argument of that program,
            placed once, not constants embedded in it.
        replicated: `(what, why)` for each array left whole on an axis it could have been split on.
        scan: `scan(params, state, xs, targets, loss_mask) -> (state, ScanResult)`: `Learner.scan` with the
            same shardings (the time axis of the sequence and of its outputs replicated), jit-compiled.
    """

    learner: Learner
    mesh: Mesh
    params: Any
    state: Any
    inputs: Any
    target: Any
    result: Any
    step: Any  # a jax.jit-wrapped function with the constants bound (has .lower)
    replicated: tuple[tuple[str, str], ...]
    scan: Any = None  # `scan(params, state, xs, targets, loss_mask) -> (state, ScanResult)`, sharded likewise

    def place(self, params, state) -> tuple[Any, Any]:
        """`params` and `state` moved onto the mesh with their shardings (single process, or every process
        holding the same full values)."""
        return jax.device_put(params, self.params), jax.device_put(state, self.state)

    def place_inputs(self, x_t, target_t) -> tuple[Any, Any]:
        """One step's input and target on the mesh (the full batch given)."""
        return jax.device_put(x_t, self.inputs), jax.device_put(target_t, self.target)

    def from_local(self, tree, shardings, global_tree):
        """Global arrays from this process's rows of the batch (multi-host data parallelism).

        Arguments:
            tree: this process's part of an input/target/state pytree (its batch rows only).
            shardings: the matching sharding pytree (`self.inputs`, `self.target` or `self.state`).
            global_tree: a pytree of the global values or `jax.ShapeDtypeStruct`s (for the shapes).
        """

        def build(local, sharding, full):
            array = jax.make_array_from_process_local_data(sharding, np.asarray(u.get_mantissa(local)), _shape(full))
            return u.Quantity(array, unit=u.get_unit(local)) if u.math.is_quantity(local) else array

        return jax.tree.map(build, tree, shardings, global_tree, is_leaf=u.math.is_quantity)

    def lower(self, params, state, x_t, target_t):
        """The jax `Lowered` of one step, its constants bound (`.compile()` runs on the same four arguments;
        `.compile().as_text()` shows the partitioned HLO)."""
        return self.step.lower(params, state, x_t, target_t)


def shard_step(
    learner: Learner,
    mesh: Mesh,
    *,
    batch_axis: str | None = None,
    neuron_axis: str | None = None,
    example_target=None,
    donate_state: bool = False,
) -> ShardedStep:
    """Place `learner`'s step on `mesh`: data-parallel over `batch_axis`, neuron-parallel over `neuron_axis`.

    Arguments:
        learner: a compiled `Learner`.
        mesh: a `jax.sharding.Mesh` holding the named axes.
        batch_axis: the mesh axis that splits the batch (the learner must be batched), or None.
        neuron_axis: the mesh axis that splits neurons and the post axis of weights, or None.
        example_target: a target of one step (default: the learner's example, zeros like the output).
        donate_state: let the step reuse the state's buffers (the caller must not read the old state).

    Returns:
        A `ShardedStep`.

    Raises:
        CompileError: an axis is not in the mesh, both are None or the same, or `batch_axis` is given for
            an unbatched learner.

    Example:
        ```python
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        sharded = fusetrace.shard_step(learner, mesh, batch_axis="data")
        params, state = sharded.place(learner.params, learner.init())
        state, result = sharded.step(params, state, *sharded.place_inputs(x_t, y_t))
        ```
    """
    _check_axes(learner, mesh, batch_axis, neuron_axis)
    rules = _Rules(learner, mesh, batch_axis, neuron_axis)
    target = learner.snapshot.target if example_target is None else example_target
    inputs = learner.snapshot.inputs
    x_t = inputs[0] if len(inputs) == 1 else inputs
    params = rules.params()
    state = {"model": rules.model(), "traces": rules.traces(), "step": rules.sharding(P())}
    x_sharding, target_sharding = rules.batched(x_t, "input"), rules.batched(target, "target")
    output = jax.eval_shape(learner.step, learner.params, learner.init(), x_t, target)[1].output
    # a StepResult whose leaves are shardings (the pytree shape out_shardings needs)
    result = StepResult(output=rules.batched(output, "output"), loss=rules.sharding(P()), grads=params)  # pyright: ignore[reportArgumentType]
    constants = jax.tree.map(lambda _: rules.sharding(P()), learner.constants)

    groups = mesh.shape[batch_axis] if batch_axis is not None else 1

    def step_with(params, state, x_t, target_t, constants):
        with batch_groups(groups):  # each device sums its part of a sparse gradient (then all-reduced)
            return learner.step(params, state, x_t, target_t, constants=constants)

    jitted = jax.jit(
        step_with,
        in_shardings=(params, state, x_sharding, target_sharding, constants),
        out_shardings=(state, result),
        donate_argnums=(1,) if donate_state else (),
    )
    placed = jax.device_put(learner.constants, constants)
    ins = (params, state, x_sharding, target_sharding, constants)
    scan = _Bound(_scan(learner, mesh, ins, (state, result), donate_state, groups), placed)
    left = tuple(rules.left)
    return ShardedStep(
        learner, mesh, params, state, x_sharding, target_sharding, result, _Bound(jitted, placed), left, scan
    )


def _scan(learner: Learner, mesh: Mesh, ins: tuple, outs: tuple, donate_state: bool, groups: int):
    """`Learner.scan` jit-compiled with the step's shardings `ins` = (params, state, input, target,
    constants) and `outs` = (state, result), a leading time axis added (replicated) to the sequence and
    its outputs, the loss mask replicated."""
    params, state, x_sharding, target_sharding, constants = ins

    def scan_with(params, state, xs, targets, loss_mask, constants):
        with batch_groups(groups):
            return learner.scan(params, state, xs, targets, loss_mask=loss_mask, constants=constants)

    def over_time(tree):
        return jax.tree.map(lambda sharding: NamedSharding(mesh, P(None, *sharding.spec)), tree)

    whole = NamedSharding(mesh, P())
    result = ScanResult(output=over_time(outs[1].output), loss=whole, grads=params)  # pyright: ignore[reportArgumentType]
    return jax.jit(
        scan_with,
        in_shardings=(params, state, over_time(x_sharding), over_time(target_sharding), whole, constants),
        out_shardings=(outs[0], result),
        donate_argnums=(1,) if donate_state else (),
    )


@dataclasses.dataclass(frozen=True)
class _Bound:
    """`function(*args, constants)` called, lowered or compiled on `*args` alone (a jitted step, its
    `Lowered` or its `Compiled`); any other attribute is the function's."""

    function: Any
    constants: Any

    def __call__(self, *args):
        return self.function(*args, self.constants)

    def lower(self, *args) -> "_Bound":
        return _Bound(self.function.lower(*args, self.constants), self.constants)

    def compile(self) -> "_Bound":
        return _Bound(self.function.compile(), self.constants)

    def __getattr__(self, name: str):
        return getattr(self.function, name)


def _check_axes(learner: Learner, mesh: Mesh, batch_axis, neuron_axis) -> None:
    problems = []
    for name in (batch_axis, neuron_axis):
        if name is not None and name not in mesh.axis_names:
            problems.append(f"axis {name!r} is not in the mesh {mesh.axis_names}")
    if batch_axis is None and neuron_axis is None:
        problems.append("neither batch_axis nor neuron_axis is given")
    if batch_axis is not None and batch_axis == neuron_axis:
        problems.append("batch_axis and neuron_axis are the same mesh axis")
    if batch_axis is not None and learner.analysis.batch_size is None:
        problems.append("the learner is unbatched, so there is no batch axis to split")
    if problems:
        raise CompileError(
            four_part(
                what="; ".join(problems),
                where="fusetrace.shard_step(learner, mesh, batch_axis=..., neuron_axis=...)",
                why="each mesh axis splits one kind of array axis: the batch, or the neurons",
                fix="name existing mesh axes (compile with batch_size=... for data parallelism)",
            )
        )


class _Rules:
    """Which array axis goes on which mesh axis, leaf by leaf (see the module docstring)."""

    def __init__(self, learner: Learner, mesh: Mesh, batch_axis, neuron_axis):
        self.learner, self.mesh = learner, mesh
        self.batch_axis, self.neuron_axis = batch_axis, neuron_axis
        self.analysis = learner.analysis
        self.batch = self.analysis.batch_size
        self.offset = 0 if self.batch is None else 1  # where the neuron axes start
        # per-batch-entry shapes of neuron populations (hidden groups)
        self.populations = {tuple(g.shape[self.offset :]) for g in self.analysis.groups}
        self.left: list[tuple[str, str]] = []

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def _spec(self, what: str, shape: tuple[int, ...], batch: int | None, neuron: int | None) -> NamedSharding:
        """Split axis `batch` over the batch mesh axis and `neuron` over the neuron mesh axis, each only
        when that mesh axis is in use and divides the array axis."""
        placed: list[str | None] = [None] * len(shape)
        for axis, name in ((batch, self.batch_axis), (neuron, self.neuron_axis)):
            if axis is None or name is None:
                continue
            size = self.mesh.shape[name]
            if shape[axis] % size:
                self.left.append((what, f"axis {axis} of size {shape[axis]} is not divisible by {name}={size}"))
            else:
                placed[axis] = name
        return self.sharding(P(*placed))

    def _batch_dim(self, shape) -> int | None:
        return 0 if self.batch is not None and len(shape) > 0 and shape[0] == self.batch else None

    # ------------------------------------------------------------------ params and model states

    def params(self) -> dict:
        captured = self.analysis.captured
        specs = {}
        for index, leaf in enumerate(captured.leaves):
            if leaf.role == "weight":
                specs[index] = self._spec(leaf.path, leaf.shape, None, self._weight_post_axis(index))
        return _like(self.learner.params, captured, specs, roles=("weight",), fill=self.sharding(P()))

    def _weight_post_axis(self, index: int) -> int | None:
        """The axis of a weight leaf that follows its postsynaptic neurons (or connections), or None."""
        leaf = self.analysis.captured.leaves[index]
        kinds = {layout_kind(self.analysis, r) for r in self.analysis.relations if r.weight_leaf == index}
        kinds.discard(None)
        if not leaf.shape or kinds & {"shared", "conv"}:
            return None
        if kinds <= {"dense"} and len(leaf.shape) == 2:
            return 1  # (n_pre, n_post); also an instantaneous readout
        if kinds == {"synapse"}:
            return 0  # one entry per connection (CSR data) or per presynaptic row (fixed-probability)
        if kinds == {"neuron"} and tuple(leaf.shape) in self.populations:
            return 0
        return None

    def model(self) -> dict:
        captured = self.analysis.captured
        specs = {}
        for index, leaf in enumerate(captured.leaves):
            if leaf.role == "weight":
                continue
            if leaf.role == "random":
                specs[index] = self.sharding(P())
                continue
            batch = 0 if leaf.batch_axis == 0 else None
            offset = 1 if batch == 0 else 0
            neuron = offset if tuple(leaf.shape[offset:]) in self.populations and len(leaf.shape) > offset else None
            specs[index] = self._spec(leaf.path, leaf.shape, batch, neuron)
        roles = ("hidden", "short_term", "long_term", "random")
        return _like(self.learner.init()["model"], captured, specs, roles=roles, fill=self.sharding(P()))

    # ------------------------------------------------------------------ traces

    def traces(self) -> dict:
        plan, relations = self.learner.plan, self.analysis.relations
        values = self.learner.init()["traces"]
        out = {}
        for index in plan.traced:
            key = plan.key(index)
            if self._has_components(index):
                out[key] = {name: self._component(f"{key}.{name}", v.shape, name) for name, v in values[key].items()}
                continue
            out[key] = {
                name: self._trace_tree(f"{key}.{name}", value, relations[index], name)
                for name, value in values[key].items()
            }
        for node in plan.chains:  # credit traces are laid out like their owner's trace (one array per state)
            relation = relations[node.owner]
            part = "post" if plan.algorithm == "es_d_rtrl" and not relation.elementwise else "eps"
            if self._has_components(node.owner):  # (B, K, *units[, the last stage's units])
                out[node.key] = tuple(self._component(node.key, x.shape, "chain") for x in values[node.key])
            elif node.resolved:  # the owner's layout and a trailing axis of the last stage's units (kept whole)
                out[node.key] = tuple(self._with_units(node.key, x.shape, relation, part) for x in values[node.key])
            else:
                out[node.key] = self._trace_tree(node.key, values[node.key], relation, part)
        return out

    def _has_components(self, index: int) -> bool:
        """Whether relation `index`'s trace is K pairs of factors ("matched", "low_rank")."""
        plan = self.learner.plan
        return has_components(plan) and factorised(plan.algorithm, self.analysis.relations[index])

    def _component(self, what: str, shape, name: str) -> NamedSharding:
        """The sharding of a factor of the component factorisations, by its layout (`FACTOR_NEURON_AXIS`)."""
        batch = None if name in UNBATCHED_FACTORS else self._batch_dim(shape)
        neuron = FACTOR_NEURON_AXIS[name]
        if neuron == "pre":
            neuron = 2 if tuple(shape[2:]) in self.populations else None
        return self._spec(what, shape, batch, neuron if neuron is not None and neuron < len(shape) else None)

    def _with_units(self, what: str, shape, relation, part: str) -> NamedSharding:
        inner = self._trace(what, shape[:-1], relation, part)
        return NamedSharding(inner.mesh, P(*inner.spec, None))  # `_spec` names every axis of shape[:-1]

    def _trace_tree(self, what: str, value, relation, part: str):
        """Shardings of one trace entry: an array, or a tuple of arrays (one per state)."""
        return jax.tree.map(lambda x: self._trace(what, x.shape, relation, part), value)

    def _trace(self, what: str, shape, relation, part: str) -> NamedSharding:
        batch = self._batch_dim(shape)
        start = 0 if batch is None else 1
        neuron = None
        if part == "post":  # (batch, *neurons, S) or (batch, *neurons) for a credit
            neuron = start if len(shape) > start else None
        elif part == "pre":  # the op's presynaptic input: split when it is a neuron population
            neuron = len(shape) - 1 if tuple(shape[start:]) in self.populations else None
        else:  # a per-weight trace ("eps", "filtered", or a credit of one)
            kind = layout_kind(self.analysis, relation)
            if kind == "dense":
                neuron = len(shape) - 1
            elif kind in ("synapse", "neuron", "shared"):
                neuron = start if len(shape) > start else None
        return self._spec(what, shape, batch, neuron)

    # ------------------------------------------------------------------ inputs, targets, outputs

    def batched(self, tree, what: str):
        """Shardings for a user pytree: leaves with the batch axis first are split over the batch axis."""

        def leaf(x):
            shape = _shape(x)
            return self._spec(what, shape, self._batch_dim(shape), None)

        return jax.tree.map(leaf, tree, is_leaf=u.math.is_quantity)


def _shape(x) -> tuple[int, ...]:
    mantissa = u.get_mantissa(x) if u.math.is_quantity(x) else x
    return tuple(mantissa.shape) if hasattr(mantissa, "shape") else tuple(np.shape(mantissa))


def _like(template: dict, captured, specs: dict[int, NamedSharding], roles, fill) -> dict:
    """A dict shaped like `template` (params or model states) holding `specs[leaf]` at each captured leaf
    (a state's captured leaves come in the flatten order of its value, as `Learner` pairs them)."""
    by_state: dict[str, list[int]] = {}
    for index, leaf in enumerate(captured.leaves):
        if leaf.role in roles:
            by_state.setdefault(leaf.state_path, []).append(index)
    out = {}
    for path, value in template.items():
        flat, tree = jax.tree.flatten(value, is_leaf=u.math.is_quantity)
        indices = by_state.get(path, [])
        if len(indices) != len(flat):
            out[path] = jax.tree.unflatten(tree, [fill] * len(flat))
            continue
        out[path] = jax.tree.unflatten(tree, [specs[i] for i in indices])
    return out
