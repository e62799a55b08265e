"""The evaluator every rewrite re-traces: a jaxpr interpreter with three switches.

* `substitute`: values that replace vars once computed (the equation still runs; its result is
  dropped). The derivation cuts weight-relation outputs and hidden outputs with it.
* `transform`: functions `(value, invals) -> value` applied to a var once computed, from the
  equation's own inputs (e_prop's random feedback changes a relation's backward path with it).
* `inline`: evaluate `jit` equations by recursing into their body (so a re-trace inlines them).
* `fold`: drop unit residue (`x * 1.0`, `convert_element_type` to the same dtype) and reuse the
  result of an identical earlier equation (common-subexpression elimination).

Rewrites call `jax.make_jaxpr` on a function that calls `evaluate`; nothing here builds equations.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from jax import lax

from ._compat import ClosedJaxpr, Jaxpr, Literal, Var, aval_dtype, aval_shape, bind_eqn, jit_p


def evaluate(
    jaxpr: Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    *,
    want: Sequence[Any] | None = None,
    substitute: Mapping[Var, Any] | None = None,
    transform: Mapping[Var, Callable[[Any, list[Any]], Any]] | None = None,
    inline: bool = False,
    fold: bool = False,
) -> list[Any]:
    """Values of `want` (default: the jaxpr's outputs) given `consts` and `args`."""
    substitute = substitute or {}
    transform = transform or {}
    env: dict[Var, Any] = {}
    seen: dict[tuple, list[Var]] = {}  # CSE: equation key -> outvars of its first occurrence
    canon: dict[Var, Var] = {}  # a var computed twice -> its first occurrence

    def read(atom):
        return atom.val if isinstance(atom, Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = substitute.get(var, value)
    for eqn in jaxpr.eqns:
        special = any(v in substitute or v in transform for v in eqn.outvars)
        key = _cse_key(eqn, canon) if fold and not special else None
        if key is not None and key in seen:
            for var, first in zip(eqn.outvars, seen[key], strict=True):
                canon[var] = first
                env[var] = env[first]
            continue
        invals = [read(a) for a in eqn.invars]
        outvals = _run(eqn, invals, inline, fold)
        for var, value in zip(eqn.outvars, outvals, strict=True):
            if var in transform:
                value = transform[var](value, invals)
            env[var] = substitute.get(var, value)
        if key is not None:
            seen[key] = list(eqn.outvars)
    return [read(v) for v in (jaxpr.outvars if want is None else want)]


def _run(eqn, invals, inline, fold):
    if inline and eqn.primitive is jit_p:
        inner: ClosedJaxpr = eqn.params["jaxpr"]
        return evaluate(inner.jaxpr, inner.consts, invals, inline=True, fold=fold)
    residue = _unit_residue(eqn, invals) if fold else None
    return [residue] if residue is not None else bind_eqn(eqn, invals)


def _unit_residue(eqn, invals):
    """`x` itself when `eqn` is `x * 1` or a same-dtype conversion whose result has x's shape."""
    (out,) = eqn.outvars if len(eqn.outvars) == 1 else (None,)
    if out is None:
        return None
    if eqn.primitive is lax.convert_element_type_p:
        (x,) = invals
        if np.dtype(x.dtype) == np.dtype(eqn.params["new_dtype"]) and not getattr(out.aval, "weak_type", False):
            return x
        return None
    if eqn.primitive is lax.mul_p:
        for i, atom in enumerate(eqn.invars):
            other = invals[1 - i]
            if (
                isinstance(atom, Literal)
                and np.ndim(atom.val) == 0
                and atom.val == 1
                and tuple(other.shape) == tuple(out.aval.shape)
                and other.dtype == out.aval.dtype
            ):
                return other
    return None


def _cse_key(eqn, canon: Mapping[Var, Var]):
    """A hashable identity of what `eqn` computes, or None when it must not be merged."""
    if eqn.effects or eqn.primitive is jit_p:
        return None
    operands = []
    for atom in eqn.invars:
        if isinstance(atom, Literal):
            operands.append(("literal", _hashable(np.asarray(atom.val)), str(atom.aval)))
        else:
            operands.append(canon.get(atom, atom))
    try:
        key = (eqn.primitive, tuple(sorted((k, _hashable(v)) for k, v in eqn.params.items())), tuple(operands))
        hash(key)
    except TypeError:
        return None
    return key


def _hashable(value):
    if isinstance(value, np.ndarray):
        return ("ndarray", value.shape, str(value.dtype), value.tobytes())
    return value


def retrace(closed: ClosedJaxpr, *, inline: bool, fold: bool) -> ClosedJaxpr:
    """A fresh ClosedJaxpr of `closed` evaluated with the given switches."""
    import jax

    avals = [jax.ShapeDtypeStruct(aval_shape(v), aval_dtype(v)) for v in closed.jaxpr.invars]

    def run(*args):
        return evaluate(closed.jaxpr, closed.consts, args, inline=inline, fold=fold)

    return jax.make_jaxpr(run)(*avals)
