"""Higher-order primitives: each rule recurses into its sub-jaxprs, so what flows through them is as
precise as their bodies.

* `jit` and custom-derivative calls: the facts of their body.
* `cond`: the join over its branches (a source aligned in every branch that reads it stays aligned).
  The integer index carries no derivative; the engine (`propagate`) records what it depends on.
* `scan`: facts propagated through the body to a fixed point over the carry (joined with the initial
  carry's facts); a slice of `xs` is one element of `xs` per element in another layout (not aligned);
  the stacked `ys` keep the body's dependencies (a new leading axis, as a broadcast).
* `while`: likewise over `body_jaxpr`; the predicate decides only how many times the body runs, so
  its sources give the outputs a dependency without derivative (never affine), never a mixing one.

The rules recurse with the engine `register_control_rules` is given (`propagate.propagate_closed`, which
registers them when it is imported), so this module imports nothing of the engine.

A contraction inside a sub-jaxpr is not seen by `propagate`'s `on_contract` hook, so it cannot become a
weight relation: `passes/simplify.py` if-converts conds and unrolls short scans to lift them to the top
level (see `fusetrace.interpret`), and `describe_construct` names what remains for diagnostics.
"""

import functools
from collections.abc import Callable, Sequence

from jax import lax

from .._compat import (
    ClosedJaxpr,
    Jaxpr,
    JaxprEqn,
    custom_jvp_call_p,
    custom_vjp_call_p,
    jit_p,
    new_closed_jaxpr,
    source_line,
)
from ..errors import UnsupportedPrimitiveError, four_part
from .base import Fact, Operand, Rule, join, lookup, mixed, register, with_control

UNROLL_MAX_LENGTH = 32
"""Scans (`brainstate.transform.for_loop`, `lax.scan`, static `fori_loop`) of at most this many iterations
are unrolled before analysis (`fusetrace.interpret`): sub-steps of a neuron, or a weight applied inside the
loop body, then become straight-line code (a weight inside the body gives one contraction per iteration,
or one after CSE when its operands do not change). Longer scans stay whole: the analysis propagates facts
through their body to a fixed point, and a contraction inside them cannot become a weight relation."""

Engine = Callable[[ClosedJaxpr, Sequence[Fact]], list[Fact]]
"""Facts of a closed sub-jaxpr's outputs from its inputs' facts (`propagate.propagate_closed`)."""


def sub_jaxpr(eqn):
    """The ClosedJaxpr a call-like equation evaluates, or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    return None


def sub_jaxprs(eqn) -> tuple[ClosedJaxpr, ...]:
    """Every ClosedJaxpr among `eqn`'s parameters (cond branches, a loop's body and predicate, a call's
    body), in parameter order."""
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, ClosedJaxpr):
                found.append(item)
            elif isinstance(item, Jaxpr):
                found.append(new_closed_jaxpr(item, []))
    return tuple(found)


def count_equations(jaxpr: Jaxpr) -> int:
    """The equations of `jaxpr`, those of every nested sub-jaxpr (a loop body, a cond branch, a call)
    counted too: the size of a program as XLA receives it."""
    return sum(1 + sum(count_equations(inner.jaxpr) for inner in sub_jaxprs(eqn)) for eqn in jaxpr.eqns)


def holds_contraction(jaxpr: Jaxpr) -> bool:
    """Whether `jaxpr` (or a sub-jaxpr of one of its equations) has a contracting equation."""
    for eqn in jaxpr.eqns:
        rule = lookup(eqn.primitive)
        if rule is not None and rule.family == "contracting":
            return True
        if any(holds_contraction(inner.jaxpr) for inner in sub_jaxprs(eqn)):
            return True
    return False


def scan_parts(eqn, values: Sequence) -> tuple[list, list, list]:
    """`values` (one per operand of a `scan` equation) split into (consts, initial carry, xs)."""
    consts, carry, xs = eqn.params["ft_in"].update(list(values)).unpack()
    return list(consts), list(carry), list(xs)


_CONSTRUCTS = {
    lax.scan_p: lambda eqn: f"`scan` loop (for_loop) of length {eqn.params['length']}",
    lax.while_p: lambda eqn: "`while_loop`",
    lax.cond_p: lambda eqn: f"`cond` with {len(eqn.params['branches'])} branches",
}


def construct_name(eqn: JaxprEqn) -> str:
    """The control-flow construct of `eqn` in user terms: "`while_loop`", "`scan` loop (for_loop) of
    length 40", "`cond` with 2 branches", else "`<primitive>` call"."""
    name = _CONSTRUCTS.get(eqn.primitive)
    return name(eqn) if name is not None else f"`{eqn.primitive.name}` call"


def describe_construct(eqn: JaxprEqn) -> str:
    """`construct_name` with the source line, for diagnostics: "the `while_loop` at file:line (fn)"."""
    return f"the {construct_name(eqn)} at {source_line(eqn)}"


def _why_kept(eqn: JaxprEqn) -> str:
    if eqn.primitive is lax.while_p:
        return "a while loop runs a data-dependent number of iterations, so it cannot be unrolled"
    if eqn.effects:
        return f"its body has side effects ({', '.join(sorted(map(str, eqn.effects)))}), so it is kept whole"
    if eqn.primitive is lax.scan_p:
        return f"scans longer than {UNROLL_MAX_LENGTH} iterations are not unrolled"
    return "it is kept whole"


def check_weight_inside(eqn: JaxprEqn, operands: Sequence[Operand], describe) -> None:
    """Raise when a weight enters a `cond`/`scan`/`while` left whole by simplification whose body holds
    a contraction: the weight's product there cannot become a relation, and its gradient would be wrong
    without a word (its other uses may be traced)."""
    if eqn.primitive not in _CONSTRUCTS:
        return
    weights = sorted({source for op in operands for source in op.fact if source[0] == "weight"})
    if not weights or not any(holds_contraction(inner.jaxpr) for inner in sub_jaxprs(eqn)):
        return
    raise UnsupportedPrimitiveError(
        four_part(
            what=f"the weight {', '.join(describe(s) for s in weights)} is used inside a {construct_name(eqn)} "
            "whose body holds a contraction",
            where=describe_construct(eqn),
            why=f"{_why_kept(eqn)}; a weight product inside it is not a weight relation fusetrace can derive a "
            "trace for, and treating it as opaque would give that weight a wrong gradient",
            fix="apply the weight outside the loop or branch (compute the product before it and pass the result "
            "in), use a scan of static length within the unroll bound, or keep the weight out of training",
        )
    )


def _recurse(engine: Engine, eqn, operands: list[Operand]):
    inner = sub_jaxpr(eqn)
    assert inner is not None, f"{eqn.primitive} has no sub-jaxpr"
    n_in = len(inner.jaxpr.invars)
    return engine(inner, [op.fact for op in operands[len(operands) - n_in :]])


def _cond_rule(engine: Engine, eqn, operands: list[Operand]):
    in_facts = [op.fact for op in operands[1:]]
    per_branch = [engine(branch, in_facts) for branch in eqn.params["branches"]]
    return [join(*facts) for facts in zip(*per_branch, strict=True)]


def _fixed_point(
    engine: Engine, body: ClosedJaxpr, before: Sequence[Fact], carry: Sequence[Fact], after: Sequence[Fact]
) -> tuple[Sequence[Fact], Sequence[Fact]]:
    """(carry facts, other outputs' facts) of `body(*before, *carry, *after)` iterated to a fixed point
    over the carry; the facts only ever weaken, so this terminates."""
    while True:
        outs = engine(body, [*before, *carry, *after])
        joined: list[Fact] = [join(old, new) for old, new in zip(carry, outs[: len(carry)], strict=True)]
        if joined == list(carry):
            return carry, outs[len(carry) :]
        carry = joined


def _scan_rule(engine: Engine, eqn, operands: list[Operand]):
    consts, carry, xs = scan_parts(eqn, operands)
    sliced = [mixed([op], linear=True) for op in xs]
    carry_facts, ys_facts = _fixed_point(
        engine, eqn.params["jaxpr"], [op.fact for op in consts], [op.fact for op in carry], sliced
    )
    return [*carry_facts, *ys_facts]


def _while_rule(engine: Engine, eqn, operands: list[Operand]):
    n_cond, n_body = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    facts = [op.fact for op in operands]
    cond_consts, body_consts, carry = facts[:n_cond], facts[n_cond : n_cond + n_body], facts[n_cond + n_body :]
    carry, _ = _fixed_point(engine, eqn.params["body_jaxpr"], body_consts, carry, [])
    (predicate,) = engine(eqn.params["cond_jaxpr"], [*cond_consts, *carry])
    return [with_control(fact, predicate) for fact in carry]


def register_control_rules(engine: Engine) -> None:
    """Register the rules of `jit`, the custom-derivative calls, `cond`, `scan` and `while`, recursing with
    `engine`."""
    for primitive, rule in (
        (jit_p, _recurse),
        (custom_jvp_call_p, _recurse),
        (custom_vjp_call_p, _recurse),
        (lax.cond_p, _cond_rule),
        (lax.scan_p, _scan_rule),
        (lax.while_p, _while_rule),
    ):
        register(primitive, Rule("control", functools.partial(rule, engine)))
