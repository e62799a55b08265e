"""Element-wise primitives: element `i` of each output depends on element `i` of each operand
(scalars broadcast). Additive ones keep sources affine; `mul`/`div` keep them affine when the
coefficient carries no source but weights (which are fixed within a sequence: a decay computed from a
trained time constant still makes a linear time-invariant update)."""

from jax import lax

from .._compat import add_any_p
from .base import Dep, Operand, Rule, merge, register


def _additive(eqn, operands: list[Operand]):
    return [merge(operands, tuple(v.aval.shape), linear=True) for v in eqn.outvars]


def _weights_only(operand: Operand) -> bool:
    return all(kind == "weight" for kind, _ in operand.fact)


def _scaling(eqn, operands: list[Operand]):
    """`mul(x, c)` / `div(x, c)`: a source of `x` stays affine when `c` carries no source but weights; a
    source of `c` (the multiplier or the divisor) stays affine only when `x` carries none at all."""
    fixed = [not op.fact for op in operands]
    coefficient = [_weights_only(op) for op in operands]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    merged = merge(operands, out_shape, linear=True)
    for source in list(merged):
        affine = True
        for i, op in enumerate(operands):
            others = [j for j in range(len(operands)) if j != i]
            if source not in op.fact:
                continue
            divided = eqn.primitive is lax.div_p and i == 1
            if divided or not all(fixed[j] or (coefficient[j] and source[0] != "weight") for j in others):
                affine = False
        if not affine:
            merged[source] = Dep(merged[source].aligned, False, merged[source].perm)
    return [merged for _ in eqn.outvars]


def _nonlinear(eqn, operands: list[Operand]):
    return [merge(operands, tuple(v.aval.shape), linear=False) for v in eqn.outvars]


def register_elementwise(*primitives, propagate=_nonlinear, linear=False, spike=False) -> None:
    for primitive in primitives:
        register(primitive, Rule("elementwise", propagate, linear=linear, spike=spike))


register_elementwise(
    lax.add_p,
    lax.sub_p,
    lax.neg_p,
    lax.convert_element_type_p,
    lax.real_p,
    lax.copy_p,
    add_any_p,
    propagate=_additive,
    linear=True,
)
register_elementwise(lax.mul_p, lax.div_p, propagate=_scaling, linear=True)
register_elementwise(
    lax.reduce_precision_p,
    lax.abs_p,
    lax.sign_p,
    lax.floor_p,
    lax.ceil_p,
    lax.round_p,
    lax.is_finite_p,
    lax.exp_p,
    lax.exp2_p,
    lax.log_p,
    lax.log1p_p,
    lax.expm1_p,
    lax.tanh_p,
    lax.logistic_p,
    lax.sin_p,
    lax.cos_p,
    lax.tan_p,
    lax.asin_p,
    lax.acos_p,
    lax.atan_p,
    lax.atan2_p,
    lax.sinh_p,
    lax.cosh_p,
    lax.asinh_p,
    lax.acosh_p,
    lax.atanh_p,
    lax.sqrt_p,
    lax.rsqrt_p,
    lax.cbrt_p,
    lax.pow_p,
    lax.integer_pow_p,
    lax.square_p,
    lax.max_p,
    lax.min_p,
    lax.rem_p,
    lax.nextafter_p,
    lax.erf_p,
    lax.erfc_p,
    lax.erf_inv_p,
    lax.lgamma_p,
    lax.digamma_p,
    lax.eq_p,
    lax.ne_p,
    lax.lt_p,
    lax.le_p,
    lax.gt_p,
    lax.ge_p,
    lax.and_p,
    lax.or_p,
    lax.not_p,
    lax.xor_p,
    lax.select_n_p,
    lax.clamp_p,
    lax.stop_gradient_p,
)
