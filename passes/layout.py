"""How a per-weight (d_rtrl / e_prop) trace is laid out, for each kind of weight relation.

Consumes: an `Analysis`, a traced `Relation` and (per step) the step's values. Produces a `Layout`:
three maps that are all the trace recursion needs,

* `gather(c)`: a neuron-layout array `c (..., n_post)` seen at each weight element (`c[post(p)]`);
* `inject(f)`: the immediate sensitivity `f[post(p)] · ∂y[post(p)]/∂W[p]` of each weight element;
* `reduce(pairs)`: `Σ_k gather(c_k)·x_k` for `(c_k, x_k)` in `pairs`, summed over the batch into the
  weight's own shape (each product formed per batch entry inside the sum: no batch-sized product is
  materialised),

so that `ε_s ← Σ_t gather(D_st)·ε_t + inject(F_s)` and `∂L/∂W = reduce([(δ_s, ε_s) for each state s])`.

Kinds:
* "dense": `y = dot_general(u, W)`, u (..., I), W (I, N): trace (..., I, N) by broadcasting.
* "synapse": an event/sparse product where each weight element reaches one post neuron (the rule's
  `per_synapse`): trace in the weight's own shape (sparse weights stay sparse), maps by the op's own
  VJP, one batch entry at a time.
* "shared": a single weight element (a scalar weight reaching every neuron): trace per neuron,
  `∂y/∂w` by the op's JVP.
* "conv": a convolution (each kernel element is used at every output position): trace per output
  position, `(B·P, *W.shape)` — one kernel copy per position, never dense `n_pre × n_post`; maps by the
  op's VJPs with one-hot masks over the batch and the positions (exact, but B·P VJPs per step).
* "neuron": an element-wise parameter (one per neuron, or one for all) with no contraction: trace per
  neuron; `F` is already `∂h/∂θ` (the JVP on the parameter), so `inject` is the identity.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fusetrace.rules import lookup

from . import derive


def weight_shape(analysis, relation) -> tuple[int, ...]:
    """The shape of the weight a relation's trace follows: the leaf's, or its op's effective weight's
    (`Relation.transformed`)."""
    return tuple(relation.weight_shape) or tuple(analysis.captured.leaves[relation.weight_leaf].shape)


def layout_kind(analysis, relation) -> str | None:
    """The layout a relation's d_rtrl trace takes, or None when no per-weight trace is known for it."""
    if relation.elementwise:
        return "neuron"
    shape = weight_shape(analysis, relation)
    if int(np.prod(shape, dtype=int)) == 1:
        return "shared"
    contraction = analysis.facts.contractions[relation.contraction]
    if _dense(contraction, shape, relation):
        return "dense"
    rule = lookup(contraction.eqn.primitive)
    if rule is not None and rule.per_synapse:
        return "synapse"
    if contraction.eqn.primitive.name == "conv_general_dilated" and contraction.weight_operand == 1:
        return "conv"
    return None


def _dense(contraction, shape: tuple[int, ...], relation) -> bool:
    eqn = contraction.eqn
    if eqn.primitive.name != "dot_general" or contraction.weight_operand != 1 or relation.tail_perm is not None:
        return False
    (contract_u, contract_w), (batch_u, batch_w) = eqn.params["dimension_numbers"]
    u_shape, w_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    return (
        not batch_u
        and not batch_w
        and len(w_shape) == 2
        and tuple(contract_w) == (0,)
        and tuple(contract_u) == (len(u_shape) - 1,)
        and tuple(shape) == tuple(w_shape)
    )


def trace_shape(analysis, relation, kind: str) -> tuple[int, ...]:
    """Shape of one state's slice of the trace (append the state axis for the whole trace)."""
    group = analysis.group_named(relation.group)
    batch = () if analysis.batch_size is None else (analysis.batch_size,)
    shape = weight_shape(analysis, relation)
    if kind in ("shared", "neuron"):
        return group.shape
    if kind == "conv":
        return (len(_position_masks(analysis, relation)), *shape)
    return batch + shape


def _position_masks(analysis, relation) -> np.ndarray:
    """One-hot masks over every op-output element but the feature axis: `(B·P, *op_shape)` with the
    feature axis of size 1 (a mask selects one batch entry and one output position, all channels)."""
    eqn = analysis.facts.contractions[relation.contraction].eqn
    shape = tuple(relation.op_shape)
    feature = eqn.params["dimension_numbers"].out_spec[1]
    kept = tuple(1 if axis == feature else size for axis, size in enumerate(shape))
    count = int(np.prod(kept, dtype=int))
    return np.eye(count).reshape((count, *kept))


UNROLLED_SUM_MAX = 64
Pairs = list[tuple[jax.Array, jax.Array]]


def sum_products(pairs: Pairs) -> jax.Array:
    """`Σ_b Σ_k a_k[b]·x_k[b]` over the leading (batch) axis, each product formed per batch entry inside the
    sum. Up to `UNROLLED_SUM_MAX` entries the batch sum is a chain of element-wise adds, which XLA's CPU
    backend fuses with the products into one loop; as a `reduce` it went to a library reduction fusion that
    took ~25x longer on the d_rtrl gradient (measured on a 16 x 512 x 512 trace: 95 ms against ~3 ms).
    Forming the products per entry keeps XLA from materialising the batch-sized `Σ_k a_k·x_k` first."""
    batch = pairs[0][1].shape[0]
    if batch > UNROLLED_SUM_MAX:
        return jnp.sum(sum(a * x for a, x in pairs), axis=0)
    total = None
    for b in range(batch):
        for a, x in pairs:
            term = a[b] * x[b]
            total = term if total is None else total + term
    assert total is not None, "a reduction has at least one pair"
    return total


@dataclasses.dataclass(frozen=True)
class Layout:
    gather: Callable[[jax.Array], jax.Array]
    inject: Callable[[jax.Array], jax.Array]
    reduce: Callable[[Pairs], jax.Array]


def _same(x: jax.Array) -> jax.Array:
    return x


def _reducer(gather, batched: bool, finish=_same) -> Callable[[Pairs], jax.Array]:
    """`reduce(pairs)`: per batch entry when `batched` (the leading axis is the batch), then `finish`."""
    if batched:
        return lambda pairs: finish(sum_products([(gather(c), x) for c, x in pairs]))
    return lambda pairs: finish(sum(gather(c) * x for c, x in pairs))


def make_layout(kind: str, analysis, relation, values) -> Layout:
    batched = analysis.batch_size is not None
    if kind == "neuron":
        shape = analysis.captured.leaves[relation.weight_leaf].shape
        if int(np.prod(shape, dtype=int)) == 1:
            return Layout(_same, _same, _reducer(_same, False, lambda x: jnp.reshape(jnp.sum(x), shape)))
        return Layout(_same, _same, _reducer(_same, batched, lambda x: jnp.reshape(x, shape)))
    u = values.u[relation.contraction]
    if kind == "dense":
        u = jax.lax.optimization_barrier(u)  # computed once, not at every weight element of `inject`

        def gather(c):
            return c[..., None, :]

        return Layout(gather, lambda f: u[..., :, None] * f[..., None, :], _reducer(gather, batched))
    weight = derive.weight_of(analysis, values, relation.contraction)

    def op(pre, w):
        return derive.op_output(analysis, relation.contraction, values, pre, w)

    if kind == "shared":
        _, dy_dw = jax.jvp(lambda w: op(u, w), (weight,), (jnp.ones_like(weight),))
        dy_dw = derive.from_op_layout(relation, dy_dw, analysis.group_named(relation.group).shape)
        total = _reducer(_same, False, lambda x: jnp.reshape(jnp.sum(x), jnp.shape(weight)))
        return Layout(_same, lambda f: f * dy_dw, total)
    _, vjp_ones = jax.vjp(lambda w: op(jnp.ones_like(u), w), weight)
    _, vjp_u = jax.vjp(lambda w: op(u, w), weight)
    if kind == "conv":
        masks = jnp.asarray(_position_masks(analysis, relation), weight.dtype)

        def per_position(vjp):
            return lambda c: jax.vmap(lambda mask: vjp(derive.to_op_layout(relation, c) * mask)[0])(masks)

        gather = per_position(vjp_ones)
        return Layout(gather, per_position(vjp_u), _reducer(gather, False, lambda x: jnp.sum(x, axis=0)))

    def per_entry(vjp):
        def apply(c):
            if not batched:
                return vjp(derive.to_op_layout(relation, c))[0]
            masks = jnp.eye(analysis.batch_size, dtype=c.dtype).reshape(
                (analysis.batch_size, analysis.batch_size) + (1,) * (c.ndim - 1)
            )
            return jax.vmap(lambda mask: vjp(derive.to_op_layout(relation, c * mask))[0])(masks)

        return apply

    gather = per_entry(vjp_ones)
    return Layout(gather, per_entry(vjp_u), _reducer(gather, batched))
