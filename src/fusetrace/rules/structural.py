"""Structural primitives: they move, pick or reduce elements. A broadcast over new leading axes, and a
squeeze or reshape that only drops or inserts size-1 axes, keep a value aligned with its sources; a
transpose keeps it one-to-one (with a recorded layout); every other one mixes elements
(conservatively), and the linear ones keep affinity."""

from jax import lax

from .._compat import stack_p, unstack_p
from .base import Dep, Operand, Rule, merge, mixed, register


def _broadcast_in_dim_rule(eqn, operands: list[Operand]):
    (out,) = eqn.outvars
    out_shape, in_shape = tuple(out.aval.shape), tuple(operands[0].shape)
    trailing = tuple(range(len(out_shape) - len(in_shape), len(out_shape)))
    keeps = (
        tuple(eqn.params["broadcast_dimensions"]) == trailing
        and out_shape[len(out_shape) - len(in_shape) :] == in_shape
    )
    if keeps:
        return [merge(operands[:1], in_shape, linear=True)]
    return [mixed(operands[:1], linear=True)]


def _transpose_rule(eqn, operands: list[Operand]):
    permutation = tuple(eqn.params["permutation"])
    out = {}
    for source, dep in operands[0].fact.items():
        if dep.one_to_one:
            base = dep.perm or tuple(range(len(permutation)))
            composed = tuple(base[axis] for axis in permutation)
            identity = composed == tuple(range(len(composed)))
            out[source] = Dep(identity, dep.affine, None if identity else composed)
        else:
            out[source] = Dep(False, dep.affine)
    return [out]


def _unit_axes_rule(eqn, operands: list[Operand]):
    """`squeeze`, and a `reshape` that only inserts or drops size-1 axes, keep every element in place
    (flattened order): aligned sources stay aligned; any other reshape mixes."""
    (out,) = eqn.outvars
    in_shape, out_shape = tuple(operands[0].shape), tuple(out.aval.shape)
    if [d for d in in_shape if d != 1] != [d for d in out_shape if d != 1]:
        return [mixed(operands[:1], linear=True)]
    return [{source: Dep(dep.aligned, dep.affine) for source, dep in operands[0].fact.items()}]


def _mixing(linear: bool):
    def propagate(eqn, operands: list[Operand]):
        return [mixed(operands, linear=linear) for _ in eqn.outvars]

    return propagate


def register_structural(*primitives, linear: bool) -> None:
    for primitive in primitives:
        register(primitive, Rule("structural", _mixing(linear), linear=linear))


register(lax.broadcast_in_dim_p, Rule("structural", _broadcast_in_dim_rule, linear=True))
register(lax.transpose_p, Rule("structural", _transpose_rule, linear=True))
register(lax.squeeze_p, Rule("structural", _unit_axes_rule, linear=True))
register(lax.reshape_p, Rule("structural", _unit_axes_rule, linear=True))
register_structural(
    lax.rev_p,
    lax.slice_p,
    lax.dynamic_slice_p,
    lax.dynamic_update_slice_p,
    lax.concatenate_p,
    lax.pad_p,
    lax.reduce_sum_p,
    lax.cumsum_p,
    lax.gather_p,
    lax.scatter_add_p,
    lax.scatter_p,
    lax.split_p,
    stack_p,
    unstack_p,
    linear=True,
)
register_structural(
    lax.reduce_max_p,
    lax.reduce_min_p,
    lax.reduce_prod_p,
    lax.reduce_and_p,
    lax.reduce_or_p,
    lax.argmax_p,
    lax.argmin_p,
    lax.sort_p,
    lax.cummax_p,
    lax.cummin_p,
    lax.cumprod_p,
    lax.iota_p,
    lax.scatter_mul_p,
    lax.scatter_min_p,
    lax.scatter_max_p,
    lax.top_k_p,
    lax.reduce_xor_p,
    lax.cumlogsumexp_p,
    linear=False,
)
