"""The evaluator every rewrite re-traces: a jaxpr interpreter with three switches.

* `substitute`: values that replace vars once computed (the equation still runs; its result is
  dropped). The derivation cuts weight-relation outputs and hidden outputs with it.
* `transform`: functions `(value, invals) -> value` applied to a var once computed, from the
  equation's own inputs (e_prop's random feedback changes a relation's backward path with it).
* `inline`: evaluate `jit` equations by recursing into their body (so a re-trace inlines them), and
  turn control flow into straight-line code where that is an exact program transformation:
  - a `cond` whose branches have no effects and hold a contracting primitive is *if-converted*: every
    branch is evaluated and `select_n(index, *branch_outputs)` picks the result (the contraction, a
    potential weight relation, is then visible at the top level);
  - a `scan` of static length at most `UNROLL_MAX_LENGTH` and without effects is *unrolled*.
* `fold`: drop unit residue (`x * 1.0`, `convert_element_type` to the same dtype) and reuse the
  result of an identical earlier equation (common-subexpression elimination).

Local re-evaluation (`known`): the derivatives of a step re-evaluate it with a few values changed (a
group's previous states as JVP tracers, a relation's op output substituted). Given the values of the
plain evaluation (`environment`), `evaluate` runs only the equations on a path from a changed value to a
wanted one and reads every other operand from those values: a derivative of one group then costs that
group's part of the step, not the whole step (which made the fused program quadratic in the number of
groups). The equations to run are computed once per (jaxpr, wanted, changed, substituted, transformed)
vars and cached with the jaxpr.

Rewrites call `jax.make_jaxpr` on a function that calls `evaluate`; nothing here builds equations.
"""

import heapq
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from jax import lax

from ._compat import ClosedJaxpr, Jaxpr, Literal, Var, aval_dtype, aval_shape, bind_eqn, jit_p
from .rules.control import UNROLL_MAX_LENGTH, holds_contraction, scan_parts


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
    known: Mapping[Var, Any] | None = None,
) -> list[Any]:
    """Values of `want` (default: the jaxpr's outputs) given `consts` and `args`.

    `known`: every var's value at the same `consts` and the plain `args` (`environment`). Then only the
    equations between the changed values and `want` run (see the module docstring); an arg, const or
    substituted value counts as changed unless it IS (identity) the known value. The results are those
    of the full evaluation, in value and in derivative (what is read from `known` does not depend on any
    changed value). Unneeded equations with effects are not run again.
    """
    substitute = substitute or {}
    transform = transform or {}
    if known is not None:
        if inline or fold:
            raise ValueError("a local evaluation (`known`) neither inlines nor folds")
        return _evaluate_local(jaxpr, consts, args, want, substitute, transform, known)
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


def environment(
    jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], rewrites: Mapping[Any, Callable] | None = None
) -> dict[Var, Any]:
    """The value of every var of `jaxpr` (constvars, invars, every equation's outputs) given `consts` and
    `args`: the `known` values of a local `evaluate`. `rewrites` maps some equations to another way of
    computing the same values (`invals -> outvals`), such as `passes.event_product`."""
    rewrites = rewrites or {}
    env: dict[Var, Any] = {}
    for var, value in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [atom.val if isinstance(atom, Literal) else env[atom] for atom in eqn.invars]
        outvals = rewrites[eqn](invals) if eqn in rewrites else bind_eqn(eqn, invals)
        env.update(zip(eqn.outvars, outvals, strict=True))
    return env


def _evaluate_local(jaxpr, consts, args, want, substitute, transform, known) -> list[Any]:
    env: dict[Var, Any] = {}
    for var, value in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True):
        value = substitute.get(var, value)
        if value is not known[var]:
            env[var] = value
    for var, value in substitute.items():
        if value is not known[var]:
            env[var] = value
    wanted = jaxpr.outvars if want is None else want
    plan = _local_plan(jaxpr, tuple(v for v in wanted if isinstance(v, Var)), tuple(env), substitute, transform)

    def read(atom):
        if isinstance(atom, Literal):
            return atom.val
        return env[atom] if atom in env else known[atom]

    for eqn in plan:
        invals = [read(a) for a in eqn.invars]
        for var, value in zip(eqn.outvars, bind_eqn(eqn, invals), strict=True):
            if var in transform:
                value = transform[var](value, invals)
            env[var] = substitute.get(var, value)
    return [read(v) for v in wanted]


def uses_of(jaxpr: Jaxpr) -> dict[Var, list]:
    """Every var's readers: the equations that take it as an input, in order, and None once for each
    time it is an output of `jaxpr`."""
    uses: dict[Var, list] = {}
    for eqn in jaxpr.eqns:
        for atom in eqn.invars:
            if isinstance(atom, Var):
                uses.setdefault(atom, []).append(eqn)
    for atom in jaxpr.outvars:
        if isinstance(atom, Var):
            uses.setdefault(atom, []).append(None)
    return uses


_PRODUCERS: "weakref.WeakKeyDictionary[Jaxpr, dict]" = weakref.WeakKeyDictionary()


def producers(jaxpr: Jaxpr) -> dict[Var, Any]:
    """Every var's producing equation (computed once per jaxpr; do not modify the dict)."""
    found = _PRODUCERS.get(jaxpr)
    if found is None:
        found = _PRODUCERS[jaxpr] = {var: eqn for eqn in jaxpr.eqns for var in eqn.outvars}
    return found


class _Index:
    """Where each var of a jaxpr is produced and read (equation indices), built once per jaxpr."""

    def __init__(self, jaxpr: Jaxpr):
        self.producer: dict[Var, int] = {}
        self.readers: dict[Var, list[int]] = {}
        for index, eqn in enumerate(jaxpr.eqns):
            for atom in eqn.invars:
                if isinstance(atom, Var):
                    self.readers.setdefault(atom, []).append(index)
            for var in eqn.outvars:
                self.producer[var] = index
        self.plans: dict[tuple, tuple] = {}


_INDEX: "weakref.WeakKeyDictionary[Jaxpr, _Index]" = weakref.WeakKeyDictionary()


def _local_plan(jaxpr: Jaxpr, want: tuple, changed: tuple, cut: Mapping, transformed: Mapping) -> tuple:
    """The equations (in order) on a path from a `changed` var (or the equation of a `transformed` one) to
    a var of `want`, a path never passing through a `cut` (substituted) var unless it is changed itself.

    Cost: the equations reachable from the changed vars that come before the last wanted var (a jaxpr
    is in dependency order), not the whole jaxpr; cached per key."""
    index = _INDEX.get(jaxpr)
    if index is None:
        index = _INDEX[jaxpr] = _Index(jaxpr)
    key = (want, frozenset(changed), frozenset(cut), frozenset(transformed))
    if key in index.plans:
        return index.plans[key]
    last = max((index.producer.get(v, -1) for v in want), default=-1)
    live, reached = set(changed), []
    seen = {i for v in changed for i in index.readers.get(v, ()) if i <= last}
    seen.update(index.producer[v] for v in transformed if index.producer.get(v, last + 1) <= last)
    frontier = sorted(seen)  # a sorted list is a heap
    while frontier:  # the forward cone of the changed vars, in equation order
        i = heapq.heappop(frontier)
        reached.append(i)
        for var in jaxpr.eqns[i].outvars:
            if var in cut or var in live:
                continue
            live.add(var)
            for j in index.readers.get(var, ()):
                if j <= last and j not in seen:
                    seen.add(j)
                    heapq.heappush(frontier, j)
    needed, run = set(want), []
    for i in reversed(reached):  # ... that the wanted vars need
        eqn = jaxpr.eqns[i]
        if any(v in needed and v in live and v not in cut for v in eqn.outvars):
            run.append(eqn)
            needed.update(a for a in eqn.invars if isinstance(a, Var))
    index.plans[key] = tuple(reversed(run))
    return index.plans[key]


def _run(eqn, invals, inline, fold):
    rewrite = _INLINE.get(eqn.primitive) if inline else None
    outvals = rewrite(eqn, invals, fold) if rewrite is not None else None
    if outvals is not None:
        return outvals
    residue = _unit_residue(eqn, invals) if fold else None
    return [residue] if residue is not None else bind_eqn(eqn, invals)


def _inline_jit(eqn, invals, fold):
    inner: ClosedJaxpr = eqn.params["jaxpr"]
    return evaluate(inner.jaxpr, inner.consts, invals, inline=True, fold=fold)


def _if_convert(eqn, invals, fold):
    """The outputs of an effect-free `cond` holding a contraction, as `select_n` over every branch's
    outputs; None (bind it unchanged) otherwise.

    Exact in value and in forward-mode derivative (`select_n`'s tangent is the chosen branch's tangent,
    as for `cond`). Sharp edge: reverse mode sends a zero cotangent through the branches not taken, which
    gives NaN where such a branch has an infinite local derivative at the current point (the `where`
    gradient pitfall); conds without a contraction are therefore left whole.
    """
    branches = eqn.params["branches"]
    if eqn.effects or not any(holds_contraction(branch.jaxpr) for branch in branches):
        return None
    index, *operands = invals
    outs = [evaluate(b.jaxpr, b.consts, operands, inline=True, fold=fold) for b in branches]
    if len(branches) == 1:
        return outs[0]
    # out-of-range indices run the last branch, as XLA's conditional does (lax.switch clamps before)
    last = len(branches) - 1
    which = (
        lax.ne(index, np.int32(0))
        if last == 1
        else lax.select(
            lax.bitwise_or(lax.lt(index, np.int32(0)), lax.gt(index, np.int32(last))), lax.full_like(index, last), index
        )
    )
    return [
        # an output every branch passes through unchanged needs no select (and keeps its facts exact)
        values[0] if all(v is values[0] for v in values) else lax.select_n(which, *values)
        for values in zip(*outs, strict=True)
    ]


def _unroll(eqn, invals, fold):
    """The outputs of an effect-free `scan` of static length `1..UNROLL_MAX_LENGTH`, computed by
    evaluating its body once per iteration; None (bind it unchanged) otherwise."""
    length, body = eqn.params["length"], eqn.params["jaxpr"]
    if eqn.effects or not 0 < length <= UNROLL_MAX_LENGTH:
        return None
    consts, carry, xs = scan_parts(eqn, invals)
    order = range(length - 1, -1, -1) if eqn.params["reverse"] else range(length)
    ys_by_step = {}
    for step in order:
        x = [lax.index_in_dim(value, step, keepdims=False) for value in xs]
        outs = evaluate(body.jaxpr, body.consts, [*consts, *carry, *x], inline=True, fold=fold)
        carry, ys_by_step[step] = outs[: len(carry)], outs[len(carry) :]
    # stacked with registered structural primitives (`jnp.stack` emits a `stack` primitive)
    stacked = [
        lax.concatenate([lax.expand_dims(y, (0,)) for y in values], 0)
        for values in zip(*(ys_by_step[k] for k in range(length)), strict=True)
    ]
    return [*carry, *stacked]


_INLINE = {jit_p: _inline_jit, lax.cond_p: _if_convert, lax.scan_p: _unroll}


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
