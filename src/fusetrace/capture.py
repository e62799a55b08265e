"""Model step -> `Captured`: the step's ClosedJaxpr and the role of every state leaf.

Consumes: a `brainstate.nn.Module` (typically built from brainpy.state parts) and example inputs of
one step. Produces: a `Captured` whose jaxpr takes `(*input_leaves, *state_leaves)` and returns
`(*output_leaves, *new_state_leaves)` — one new value for EVERY state leaf, written or not — all as
raw mantissas (units stripped on the way in, restored on the way out by `Captured`'s helpers).

This is the only module that imports brainpy/brainstate internals. States are keyed by object identity
(via `model.states()`), never by the first-found path of the trace. The global `RandomState` that
brainpy's inputs draw from is not in `model.states()`: it is captured with role "random".
"""

import collections
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from typing import Literal as TypingLiteral

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from ._compat import ClosedJaxpr, new_closed_jaxpr
from .errors import CaptureError, FusetraceError, four_part
from .interpret import evaluate
from .naming import MAX_LISTED_PROJECTIONS, join, relative_to_parent, unique

Role = TypingLiteral["hidden", "weight", "short_term", "long_term", "random"]


@dataclasses.dataclass(frozen=True)
class StateLeaf:
    """One array leaf of one model state.

    path: dotted path of the state as `model.states()` reports it, plus `.key` for a leaf inside a
      dict-valued state (`layer.comm.weight.weight` for a `Linear`'s `{'weight': ...}`). The key of the
      leaf everywhere (`Learner.params`, `explain`, checkpoints); brainpy's first-found path, which can
      be long and odd (an AlignPost conductance's holds its describer's repr).
    state_path: dotted path of the state itself (the key of `Learner.params`).
    name: the user's name of the leaf, for display: the shortest attribute path to its state from the
      model, plus `.key` (`I.V`, `E.syn[inE].g`; scheme in `fusetrace.naming`). Defaults to `path`.
    state_name: the user's name of the state (`name` without the key). Defaults to `state_path`.
    key: the leaf's key path inside the state's value (empty for an array-valued state).
    role: hidden / weight (a ParamState) / short_term / long_term / random.
    unit: the brainunit unit of the leaf (dimensionless `u.UNITLESS` when it has none).
    batch_axis: 0 when the leaf carries the batch axis, else None.
    order: position of its state in `model.states()` (the order users see; traces access states in
      another order).
    """

    path: str
    state_path: str
    key: tuple
    role: Role
    shape: tuple[int, ...]
    dtype: Any  # a numpy dtype, or a jax PRNG key dtype for the random state
    unit: Any
    batch_axis: int | None
    order: int
    name: str = ""
    state_name: str = ""

    def __post_init__(self):
        if self.batch_axis not in (None, 0):
            raise ValueError(f"batch_axis must be 0 or None, got {self.batch_axis}")
        if not self.state_name:
            object.__setattr__(self, "state_name", self.state_path)
        if not self.name:
            object.__setattr__(self, "name", ".".join([self.state_name, *map(str, self.key)]))

    @property
    def n_neurons(self) -> int:
        """Elements per batch entry (the neuron count of a hidden leaf)."""
        shape = self.shape[1:] if self.batch_axis == 0 else self.shape
        return int(np.prod(shape, dtype=int))


@dataclasses.dataclass(frozen=True)
class Captured:
    """A captured step. `jaxpr` invars: inputs then state leaves; outvars: outputs then state leaves."""

    jaxpr: ClosedJaxpr
    leaves: tuple[StateLeaf, ...]
    states: tuple[brainstate.State, ...]  # one per state, in the order their leaves appear
    leaf_state: tuple[int, ...]  # for each leaf, the index of its state in `states`
    in_tree: Any
    in_units: tuple[Any, ...]
    out_tree: Any
    out_units: tuple[Any, ...]
    batch_size: int | None
    regularized: bool = False  # one more output after the model's: the regulariser's scalar

    def __post_init__(self):
        n_in, n_out = len(self.in_units), self.n_outputs
        if len(self.jaxpr.jaxpr.invars) != n_in + len(self.leaves):
            raise ValueError("jaxpr inputs do not match input leaves + state leaves")
        if len(self.jaxpr.jaxpr.outvars) != n_out + len(self.leaves):
            raise ValueError("jaxpr outputs do not match output leaves + state leaves")

    @property
    def n_inputs(self) -> int:
        return len(self.in_units)

    @property
    def n_outputs(self) -> int:
        """Output leaves of the jaxpr: the model's, then the regulariser's scalar when `regularized`."""
        return len(self.out_units) + self.regularized

    def leaf_values(self) -> list[jax.Array]:
        """The current values of every state leaf, as mantissas."""
        values = []
        for state in self.states:
            values.extend(_mantissas(state.value))
        return values

    def strip_inputs(self, *inputs) -> list[jax.Array]:
        leaves, tree = jax.tree.flatten(inputs, is_leaf=u.math.is_quantity)
        if tree != self.in_tree:
            raise CaptureError(
                four_part(
                    what="the inputs do not have the structure of the example inputs the model was compiled with",
                    where=f"got {tree}",
                    why=f"the compiled step expects {self.in_tree}",
                    fix="pass inputs with the same structure, or compile again with new example inputs",
                )
            )
        return [_mantissa_in(x, unit) for x, unit in zip(leaves, self.in_units, strict=True)]

    def wrap_outputs(self, leaves: Sequence[jax.Array]):
        """The model's output (with units) from the jaxpr's output leaves (the regulariser's dropped)."""
        model_leaves = list(leaves)[: len(self.out_units)]
        return jax.tree.unflatten(
            self.out_tree, [_wrap(x, unit) for x, unit in zip(model_leaves, self.out_units, strict=True)]
        )

    def with_consts(self, consts: Sequence[Any]) -> "Captured":
        """The same step closing over `consts` (one per constvar of `jaxpr`; arrays or tracers) instead."""
        return dataclasses.replace(self, jaxpr=new_closed_jaxpr(self.jaxpr.jaxpr, consts))

    def step(self, input_leaves: Sequence[jax.Array], state_leaves: Sequence[jax.Array]):
        """The pure step on mantissas: `(output_leaves, new_state_leaves)`."""
        out = evaluate(self.jaxpr.jaxpr, self.jaxpr.consts, [*input_leaves, *state_leaves])
        return out[: self.n_outputs], out[self.n_outputs :]


def _unit_of(x):
    return u.get_unit(x) if u.math.is_quantity(x) else u.UNITLESS


def _mantissas(value) -> list[jax.Array]:
    return [u.get_mantissa(x) for x in jax.tree.leaves(value, is_leaf=u.math.is_quantity)]


def _mantissa_in(x, unit):
    if u.math.is_quantity(x):
        return x.to_decimal(unit) if not unit.is_unitless else u.get_mantissa(x)
    return x


def _wrap(x, unit):
    return x if unit is None or unit.is_unitless else u.Quantity(x, unit=unit)


def _role(state: brainstate.State) -> Role:
    if isinstance(state, brainstate.HiddenState):
        return "hidden"
    if isinstance(state, brainstate.ParamState):
        return "weight"
    if isinstance(state, brainstate.random.RandomState):
        return "random"
    if isinstance(state, brainstate.ShortTermState):
        return "short_term"
    return "long_term"


def states_of(model: brainstate.nn.Module, *filters) -> dict[tuple, brainstate.State]:
    """`model.states(*filters)` as a plain dict (path tuple -> state), in `model.states()` order."""
    found: Any = model.states(*filters)
    return dict(found.items())


def state_paths(model: brainstate.nn.Module) -> list[tuple[brainstate.State, str]]:
    """`(state, dotted path)` for every state of `model`, in `model.states()` order."""
    return [(state, ".".join(str(k) for k in path)) for path, state in states_of(model).items()]


def _path_of(state, known: list[tuple[brainstate.State, str]]) -> tuple[str, int]:
    for order, (candidate, path) in enumerate(known):
        if candidate is state:
            return path, order
    if isinstance(state, brainstate.random.RandomState):
        return "<random>", len(known)
    raise CaptureError(
        four_part(
            what=f"the step uses a {type(state).__name__} that is not part of the model",
            where=f"state with value of shape {jax.tree.map(np.shape, state.value)}",
            why="fusetrace can only restore and return states it can name through model.states()",
            fix="make the state an attribute of the model (or of one of its sub-modules)",
        )
    )


# --------------------------------------------------------------------------- the user's names

_HOOKS = {"_before_updates": "before", "_after_updates": "after"}  # brainstate's update-hook dicts
_SIMPLE_KEY = re.compile(r"[\w.\-]{1,32}")  # a dict key short and plain enough to show as it is


def state_names(model: brainstate.nn.Module) -> dict[brainstate.State, str]:
    """The user's name of every state reachable from `model` (the scheme: `fusetrace.naming`).

    Breadth-first over the model's attributes in the order they were set: public attributes first,
    so `self.I` names a population before `self.EI.post` reaches it; AlignPost synapses merged into a
    post population are named after the population and the projections that feed them; what only
    private attributes reach comes last.
    """
    public = _walk([(model, "")], private=False)
    named = _walk([*_align_post_names(public), (model, "")], private=False)
    named = _walk(list(named.items()), private=True, named=named)
    states = [(node, name) for node, name in named.items() if isinstance(node, brainstate.State)]
    return dict(zip((node for node, _ in states), unique([name for _, name in states]), strict=True))


def _walk(starts: list[tuple[Any, str]], *, private: bool, named: dict | None = None) -> dict:
    """`{node or state: name}` of everything reached from `starts` (first name wins)."""
    named = dict(named or {})
    queue: collections.deque = collections.deque()
    for node, name in starts:
        named.setdefault(node, name)
        queue.append(node)
    while queue:
        node = queue.popleft()
        for label, child in _children(node, private):
            if child not in named:
                named[child] = join(named[node], label)
                if isinstance(child, brainstate.graph.Node):
                    queue.append(child)
    return named


def _children(node, private: bool) -> Iterator[tuple[str, Any]]:
    """`(label, child)` for the nodes and states held by `node`'s attributes, in attribute order."""
    for attribute, value in vars(node).items():
        if attribute in _HOOKS:
            if private and isinstance(value, dict):
                yield from _contents(f".{_HOOKS[attribute]}", value)
        elif private or not attribute.startswith("_"):
            yield from _contents(f".{attribute}", value)


def _contents(label: str, value) -> Iterator[tuple[str, Any]]:
    if isinstance(value, brainstate.State | brainstate.graph.Node):
        yield label, value
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _contents(f"{label}[{index}]", item)
    elif isinstance(value, dict):
        for index, (key, item) in enumerate(value.items()):
            shown = key if isinstance(key, int | str) and _SIMPLE_KEY.fullmatch(str(key)) else index
            yield from _contents(f"{label}[{shown}]", item)


def _align_post_names(public: dict) -> list[tuple[Any, str]]:
    """`(module, "POST.syn[PROJ,...]")` for the synapse and `(module, "POST.out[PROJ,...]")` for the
    output of every AlignPost entry that brainpy.state merged into a post population's
    `_before_updates` (keyed there by its describer's repr); PROJ: the projections holding it."""
    nodes = [(node, name) for node, name in public.items() if isinstance(node, brainstate.graph.Node)]
    found = []
    for post, post_name in nodes:
        hooks = vars(post).get("_before_updates")
        for index, entry in enumerate(hooks.values() if isinstance(hooks, dict) else ()):
            for part in ("syn", "out"):
                module = vars(entry).get(part) if hasattr(entry, "__dict__") else None
                if not isinstance(module, brainstate.graph.Node):
                    continue
                users = [relative_to_parent(name, post_name) for node, name in nodes if vars(node).get(part) is module]
                shown = users[:MAX_LISTED_PROJECTIONS] + [f"+{len(users) - MAX_LISTED_PROJECTIONS}"] * (
                    len(users) > MAX_LISTED_PROJECTIONS
                )
                found.append((module, join(post_name, f".{part}[{','.join(shown) or index}]")))
    return found


def ensure_initialised(model: brainstate.nn.Module, batch_size: int | None) -> None:
    """Initialise the model's states unless they already exist with the requested batch size."""
    hidden = list(states_of(model, brainstate.HiddenState).values())
    if not hidden:
        brainstate.nn.init_all_states(model, batch_size=batch_size)
        return
    leaf = jax.tree.leaves(hidden[0].value, is_leaf=u.math.is_quantity)[0]
    batched_now = batch_size is not None and np.ndim(leaf) >= 1 and np.shape(leaf)[0] == batch_size
    if batch_size is not None and not batched_now:
        brainstate.nn.init_all_states(model, batch_size=batch_size)


def _leaf_keys(value) -> list[tuple]:
    with_path, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=u.math.is_quantity)
    return [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path) for path, _ in with_path]


def capture(
    model: brainstate.nn.Module,
    *example_inputs,
    batch_size: int | None = None,
    regularizer: Callable[[brainstate.nn.Module], Any] | None = None,
) -> Captured:
    """Trace one step `model.update(*example_inputs)` and record the role of every state leaf.

    Arguments:
        model: a `brainstate.nn.Module`; its states are initialised with `batch_size` if they are not.
        example_inputs: the arguments of one `model.update` call (arrays or Quantities; batched
            inputs carry the batch axis first).
        batch_size: the batch size of the states, or None for unbatched states.
        regularizer: optional `regularizer(model) -> scalar`, called right after `model.update` (the
            states hold their new values); its value becomes one more output leaf.

    Returns:
        A `Captured` step on mantissas.

    Raises:
        CaptureError: the step cannot be traced or uses a state outside the model.
    """
    if not isinstance(model, brainstate.nn.Module):
        raise CaptureError(
            four_part(
                what=f"expected a brainstate.nn.Module, got {type(model).__name__}",
                where="fusetrace.capture(model, ...)",
                why="fusetrace traces `model.update` and reads its states through model.states()",
                fix="pass the network object (e.g. a brainpy.state model), not a function or its output",
            )
        )
    ensure_initialised(model, batch_size)
    known = state_paths(model)
    names = state_names(model)
    in_leaves, in_tree = jax.tree.flatten(example_inputs, is_leaf=u.math.is_quantity)
    in_units = tuple(_unit_of(x) for x in in_leaves)
    mantissa_inputs = [u.get_mantissa(x) for x in in_leaves]

    def step(*leaves):
        args = jax.tree.unflatten(in_tree, [_wrap(x, unit) for x, unit in zip(leaves, in_units, strict=True)])
        out = model.update(*args)
        out_leaves, out_tree = jax.tree.flatten(out, is_leaf=u.math.is_quantity)
        holder["out"] = (out_tree, tuple(_unit_of(x) for x in out_leaves))
        mantissas = [u.get_mantissa(x) for x in out_leaves]
        if regularizer is not None:
            mantissas.append(_regularizer_value(regularizer, model))
        return mantissas

    holder: dict[str, Any] = {}
    function = brainstate.transform.StatefulFunction(step, return_only_write=False)
    try:
        function.make_jaxpr(*mantissa_inputs)
    except FusetraceError:  # ours, raised from inside (e.g. by a regulariser): already explained
        raise
    except Exception as error:  # surface the model's own error with context
        raise CaptureError(
            four_part(
                what=f"tracing one step of {type(model).__name__} failed: {error}",
                where="model.update(*example_inputs) under brainstate.transform.StatefulFunction",
                why="the step must be traceable by JAX with the given example inputs",
                fix="check the example inputs' shapes (batched inputs carry the batch axis first) and that "
                "model.update runs eagerly with them",
            )
        ) from error
    states = tuple(function.get_states(*mantissa_inputs))
    closed = function.get_jaxpr(*mantissa_inputs)
    leaves, leaf_state = [], []
    for index, state in enumerate(states):
        (path, order), role = _path_of(state, known), _role(state)
        state_name = names.get(state, path)
        for key, value in zip(
            _leaf_keys(state.value), jax.tree.leaves(state.value, is_leaf=u.math.is_quantity), strict=True
        ):
            mantissa = u.get_mantissa(value)
            batched = (
                batch_size is not None
                and role in ("hidden", "short_term")
                and np.ndim(mantissa) >= 1
                and np.shape(mantissa)[0] == batch_size
            )
            leaves.append(
                StateLeaf(
                    path=".".join([path, *map(str, key)]),
                    state_path=path,
                    key=key,
                    role=role,
                    shape=tuple(np.shape(mantissa)),
                    dtype=jnp.asarray(mantissa).dtype,
                    unit=_unit_of(value),
                    batch_axis=0 if batched else None,
                    order=order,
                    name=".".join([state_name, *map(str, key)]),
                    state_name=state_name,
                )
            )
            leaf_state.append(index)
    out_tree, out_units = holder["out"]
    return Captured(
        jaxpr=closed,
        leaves=tuple(leaves),
        states=states,
        leaf_state=tuple(leaf_state),
        in_tree=in_tree,
        in_units=in_units,
        out_tree=out_tree,
        out_units=out_units,
        batch_size=batch_size,
        regularized=regularizer is not None,
    )


def _regularizer_value(regularizer, model) -> jax.Array:
    value = u.get_mantissa(regularizer(model))
    if jnp.shape(value) != ():
        raise CaptureError(
            four_part(
                what=f"the regularizer returned shape {jnp.shape(value)}, not a scalar",
                where="fusetrace.compile(..., regularizer=...)",
                why="its value is added to each step's loss",
                fix="reduce it to a scalar (e.g. with jnp.sum or jnp.mean)",
            )
        )
    return value
