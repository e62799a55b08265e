"""Tier 1: every registered rule against a slow reference.

For each registered primitive there is a case: a tiny function calling it. The rule's claims about an
equation of that primitive are checked by perturbation, independently of the rule:

* `aligned`: perturbing element j of the operand changes only output elements whose trailing index is j
  (broadcasts over new leading axes allowed);
* `perm`: perturbing element (i, j, ...) changes only the transposed output element;
* `affine`: the output is affine in the operand with a coefficient independent of where it is taken
  (finite differences agree at two base points and scale linearly).

A meta-test fails when a registered primitive has no case.
"""

import brainevent
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from braintools.surrogate._base import heaviside_p
from jax import lax

from fusetrace._compat import Literal, add_any_p, custom_jvp_call_p, custom_vjp_call_p, jit_p, stack_p, unstack_p
from fusetrace.rules import ALIGNED_AFFINE, RULES, Operand

ATOL = 1e-9  # float64 perturbation checks
SHAPE = (4,)
RNG = np.random.default_rng(0)


def _x(shape=SHAPE, low=0.2, high=0.8):
    return jnp.asarray(RNG.uniform(low, high, shape))


def _bool(shape=SHAPE):
    return jnp.asarray(RNG.random(shape) < 0.5)


def _int(shape=SHAPE):
    return jnp.asarray(RNG.integers(1, 5, shape), jnp.int32)


@jax.custom_jvp
def _cjvp(x):
    return jnp.sin(x)


_cjvp.defjvp(lambda p, t: (jnp.sin(p[0]), jnp.cos(p[0]) * t[0]))


@jax.custom_vjp
def _cvjp(x):
    return 2.0 * x


_cvjp.defvjp(lambda x: (2.0 * x, None), lambda _, g: (2.0 * g,))


def _unary(fn, **kw):
    return fn, lambda: (_x(**kw),)


def _binary(fn, make=_x):
    return fn, lambda: (make(), make())


UNARY = {
    lax.abs_p: lax.abs,
    lax.sign_p: lax.sign,
    lax.floor_p: lax.floor,
    lax.ceil_p: lax.ceil,
    lax.round_p: lax.round,
    lax.is_finite_p: lax.is_finite,
    lax.exp_p: lax.exp,
    lax.exp2_p: lax.exp2,
    lax.log_p: lax.log,
    lax.log1p_p: lax.log1p,
    lax.expm1_p: lax.expm1,
    lax.tanh_p: lax.tanh,
    lax.logistic_p: lax.logistic,
    lax.sin_p: lax.sin,
    lax.cos_p: lax.cos,
    lax.tan_p: lax.tan,
    lax.asin_p: lax.asin,
    lax.acos_p: lax.acos,
    lax.atan_p: lax.atan,
    lax.sinh_p: lax.sinh,
    lax.cosh_p: lax.cosh,
    lax.asinh_p: lax.asinh,
    lax.atanh_p: lax.atanh,
    lax.sqrt_p: lax.sqrt,
    lax.rsqrt_p: lax.rsqrt,
    lax.cbrt_p: lax.cbrt,
    lax.square_p: lax.square,
    lax.erf_p: lax.erf,
    lax.erfc_p: lax.erfc,
    lax.erf_inv_p: lax.erf_inv,
    lax.lgamma_p: lax.lgamma,
    lax.digamma_p: lax.digamma,
    lax.neg_p: lax.neg,
    lax.copy_p: lax.copy_p.bind,
    lax.stop_gradient_p: lax.stop_gradient_p.bind,
}
CASES = {p: _unary(f) for p, f in UNARY.items()}
CASES[lax.acosh_p] = _unary(lax.acosh, low=1.5, high=3.0)
CASES[lax.real_p] = (lax.real, lambda: (_x().astype(jnp.complex128),))
CASES[lax.integer_pow_p] = _unary(lambda x: lax.integer_pow(x, 3))
CASES[lax.convert_element_type_p] = (
    lambda x: lax.convert_element_type(x, jnp.float64),
    lambda: (_x().astype(jnp.float32),),
)  # widening: exact
CASES[lax.reduce_precision_p] = _unary(lambda x: lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7))
for _p, _f in {
    lax.add_p: lax.add,
    lax.sub_p: lax.sub,
    lax.mul_p: lax.mul,
    lax.div_p: lax.div,
    lax.max_p: lax.max,
    lax.min_p: lax.min,
    lax.rem_p: lax.rem,
    lax.nextafter_p: lax.nextafter,
    lax.atan2_p: lax.atan2,
    lax.pow_p: lax.pow,
    lax.eq_p: lax.eq,
    lax.ne_p: lax.ne,
    lax.lt_p: lax.lt,
    lax.le_p: lax.le,
    lax.gt_p: lax.gt,
    lax.ge_p: lax.ge,
    add_any_p: add_any_p.bind,
}.items():
    CASES[_p] = _binary(_f)
for _p, _f in {lax.and_p: lax.bitwise_and, lax.or_p: lax.bitwise_or, lax.xor_p: lax.bitwise_xor}.items():
    CASES[_p] = _binary(_f, make=_bool)
CASES[lax.not_p] = (lax.bitwise_not, lambda: (_bool(),))
CASES[lax.select_n_p] = (lax.select_n, lambda: (_bool(), _x(), _x()))
CASES[lax.clamp_p] = (lax.clamp, lambda: (_x(low=0.3, high=0.3), _x(), _x(low=0.6, high=0.6)))
CASES[heaviside_p] = (heaviside_p.bind, lambda: (_x(low=-0.5, high=0.5), _x()))
# structural
M = (3, 4)
CASES.update(
    {
        lax.broadcast_in_dim_p: (lambda x: lax.broadcast_in_dim(x, (2, 4), (1,)), lambda: (_x(),)),
        lax.transpose_p: (lambda x: lax.transpose(x, (1, 0)), lambda: (_x(M),)),
        lax.reshape_p: (lambda x: lax.reshape(x, (4, 3)), lambda: (_x(M),)),
        lax.squeeze_p: (lambda x: lax.squeeze(x, (0,)), lambda: (_x((1, 4)),)),
        lax.rev_p: (lambda x: lax.rev(x, (0,)), lambda: (_x(),)),
        lax.slice_p: (lambda x: lax.slice(x, (1,), (3,)), lambda: (_x(),)),
        lax.dynamic_slice_p: (lambda x: lax.dynamic_slice(x, (1,), (2,)), lambda: (_x(),)),
        lax.dynamic_update_slice_p: (lambda x, y: lax.dynamic_update_slice(x, y, (1,)), lambda: (_x(), _x((2,)))),
        lax.concatenate_p: (lambda x, y: lax.concatenate([x, y], 0), lambda: (_x(), _x())),
        lax.pad_p: (lambda x: lax.pad(x, 0.0, [(1, 1, 0)]), lambda: (_x(),)),
        lax.reduce_sum_p: (lambda x: jnp.sum(x, 0), lambda: (_x(M),)),
        lax.cumsum_p: (lambda x: lax.cumsum(x), lambda: (_x(),)),
        lax.gather_p: (lambda x: x[jnp.array([2, 0])], lambda: (_x(),)),
        lax.scatter_add_p: (lambda x, y: x.at[jnp.array([1, 2])].add(y), lambda: (_x(), _x((2,)))),
        lax.scatter_p: (lambda x, y: x.at[jnp.array([1, 2])].set(y), lambda: (_x(), _x((2,)))),
        lax.split_p: (lambda x: lax.split(x, (2, 2))[0], lambda: (_x(),)),
        stack_p: (lambda x, y: jnp.stack([x, y]), lambda: (_x(), _x())),
        unstack_p: (lambda x: unstack_p.bind(x, axis=0)[1], lambda: (_x(M),)),
        lax.reduce_max_p: (lambda x: jnp.max(x, 0), lambda: (_x(M),)),
        lax.reduce_min_p: (lambda x: jnp.min(x, 0), lambda: (_x(M),)),
        lax.reduce_prod_p: (lambda x: jnp.prod(x, 0), lambda: (_x(M),)),
        lax.reduce_and_p: (lambda x: jnp.all(x, 0), lambda: (_bool(M),)),
        lax.reduce_or_p: (lambda x: jnp.any(x, 0), lambda: (_bool(M),)),
        lax.reduce_xor_p: (lambda x: lax.reduce_xor_p.bind(x, axes=(0,)), lambda: (_bool(M),)),
        lax.argmax_p: (lambda x: jnp.argmax(x, 0), lambda: (_x(M),)),
        lax.argmin_p: (lambda x: jnp.argmin(x, 0), lambda: (_x(M),)),
        lax.sort_p: (lambda x: jnp.sort(x), lambda: (_x(),)),
        lax.cummax_p: (lambda x: lax.cummax(x), lambda: (_x(),)),
        lax.cummin_p: (lambda x: lax.cummin(x), lambda: (_x(),)),
        lax.cumprod_p: (lambda x: lax.cumprod(x), lambda: (_x(),)),
        lax.cumlogsumexp_p: (lambda x: lax.cumlogsumexp(x), lambda: (_x(),)),
        lax.iota_p: (lambda x: x + lax.iota(x.dtype, 4), lambda: (_x(),)),
        lax.scatter_mul_p: (lambda x, y: x.at[jnp.array([1, 2])].multiply(y), lambda: (_x(), _x((2,)))),
        lax.scatter_min_p: (lambda x, y: x.at[jnp.array([1, 2])].min(y), lambda: (_x(), _x((2,)))),
        lax.scatter_max_p: (lambda x, y: x.at[jnp.array([1, 2])].max(y), lambda: (_x(), _x((2,)))),
        lax.top_k_p: (lambda x: lax.top_k(x, 2)[0], lambda: (_x(),)),
        # contracting
        lax.dot_general_p: (lambda x, w: x @ w, lambda: (_x((2, 3)), _x((3, 4)))),
        lax.conv_general_dilated_p: (
            lambda x, w: lax.conv_general_dilated(x, w, (1,), "SAME"),
            lambda: (_x((1, 2, 5)), _x((3, 2, 2))),
        ),
        brainevent.binary_densemv_p.primitive: (
            lambda w, s: brainevent.binary_densemv(w, s, transpose=True),
            lambda: (_x((3, 4)), _x((3,), 0.0, 1.0)),
        ),
        brainevent.binary_densemm_p.primitive: (
            lambda w, s: brainevent.binary_densemm(w, s, transpose=True),
            lambda: (_x((3, 4)), _x((3, 2), 0.0, 1.0)),
        ),
        # control
        jit_p: (jax.jit(lambda x: jnp.sin(x) * 2.0), lambda: (_x(),)),
        custom_jvp_call_p: (_cjvp, lambda: (_x(),)),
        custom_vjp_call_p: (_cvjp, lambda: (_x(),)),
        lax.cond_p: (lambda x: lax.cond(True, lambda y: y * 2.0, lambda y: y, x), lambda: (_x(),)),
        lax.scan_p: (lambda x: lax.scan(lambda c, y: (c + y, c), 0.0, x)[1], lambda: (_x(),)),
        lax.while_p: (
            lambda x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.5), (0, x))[1],
            lambda: (_x(),),
        ),
    }
)
# sparse brainevent products: checked through the analysis zoo (their operands need index structures)
INDIRECT = {
    brainevent.binary_fcnmv_p.primitive,
    brainevent.binary_fcnmm_p.primitive,
    brainevent.binary_csrmv_p.primitive,
    brainevent.binary_csrmm_p.primitive,
    brainevent.csrmv_p.primitive,
    brainevent.csrmm_p.primitive,
}


def test_every_registered_primitive_has_a_case():
    missing = sorted(p.name for p in RULES if p not in CASES and p not in INDIRECT)
    assert not missing, f"registered primitives without a tier-1 case: {missing}"


def _find(jaxpr, primitive, names):
    """The first equation of `primitive` (searching inside `jit`s) and, for each of its operands, the
    case argument it is (or None); `names` maps this jaxpr's vars to case argument positions."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is primitive:
            return eqn, [None if isinstance(v, Literal) else names.get(v) for v in eqn.invars]
        if eqn.primitive is jit_p and primitive is not jit_p:
            inner = eqn.params["jaxpr"].jaxpr
            found = _find(
                inner,
                primitive,
                {
                    iv: names.get(ov)
                    for ov, iv in zip(eqn.invars, inner.invars, strict=True)
                    if not isinstance(ov, Literal)
                },
            )
            if found is not None:
                return found
    return None


def _perturb(x, index, size=1e-3):
    if x.dtype == jnp.bool_:
        return x.at[index].set(~x[index])
    return x.at[index].add(size)


def _claims(eqn, args, position):
    operands = [
        Operand({("hidden", 0): ALIGNED_AFFINE} if i == position else {}, tuple(np.shape(a)))
        for i, a in enumerate(args)
    ]
    return RULES[eqn.primitive].propagate(eqn, operands)[0].get(("hidden", 0))


@pytest.mark.parametrize("primitive", sorted(CASES, key=lambda p: p.name), ids=lambda p: p.name)
def test_rule_claims_hold(primitive):
    fn, make = CASES[primitive]
    args = make()
    closed = jax.make_jaxpr(fn)(*args)
    found = _find(closed.jaxpr, primitive, {v: i for i, v in enumerate(closed.jaxpr.invars)})
    assert found is not None, f"{primitive.name} does not appear when tracing its case"
    eqn, argument_of = found
    checked = 0
    # a claim about equation operand k is checked through the case argument that IS that operand
    for operand, position in enumerate(argument_of):
        if position is None:
            continue
        dep = _claims(eqn, [np.zeros(v.aval.shape) for v in eqn.invars], operand)
        checked += 1
        if dep is None:
            continue
        _check_alignment(fn, args, position, dep)
        if dep.affine and jnp.issubdtype(args[position].dtype, jnp.floating):
            _check_affine(fn, args, position)
    assert checked or primitive.name in ("iota",), "the case never feeds its arguments to the primitive"


def _check_alignment(fn, args, position, dep):
    base = np.asarray(fn(*args))
    x = args[position]
    for index in np.ndindex(x.shape):
        moved = list(args)
        moved[position] = _perturb(x, index)
        changed = np.argwhere(np.abs(np.asarray(fn(*moved), dtype=np.float64) - base.astype(np.float64)) > 0)
        if dep.aligned:  # same trailing position, ignoring size-1 axes (broadcasts, squeezes)
            own = tuple(i for i, d in zip(index, x.shape, strict=True) if d != 1)
            for c in changed:
                out = tuple(ci for ci, d in zip(c, base.shape, strict=True) if d != 1)
                assert out[len(out) - len(own) :] == own, (index, changed)
        elif dep.perm is not None:
            expected = tuple(index[axis] for axis in dep.perm)
            assert all(tuple(c) == expected for c in changed), (index, changed)


def _check_affine(fn, args, position):
    def at(value):
        moved = list(args)
        moved[position] = value
        return np.asarray(fn(*moved), dtype=np.float64)

    x1, x2 = args[position], args[position] + 0.37
    step = jnp.asarray(RNG.normal(size=x1.shape)) * 1e-2
    np.testing.assert_allclose(at(x1 + step) - at(x1), at(x2 + step) - at(x2), atol=ATOL)
    np.testing.assert_allclose(at(x1 + 2 * step) - at(x1), 2 * (at(x1 + step) - at(x1)), atol=ATOL)
