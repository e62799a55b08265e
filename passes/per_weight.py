"""d_rtrl / e_prop: the per-weight trace of one relation, `ε ← D ε + F ⊗ u`, and its gradient `Σ δ·ε`.

Consumes: an `Analysis`, a traced relation with a layout (`layout.layout_kind`), the step's values, the
group's derivatives `D` (..., S, S) and the relation's `F` (..., S), the relation's previous trace and
the learning signals. Produces the new trace (one array per state; e_prop's `kappa` filter beside it) and
the relation's gradient term, including `δ_prev·ε_{t-1}` when the outputs read the previous values.

Memory is the point: the trace is `B · |W|` per state, so each array is overwritten in place (see
`update`), and arrays that the structure makes zero are never read (`structure.state_structure`).
"""

import jax
import jax.numpy as jnp
from jax import lax

from . import derive
from .layout import Layout, layout_kind, make_layout
from .structure import read_states, relation_sources, state_structure


def kind_of(analysis, relation) -> str:
    """The relation's layout kind; the plan traces only relations that have one."""
    kind = layout_kind(analysis, relation)
    assert kind is not None, "make_plan traces only relations with a layout"
    return kind


def layout_of(analysis, relation, values) -> Layout:
    return make_layout(kind_of(analysis, relation), analysis, relation, values)


def contract(layout: Layout, signal, trace, states) -> jax.Array | None:
    """`Σ_s gather(signal_s) · trace_s` over `states`, per batch entry, in the trace's layout; None when
    `states` is empty. `signal` and `trace` hold one array per state (or map states to arrays)."""
    total = None
    for s in states:
        term = layout.gather(signal[s]) * trace[s]
        total = term if total is None else total + term
    return total


def per_state(x: jax.Array) -> tuple[jax.Array, ...]:
    """`x (..., S)` as S arrays `(...)`. Passed through a barrier, each becomes a contiguous array for the
    trace arithmetic to read at every weight element; a strided slice of `x` there was not vectorised."""
    return tuple(x[..., s] for s in range(x.shape[-1]))


def update(analysis, plan, relation, values, d, f, trace, signals):
    """The new per-weight trace and, given `signals` = `(δ, δ_prev)`, its gradient: `(new, grad)`.

    The trace is memory-bound (a dense one is `B · n_pre · n_post` per state), so each array should be
    overwritten in place (with the state donated), not copied: the states are updated one at a time, each
    after every state whose update reads its old array (`update_order`), and optimisation barriers hold
    XLA to that order and keep it from recomputing a new array from an overwritten old one inside the
    gradient. The per-neuron factors are settled first (one contiguous array per state, `per_state`): else
    XLA recomputes them, or reads them strided, at every weight element."""
    layout = layout_of(analysis, relation, values)
    group = analysis.group_named(relation.group)
    reads, injected, prev_read = state_structure(analysis, group, *relation_sources(relation))
    d = tuple(per_state(d[..., s, :]) for s in range(d.shape[-1]))  # d[s][t] = D_st
    f, signals = per_state(f), None if signals is None else tuple(map(per_state, signals))
    d, f, signals = lax.optimization_barrier((d, f, signals))
    old = dict(enumerate(trace["eps"]))  # the old arrays still to be read
    filtered = trace.get("filtered")
    previous = None
    if signals is not None and prev_read:  # δ_prev·ε_{t-1}, formed before the old arrays are overwritten
        used_prev = old if filtered is None else dict(enumerate(filtered))
        previous = layout.reduce([(signals[1][s], used) for s, used in used_prev.items()])
        previous, old, filtered = lax.optimization_barrier((previous, old, filtered))
    order = update_order(reads)
    eps = {}
    for k, s in enumerate(order):
        value = contract(layout, d[s], old, reads[s])
        if s in injected:
            value = layout.inject(f[s]) if value is None else value + layout.inject(f[s])
        if not any(s in reads[r] for r in order[k + 1 :]):
            del old[s]
        value = jnp.zeros_like(trace["eps"][s]) if value is None else value
        eps[s], old = lax.optimization_barrier((value, old))
    new = {"eps": tuple(eps[s] for s in range(len(order)))}
    used = new["eps"]
    if plan.kappa is not None:
        used = tuple(plan.kappa * p + e for p, e in zip(filtered, used, strict=True))
        new["filtered"] = used
    read = read_states(analysis, group)
    if signals is None or not read:
        return new, previous
    settled = lax.optimization_barrier([used[s] for s in read])
    grad = layout.reduce([(signals[0][s], e) for s, e in zip(read, settled, strict=True)])
    return new, grad if previous is None else grad + previous


def crossing_correction(analysis, values, relation, f: jax.Array, delta: jax.Array, delta_new) -> jax.Array:
    """For a relation with `crossings` under a per-weight trace: its exact same-step gradient (every path of
    this step, the crossed products in full: `derive.same_step_grad`) minus what the newest term `F ⊗ u`
    of its trace gives (their diagonal), so that the step's own credit is exact and only the credit
    carried from earlier steps keeps the diagonal. `f` and `delta` (`δ_t`) are in the group layout,
    (..., S); `delta_new` is `δ_t` by hidden leaf."""
    if relation.elementwise:  # `F` is already ∂h/∂θ: the layout's reduction is the whole newest term
        layout = layout_of(analysis, relation, values)
        newest = layout.reduce([(delta[..., s], f[..., s]) for s in range(f.shape[-1])])
    else:  # Σ_s δ_s F_s through the op's own transpose: no (..., n_pre, n_post) outer product
        diagonal = derive.to_op_layout(relation, jnp.sum(delta * f, axis=-1))
        index = relation.contraction
        newest = derive.weight_vjp(analysis, index, values, values.u[index], diagonal)
    return derive.same_step_grad(analysis, values, relation, delta_new) - newest


def used_trace(plan, trace: dict) -> tuple[jax.Array, ...]:
    """The trace the gradient reads: e_prop's filtered one when `kappa` is set, else the trace itself."""
    return trace["filtered"] if plan.kappa is not None else trace["eps"]


def update_order(reads: dict[int, tuple[int, ...]]) -> list[int]:
    """The states in an order where each comes after every other state whose update reads its old trace,
    so that its new trace can overwrite the old one in place. States that read each other in a cycle
    keep their index order (XLA then copies an array)."""
    order, left = [], sorted(reads)
    while left:
        ready = [s for s in left if not any(s in reads[r] for r in left if r != s)]
        order.append((ready or left)[0])
        left.remove(order[-1])
    return order
