"""Split gated contractions into one contraction per gate.

Consumes: a simplified `Captured` step. Produces: a `Captured` with the same inputs, outputs and state
leaves in which every *gated contraction* is computed gate by gate. A gated contraction is a
`dot_general` of a weight (a value computed from weights alone: `W`, or a transform of it) with one other
operand, whose output goes through a chain of element-wise equations (a bias add, a sigmoid) into a
`split` — or into slices — along the weight's output axis: the gates of a GRU, LSTM or MGU cell
(`r, z = jnp.split(sigmoid(xh @ W + b), 2, axis=-1)`). Each gate then gets:

* its own `dot_general` with the weight's columns for that gate (`W[:, s:s+n]`, a transform of `W`:
  `passes.relations` traces it as an effective weight and the gradient is pulled back through the slice);
* the chain's other operands sliced to the gate, and a weight-only operand of the full width (the bias)
  added as the product of its slice with a constant `ones` column — the same value, now a contraction of
  its own, so the bias is traced per gate as well.

A product of a weight with a concatenation along the contracted axis (`concat([x, r * h]) @ W_h`) whose
pieces include a value computed within the step from a weight op's output (a gate) — not through a hidden
state — becomes the sum of one product per piece with that piece's rows of the weight
(`x @ W_h[:I] + (r * h) @ W_h[I:]`): the gate then enters a product of its own, aligned with the
neurons, which `passes.relations` can cross by its diagonal (a gate read by the cell's other weight).

Before the rewrite a split mixes elements (see `rules.structural`), so no gate reached its cell state
element-wise and every gate weight fell back to its same-step gradient; after it, gate `k`'s op output
reaches neuron `i` through gate `k`'s element `i` only.

Invariant: the step computes the same values (a gate's columns of a product are the product with the
gate's columns; `ones · b = b` exactly; a product split over a concatenation sums its parts in another
order, equal to rounding) and the same derivatives. Sharp edges: only a chain whose every
value has one use is split (otherwise the full product is needed anyway); the gated axis must be the
last axis of the op output; other chain operands of the full width that are not weight-only are sliced
as they are (their elements then mix, as before the rewrite).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from fusetrace._compat import JaxprEqn, Literal, Var, aval_dtype, aval_shape, bind_eqn, dce, new_closed_jaxpr
from fusetrace.capture import Captured
from fusetrace.interpret import producers, uses_of
from fusetrace.rules import lookup

# element-wise primitives whose params hold sub-programs of fixed shapes cannot be re-bound per gate
_OPAQUE = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "pjit", "jit", "closed_call")


@dataclasses.dataclass(frozen=True)
class _Gated:
    """One gated contraction: the product `eqn`, its element-wise `chain` and the gates' `pieces`."""

    eqn: JaxprEqn
    weight_operand: int
    weight_axis: int  # the weight operand's output (free) axis
    chain: tuple[JaxprEqn, ...]
    pieces: tuple[tuple[int, int], ...]  # (start, size) along the gated axis
    outs: tuple[Var, ...]  # the var holding each gate (split outputs or slice outputs)
    ends: tuple[JaxprEqn, ...]  # the split, or the slices


@dataclasses.dataclass(frozen=True)
class _Concatenated:
    """A product `eqn` of a weight with `concat`, computed as the sum of one product per piece."""

    eqn: JaxprEqn
    weight_operand: int
    weight_axis: int  # the weight operand's contracted axis
    concat: JaxprEqn


def split_gates(captured: Captured) -> Captured:
    """`captured` with every gated contraction computed gate by gate (see the module docstring)."""
    jaxpr = captured.jaxpr.jaxpr
    weight_only = _weight_only_vars(captured)
    gated = _find(captured, weight_only)
    concatenated = {id(c.eqn): c for c in _find_concatenated(captured, weight_only)}
    if not gated and not concatenated:
        return captured
    skip = {id(e) for g in gated for e in (g.eqn, *g.chain)}
    at_end = {id(end): g for g in gated for end in g.ends}

    def step(*args):
        env: dict = dict(zip([*jaxpr.constvars, *jaxpr.invars], [*captured.jaxpr.consts, *args], strict=True))

        def read(atom):
            return atom.val if isinstance(atom, Literal) else env[atom]

        for eqn in jaxpr.eqns:
            if id(eqn) in skip:
                continue
            if id(eqn) in at_end:
                g = at_end[id(eqn)]
                if g.outs[0] not in env:
                    env.update(zip(g.outs, _gates(g, read, weight_only), strict=True))
                continue
            if id(eqn) in concatenated:
                env[eqn.outvars[0]] = _sum_of_parts(concatenated[id(eqn)], read)
                continue
            env.update(zip(eqn.outvars, bind_eqn(eqn, [read(a) for a in eqn.invars]), strict=True))
        return [read(v) for v in jaxpr.outvars]

    shapes = [jax.ShapeDtypeStruct(aval_shape(v), aval_dtype(v)) for v in jaxpr.invars]
    closed = jax.make_jaxpr(step)(*shapes)
    return dataclasses.replace(captured, jaxpr=new_closed_jaxpr(dce(closed.jaxpr), closed.consts))


def _gates(g: _Gated, read, weight_only: set) -> list:
    """The value of each gate, computed with its own columns of the weight."""
    operands = [read(a) for a in g.eqn.invars]
    values = []
    for start, size in g.pieces:
        columns = lax.slice_in_dim(operands[g.weight_operand], start, start + size, axis=g.weight_axis)
        invals = list(operands)
        invals[g.weight_operand] = columns
        (value,) = bind_eqn(g.eqn, invals)
        current = g.eqn.outvars[0]
        for eqn in g.chain:
            args = []
            for atom in eqn.invars:
                if atom is current:
                    args.append(value)
                elif _full_width(atom, current):
                    piece = lax.slice_in_dim(read(atom), start, start + size, axis=-1)
                    args.append(_as_product(piece, aval_shape(current)) if _constant_rows(atom, weight_only) else piece)
                else:
                    args.append(read(atom))
            (value,) = bind_eqn(eqn, args)
            current = eqn.outvars[0]
        values.append(value)
    return values


def _sum_of_parts(c: _Concatenated, read):
    """`concat(a_1, ..., a_m) @ W` as `Σ_j a_j @ W[rows of a_j]`."""
    operands = [read(a) for a in c.eqn.invars]
    total, start = None, 0
    for piece in c.concat.invars:
        size = aval_shape(piece)[c.concat.params["dimension"]]
        invals = list(operands)
        invals[c.weight_operand] = lax.slice_in_dim(operands[c.weight_operand], start, start + size, axis=c.weight_axis)
        invals[1 - c.weight_operand] = read(piece)
        (part,) = bind_eqn(c.eqn, invals)
        total = part if total is None else total + part
        start += size
    return total


def _as_product(piece, shape) -> jnp.ndarray:
    """`piece` (ones but for its last axis) broadcast to `shape` as `ones @ piece`: equal to the
    broadcast, and a contraction whose weight operand is `piece` (a per-gate bias is then traced)."""
    row = jnp.reshape(piece, (1, piece.shape[-1]))
    ones = jnp.ones((*shape[:-1], 1), dtype=piece.dtype)
    return lax.dot_general(ones, row, (((len(shape) - 1,), (0,)), ((), ())))


def _full_width(atom, current) -> bool:
    if isinstance(atom, Literal):
        return False
    shape, width = aval_shape(atom), aval_shape(current)[-1]
    return len(shape) > 0 and shape[-1] == width and width > 1


def _constant_rows(atom, weight_only: set) -> bool:
    """A weight-only value that is one row broadcast over the leading axes (a bias)."""
    return atom in weight_only and all(d == 1 for d in aval_shape(atom)[:-1])


def _weight_only_vars(captured: Captured) -> set:
    """The vars computed from weight leaves alone (and constants), with at least one weight leaf."""
    jaxpr = captured.jaxpr.jaxpr
    n_in = captured.n_inputs
    found = {jaxpr.invars[n_in + i] for i, leaf in enumerate(captured.leaves) if leaf.role == "weight"}
    constants = set(jaxpr.constvars)
    for eqn in jaxpr.eqns:
        atoms = [a for a in eqn.invars if not isinstance(a, Literal)]
        if any(a in found for a in atoms) and all(a in found or a in constants for a in atoms):
            found.update(eqn.outvars)
    return found


def _weight_axis(eqn, weight_operand: int) -> int | None:
    """The weight operand's one free axis, when the op puts it last in its output; None otherwise."""
    (contracting, batch) = eqn.params["dimension_numbers"]
    rank = len(aval_shape(eqn.invars[weight_operand]))
    bound = set(contracting[weight_operand]) | set(batch[weight_operand])
    free = [axis for axis in range(rank) if axis not in bound]
    other = eqn.invars[1 - weight_operand]
    other_bound = set(contracting[1 - weight_operand]) | set(batch[1 - weight_operand])
    other_free = len(aval_shape(other)) - len(other_bound)
    if len(free) != 1 or (weight_operand == 0 and other_free):
        return None  # not exactly one output axis, or not the last one
    return free[0]


def _find(captured: Captured, weight_only: set) -> list[_Gated]:
    jaxpr = captured.jaxpr.jaxpr
    uses = uses_of(jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is not lax.dot_general_p:
            continue
        held = [i for i, a in enumerate(eqn.invars) if not isinstance(a, Literal) and a in weight_only]
        if len(held) != 1 or (axis := _weight_axis(eqn, held[0])) is None:
            continue
        gated = _follow(eqn, uses)
        if gated is not None:
            chain, pieces, outs, ends = gated
            found.append(_Gated(eqn, held[0], axis, chain, pieces, outs, ends))
    return found


def _find_concatenated(captured: Captured, weight_only: set) -> list[_Concatenated]:
    """Products of a weight with a concatenation along the contracted axis one of whose pieces is computed
    from a weight op's output within the step (not through a hidden state)."""
    jaxpr = captured.jaxpr.jaxpr
    producer = producers(jaxpr)
    from_ops = _from_weight_ops(captured, weight_only)
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is not lax.dot_general_p:
            continue
        held = [i for i, a in enumerate(eqn.invars) if not isinstance(a, Literal) and a in weight_only]
        if len(held) != 1:
            continue
        position = held[0]
        other = eqn.invars[1 - position]
        concat = None if isinstance(other, Literal) else producer.get(other)
        (contracting, batch) = eqn.params["dimension_numbers"]
        if concat is None or concat.primitive is not lax.concatenate_p or batch[0] or batch[1]:
            continue
        if len(contracting[position]) != 1 or tuple(contracting[1 - position]) != (concat.params["dimension"],):
            continue
        if any(not isinstance(a, Literal) and a in from_ops for a in concat.invars):
            found.append(_Concatenated(eqn, position, contracting[position][0], concat))
    return found


def _from_weight_ops(captured: Captured, weight_only: set) -> set:
    """The vars computed from the output of a product with a weight without passing a hidden state's new
    value (the step's cut): a gate, and what is computed from it before the cell's state is written."""
    jaxpr = captured.jaxpr.jaxpr
    n_out = captured.n_outputs
    cut = {jaxpr.outvars[n_out + i] for i, leaf in enumerate(captured.leaves) if leaf.role == "hidden"}
    found: set = set()
    for eqn in jaxpr.eqns:
        atoms = [a for a in eqn.invars if not isinstance(a, Literal)]
        weighted = eqn.primitive is lax.dot_general_p and any(a in weight_only for a in atoms)
        if weighted or any(a in found and a not in cut for a in atoms):
            found.update(v for v in eqn.outvars if v not in weight_only)
    return found


def _follow(eqn, uses):
    """The element-wise chain from `eqn`'s output to a split (or slices) of its last axis, if any."""
    current = eqn.outvars[0]
    width = aval_shape(current)[-1]
    last = len(aval_shape(current)) - 1
    chain = []
    while True:
        users = uses.get(current, [])
        if None in users or not users:
            return None
        if all(u.primitive is lax.slice_p and _slices_last_axis(u, current) for u in users):
            pieces = tuple((u.params["start_indices"][-1], aval_shape(u.outvars[0])[-1]) for u in users)
            return tuple(chain), pieces, tuple(u.outvars[0] for u in users), tuple(users)
        if len(users) != 1:
            return None
        (user,) = users
        if user.primitive is lax.split_p and user.params["axis"] == last:
            starts = [0]
            for size in user.params["sizes"][:-1]:
                starts.append(starts[-1] + int(size))
            pieces = tuple((s, int(n)) for s, n in zip(starts, user.params["sizes"], strict=True))
            return tuple(chain), pieces, tuple(user.outvars), (user,)
        rule = lookup(user.primitive)
        elementwise = rule is not None and rule.family == "elementwise" and user.primitive.name not in _OPAQUE
        if not elementwise or len(user.outvars) != 1 or aval_shape(user.outvars[0]) != aval_shape(current):
            return None
        if width <= 1:
            return None
        chain.append(user)
        current = user.outvars[0]


def _slices_last_axis(eqn, var) -> bool:
    shape = aval_shape(var)
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"]
    whole = all(s == 0 and lim == d for s, lim, d in zip(starts[:-1], limits[:-1], shape[:-1], strict=True))
    return whole and (strides is None or all(s == 1 for s in strides))
