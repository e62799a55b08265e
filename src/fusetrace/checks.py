"""Checks of what users hand a compiled learner, made before anything is traced.

Consumes: the example inputs and target a learner was compiled with (`Learner.snapshot`) and what a
step, a training batch or a loss function receives or returns. Produces: nothing, or a four-part
`InputError` / `CompileError` naming the argument in the user's terms (`x_t[1]`, `target_t`).

The rules, leaf by leaf against the example:
* shape: exactly the example's (one time step, batch axis first when the learner is batched);
* dtype: by kind — booleans and integers may stand for floats, any float width for floats, but a float
  never stands for an integer or a boolean, nor a complex number for a real one;
* unit: by dimension — µA where the example has mA is converted on the way in; mV, or a plain array,
  where it has mA is refused (a plain array would silently be read as a number of mA).
The target is checked only when `fusetrace.compile` was given an `example_target`: the default one
(zeros like the output) is a guess, and a loss may well take integer labels instead.

Sharp edges: shapes and dtypes are static under `jax.jit`, so every check runs at trace time, costs
nothing per step and works on tracers; values (NaN, range) are never looked at here.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from .errors import CompileError, InputError, four_part

_KINDS = ((jnp.bool_, "boolean"), (jnp.integer, "integer"), (jnp.floating, "float"), (jnp.complexfloating, "complex"))


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """What a step knows statically about one array leaf: shape, dtype and unit."""

    shape: tuple[int, ...]
    dtype: Any
    unit: Any

    @classmethod
    def of(cls, value) -> "LeafSpec":
        """The spec of `value`: an array, a tracer, a Python scalar or a Quantity of one of them."""
        mantissa = u.get_mantissa(value) if u.math.is_quantity(value) else value
        unit = u.get_unit(value) if u.math.is_quantity(value) else u.UNITLESS
        return cls(tuple(np.shape(mantissa)), _dtype(mantissa), unit)

    @property
    def kind(self) -> int:
        """0 boolean, 1 integer, 2 float, 3 complex; -1 for anything else (PRNG keys: equality only)."""
        return next((rank for rank, (kind, _) in enumerate(_KINDS) if jnp.issubdtype(self.dtype, kind)), -1)

    def describe(self, batch_size: int | None = None, time: bool = False) -> str:
        """`(steps, batch=16, 100) float32, in mV`: the batch axis named when its size is `batch_size`."""
        dims = [f"batch={n}" if i == 0 and n == batch_size else str(n) for i, n in enumerate(self.shape)]
        dims = ["steps", *dims] if time else dims
        shape = f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
        return f"{shape} {np.dtype(self.dtype).name if self.kind >= 0 else self.dtype}, {_unit_text(self.unit)}"


def _dtype(mantissa):
    dtype = getattr(mantissa, "dtype", None)
    return dtype if dtype is not None else jnp.result_type(mantissa)


def _unit_text(unit) -> str:
    return "unitless" if unit.is_unitless else f"in {unit}"


def _same_dimension(a, b) -> bool:
    return (a.is_unitless and b.is_unitless) or a.dim == b.dim


def check_step(snapshot, batch_size: int | None, x_t, target_t) -> None:
    """Check one step's `x_t` and `target_t` against the example a learner was compiled with.

    Arguments:
        snapshot: the learner's `_Snapshot` (example `inputs`, `target`, `target_given`).
        batch_size: the learner's batch size (named in messages), or None.
        x_t: the step's input, a tuple when `model.update` takes several arguments.
        target_t: the step's target (checked only when the learner was compiled with `example_target`).

    Raises:
        InputError: a structure, shape, dtype kind or unit differs from the example's.
    """
    where = "Learner.step(params, state, x_t, target_t)"
    inputs = tuple(x_t) if len(snapshot.inputs) > 1 else (x_t,)
    _check_tree("x_t", inputs, tuple(snapshot.inputs), batch_size, where, single=len(snapshot.inputs) == 1)
    if snapshot.target_given:
        _check_tree("target_t", (target_t,), (snapshot.target,), batch_size, where, single=True)


def check_batch(learner, batch, where: str) -> None:
    """Check a training batch (`inputs`, `targets`, time first) against a learner's example step.

    Arguments:
        learner: the compiled `Learner`.
        batch: what the task sampler returned (a `trainer.Batch`).
        where: the place to name in messages (the trainer, iteration and seed).

    Raises:
        InputError: the leaves disagree on the number of steps, or one step of them does not match the
            example (as in `check_step`).
    """
    snapshot, batch_size = learner.snapshot, learner.analysis.captured.batch_size
    single = len(snapshot.inputs) == 1
    inputs = (batch.inputs,) if single else tuple(batch.inputs)
    _check_steps(inputs, batch.targets, where)
    _check_tree("inputs", inputs, tuple(snapshot.inputs), batch_size, where, single=single, time=True)
    if snapshot.target_given:
        _check_tree("targets", (batch.targets,), (snapshot.target,), batch_size, where, single=True, time=True)


def _check_steps(inputs, targets, where: str) -> None:
    """Every leaf of a batch has the same number of steps (its first axis)."""
    named = [("inputs", leaf) for leaf in _leaves(inputs)] + [("targets", leaf) for leaf in _leaves(targets)]
    counts = [(name, np.shape(u.get_mantissa(leaf))) for name, leaf in named]
    if not counts or not counts[0][1]:
        raise InputError(_steps_message("`inputs` has no time axis", where))
    steps = counts[0][1][0]
    for name, shape in counts:
        if not shape or shape[0] != steps:
            got = f"{shape[0]} steps" if shape else "no time axis"
            raise InputError(_steps_message(f"`{name}` has {got}, `inputs` {steps}", where))


def _steps_message(what: str, where: str) -> str:
    return four_part(
        what=what,
        where=where,
        why="a batch holds whole sequences: every input and target leaf has the time axis first, of one length",
        fix="make the sampler return inputs (steps, ...) and targets (steps, ...) of the same sequence length",
    )


def _leaves(tree) -> list:
    return jax.tree.leaves(tree, is_leaf=u.math.is_quantity)


def _check_tree(name, given, example, batch_size, where, *, single, time=False) -> None:
    """Compare `given` with `example` (both tuples) leaf by leaf; `single`: name the root `name`."""
    given_tree = jax.tree.structure(given, is_leaf=u.math.is_quantity)
    example_tree = jax.tree.structure(example, is_leaf=u.math.is_quantity)
    if given_tree != example_tree:
        inner = (lambda t: t.children()[0]) if single else (lambda t: t)
        raise InputError(
            four_part(
                what=f"`{name}` has the structure {inner(given_tree)}; expected {inner(example_tree)}",
                where=where,
                why="the step was compiled for the structure of the example given to fusetrace.compile",
                fix=f"pass `{name}` laid out like that example, or compile again with an example of the new layout",
            )
        )
    paths = jax.tree_util.tree_flatten_with_path(example, is_leaf=u.math.is_quantity)[0]
    for (path, expected), got in zip(paths, _leaves(given), strict=True):
        leaf_name = name + jax.tree_util.keystr(path[1:] if single else path)
        _check_leaf(leaf_name, LeafSpec.of(got), LeafSpec.of(expected), batch_size, where, time)


def _check_leaf(name: str, got: LeafSpec, expected: LeafSpec, batch_size, where: str, time: bool) -> None:
    """`got` is the whole leaf; with `time`, its first axis is the sequence's and the rest is one step."""
    problem = _mismatch(dataclasses.replace(got, shape=got.shape[1:]) if time else got, expected)
    if problem is not None:
        why, fix = problem
        raise InputError(
            four_part(
                what=f"`{name}` is {got.describe()}; expected {expected.describe(batch_size, time)}",
                where=where,
                why=why,
                fix=fix,
            )
        )


def _mismatch(got: LeafSpec, expected: LeafSpec) -> tuple[str, str] | None:
    """`(why, fix)` when `got` cannot stand for `expected`, else None."""
    if got.shape != expected.shape:
        return (
            "the step was compiled for the shape of the example given to fusetrace.compile (one time step, "
            "the batch axis first)",
            "pass one step of that shape, or compile again with an example of the new shape",
        )
    if not (got.dtype == expected.dtype or 0 <= got.kind <= expected.kind):
        return (
            f"a {_kind_name(got)} cannot stand for a {_kind_name(expected)}: the step was traced with {expected.dtype}",
            f"convert it (`.astype({np.dtype(expected.dtype).name if expected.kind >= 0 else expected.dtype})`) "
            "or compile with an example of the dtype you mean",
        )
    if not _same_dimension(got.unit, expected.unit):
        return (
            f"values are converted into the example's unit ({_unit_text(expected.unit)}), and "
            f"{'a unitless value' if got.unit.is_unitless else f'a value in {got.unit}'} has another dimension",
            "give it in a unit of the example's dimension (multiply a plain array by its unit, e.g. `x * u.mA`)"
            if not expected.unit.is_unitless
            else "pass a plain array (or take the mantissa in the unit the model expects)",
        )
    return None


def _kind_name(spec: LeafSpec) -> str:
    return _KINDS[spec.kind][1] if spec.kind >= 0 else str(spec.dtype)


def check_loss(loss: Callable, output, target, *, target_given: bool) -> None:
    """Check at compile time that `loss(output, target)` is a floating-point scalar (traced, not run).

    Arguments:
        loss: the learner's loss.
        output: the model's example output (with units).
        target: the example target (the user's, or the default zeros like the output).
        target_given: whether `target` is the user's. The default target is a guess: when the loss cannot
            take it (it wants a tuple or labels), the check waits for the first step (`loss_value`).

    Raises:
        CompileError: the loss returns a non-scalar, a container or an integer/boolean value.
        Exception: whatever the loss raises on the user's own example target.
    """
    try:
        value = jax.eval_shape(lambda out, y: _mantissa(loss(out, y)), output, target)
    except Exception:
        if target_given:
            raise
        return
    _check_scalar(value, where="fusetrace.compile(..., loss=...), on the example output and target")


def loss_value(value) -> jax.Array:
    """A step's loss as a mantissa, after checking that it is a floating-point scalar (at trace time).

    Raises:
        CompileError: it is not.
    """
    value = _mantissa(value)
    _check_scalar(value, where="Learner.step: the loss of one step (fusetrace.compile(..., loss=...))")
    return value


def _mantissa(value):
    return u.get_mantissa(value) if u.math.is_quantity(value) else value


def _check_scalar(value, where: str) -> None:
    if isinstance(value, tuple | list | dict):
        what = f"the loss returns a {type(value).__name__}, not a scalar"
    elif np.shape(value) != ():
        what = f"the loss returns a {tuple(np.shape(value))} {_dtype(value)} array, not a scalar"
    elif not jnp.issubdtype(_dtype(value), jnp.floating):
        what = f"the loss returns a {_dtype(value)} scalar: an integer or boolean loss has no gradient"
    else:
        return
    raise CompileError(
        four_part(
            what=what,
            where=where,
            why="the learning signal is the gradient of ONE floating-point number per step",
            fix="reduce inside the loss (`jnp.sum(...)` or `jnp.mean(...)` over the batch and outputs) and "
            "return it as a float",
        )
    )
