"""Forward propagation of facts (which tracked sources a value depends on, and how) over a jaxpr,
one registered rule per primitive, in jaxpr order.

Two hooks make this the engine of the analysis passes:

* `cut`: vars whose fact is replaced, once computed, by a fresh source (a hidden state's new value is
  cut so that what is read downstream of it is attributed to it, not to what produced it);
* `on_contract`: called on each contracting equation; it may return the fact of the output (a new
  relation source), which cuts the path through the weight.

An equation whose primitive has no rule is fine when none of its operands carries a source; otherwise
`UnsupportedPrimitiveError` names the primitive, the source line, and the state paths involved.

Values that are not floating point (booleans, integers: comparisons, predicates, indices) carry no
derivative. An equation's rule sees such operands with an empty fact; their sources are added to every
output of the equation as *control* dependencies — `Dep(aligned=True, affine=False)`: a dependency
without derivative constrains no layout (a predicate `any(v > 1.2)` that reads every neuron must not make
a select or a loop "mix neurons"), but a coefficient chosen by a tracked value is never source-free, so
every dependency of those outputs loses `affine`.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp

from ._compat import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Var, aval_dtype, aval_shape, source_line
from .errors import UnsupportedPrimitiveError, four_part
from .rules import ALIGNED_AFFINE, Fact, Operand, Source, lookup
from .rules.base import join, with_control
from .rules.control import check_weight_inside, register_control_rules

OnContract = Callable[[int, JaxprEqn, list[Operand]], Fact | None]


@dataclasses.dataclass
class Propagation:
    """Facts of every var of one jaxpr, plus the facts cut vars had before their cut.

    inside: for each source, the indices (in jaxpr order) of the control-flow equations (`cond`,
      `scan`, `while`, custom-derivative calls) whose operands depend on it. A contraction inside such
      an equation is not seen by `on_contract`; `rules.control.describe_construct` names the construct.
    """

    facts: dict[Var, Fact]
    before_cut: dict[Var, Fact]
    inside: dict[Source, list[int]] = dataclasses.field(default_factory=dict)

    def of(self, atom) -> Fact:
        return {} if isinstance(atom, Literal) else self.facts.get(atom, {})


def _describe_default(source: Source) -> str:
    return f"{source[0]} #{source[1]}"


def propagate(
    jaxpr: Jaxpr,
    in_facts: Sequence[Fact],
    *,
    cut: Mapping[Var, Source] | None = None,
    on_contract: OnContract | None = None,
    describe: Callable[[Source], str] = _describe_default,
) -> Propagation:
    cut = cut or {}
    result = Propagation(facts={}, before_cut={})
    for var, fact in zip(jaxpr.invars, in_facts, strict=True):
        result.facts[var] = dict(fact)
    for index, eqn in enumerate(jaxpr.eqns):
        operands = [Operand(result.of(a), aval_shape(a)) for a in eqn.invars]
        _record_control(result, index, eqn, operands)
        out_facts = _apply(index, eqn, operands, on_contract, describe)
        for var, fact in zip(eqn.outvars, out_facts, strict=True):
            if var in cut:
                result.before_cut[var] = fact
                fact = {cut[var]: ALIGNED_AFFINE}
            result.facts[var] = fact
    return result


def _record_control(result: Propagation, index: int, eqn: JaxprEqn, operands: list[Operand]) -> None:
    rule = lookup(eqn.primitive)
    if rule is None or rule.family != "control":
        return
    for source in dict.fromkeys(s for op in operands for s in op.fact):
        result.inside.setdefault(source, []).append(index)


def _differentiable(atom) -> bool:
    return jnp.issubdtype(aval_dtype(atom), jnp.inexact)


def _apply(index, eqn, operands, on_contract, describe) -> Sequence[Fact]:
    control = join(*(op.fact for op, atom in zip(operands, eqn.invars, strict=True) if not _differentiable(atom)))
    if control:
        operands = [
            op if _differentiable(atom) else Operand({}, op.shape)
            for op, atom in zip(operands, eqn.invars, strict=True)
        ]
    return [with_control(fact, control) for fact in _apply_rule(index, eqn, operands, on_contract, describe, control)]


def _apply_rule(index, eqn, operands, on_contract, describe, control) -> Sequence[Fact]:
    rule = lookup(eqn.primitive)
    if rule is None:
        touched = sorted(
            {s for op in operands for s in op.fact if s[0] != "input"} | {s for s in control if s[0] != "input"}
        )
        if touched:
            raise UnsupportedPrimitiveError(
                four_part(
                    what=f"cannot analyse how {', '.join(describe(s) for s in touched)} flows through "
                    f"the primitive `{eqn.primitive.name}`",
                    where=f"`{eqn.primitive.name}` emitted at {source_line(eqn)}",
                    why="fusetrace has no rule for this primitive, and it lies on a path from a hidden state "
                    "or a weight, so ignoring it could change gradients silently",
                    fix="rewrite that part of the model with standard jax.numpy / lax operations, or register "
                    "a rule with fusetrace.rules.register(primitive, Rule(...))",
                )
            )
        return [{} for _ in eqn.outvars]
    if rule.family == "control" and on_contract is not None:  # the analysis that finds weight relations
        check_weight_inside(eqn, operands, describe)
    if rule.family == "contracting" and on_contract is not None:
        fact = on_contract(index, eqn, operands)
        if fact is not None:
            return [fact for _ in eqn.outvars]
    return rule.propagate(eqn, operands)


def propagate_closed(closed: ClosedJaxpr, in_facts: Sequence[Fact]) -> list[Fact]:
    """Facts of the outputs of a closed sub-jaxpr (used by recursing control rules)."""
    result = propagate(closed.jaxpr, in_facts)
    return [result.of(v) for v in closed.jaxpr.outvars]


register_control_rules(propagate_closed)  # the control rules recurse into sub-jaxprs with this engine
