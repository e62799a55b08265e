"""Between the user's pytrees and the captured step's flat leaves: `Learner.params` / the model states
(dicts keyed by state path, values with units) to the step's mantissa leaves, and back.

Consumes: a `Captured` step and the user's params / state dicts. Produces the list of leaf mantissas in
the step's order (`leaves_from`), and dicts shaped like the user's with new values wrapped in their units
(`states_from`, `grads_like`). A state's captured leaves come in the flatten order of its value, so they
pair with the template's leaves one to one; a structure that differs is a four-part `CompileError`.
"""

from typing import Any

import brainunit as u
import jax
import jax.numpy as jnp

from .errors import CompileError, four_part


def weight_leaves(captured) -> list[int]:
    return [i for i, leaf in enumerate(captured.leaves) if leaf.role == "weight"]


def _mantissa(value, unit):
    if u.math.is_quantity(value):
        return value.to_decimal(unit) if not unit.is_unitless else u.get_mantissa(value)
    return jnp.asarray(value)


def _leaf_of(tree, key):
    for part in key:
        tree = tree[part]
    return tree


def leaves_from(captured, params: dict, model: dict) -> list:
    leaves = []
    for leaf in captured.leaves:
        source = params if leaf.role == "weight" else model
        if leaf.state_path not in source:
            raise CompileError(
                four_part(
                    what=f"`{leaf.state_name}` is missing from the {'params' if leaf.role == 'weight' else 'state'}",
                    where="Learner.step(params, state, x_t, target_t)",
                    why="every state the step reads must be given",
                    fix="pass learner.params / learner.init() (or values of the same structure)",
                )
            )
        leaves.append(_mantissa(_leaf_of(source[leaf.state_path], leaf.key), leaf.unit))
    return leaves


def _rebuild(captured, template: dict, values: dict[int, Any], roles) -> dict:
    """A dict shaped like `template` with each captured leaf replaced by `values[leaf]` (with units).

    A state's captured leaves come in the flatten order of its value, so they pair with the template's
    leaves one to one."""
    out = dict(template)
    by_state: dict[str, list[int]] = {}
    for index, leaf in enumerate(captured.leaves):
        if leaf.role in roles and index in values:
            by_state.setdefault(leaf.state_path, []).append(index)
    for path, indices in by_state.items():
        flat, tree = jax.tree.flatten(template[path], is_leaf=u.math.is_quantity)
        if len(flat) != len(indices):
            raise CompileError(
                four_part(
                    what=f"`{captured.leaves[indices[0]].state_name}` has {len(flat)} array(s) here but {len(indices)} "
                    "in the compiled step",
                    where="Learner.step(params, state, ...)",
                    why="params and state must keep the structure of learner.params / learner.init()",
                    fix="pass values with the same structure (e.g. the {'weight': ...} dict of a Linear)",
                )
            )
        replaced = [
            _wrap_like(values[index], old, captured.leaves[index].unit)
            for index, old in zip(indices, flat, strict=True)
        ]
        out[path] = jax.tree.unflatten(tree, replaced)
    return out


def _wrap_like(value, old, unit):
    if unit is not None and not unit.is_unitless:
        return u.Quantity(value, unit=unit)
    return value if not u.math.is_quantity(old) else u.Quantity(value, unit=u.get_unit(old))


def states_from(captured, new_leaves, model: dict) -> dict:
    values = {i: v for i, v in enumerate(new_leaves) if captured.leaves[i].role != "weight"}
    return _rebuild(captured, model, values, roles=("hidden", "short_term", "long_term", "random"))


def grads_like(captured, params: dict, grads: dict[int, Any]) -> dict:
    zeros = jax.tree.map(lambda x: x * 0, params, is_leaf=u.math.is_quantity)
    return _rebuild(captured, zeros, grads, roles=("weight",))
