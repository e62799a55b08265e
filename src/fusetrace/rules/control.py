"""Higher-order primitives. `jit` and custom-derivative calls recurse into their sub-jaxpr, so what
flows through them is as precise as their body. `cond`, `scan` and `while` are accepted but treated as
mixing every operand into every output (conservative: a weight reached through them is reported as
excluded with its reason, never silently mis-traced)."""

from jax import lax

from .._compat import custom_jvp_call_p, custom_vjp_call_p, jit_p
from .base import Operand, Rule, mixed, register


def sub_jaxpr(eqn):
    """The ClosedJaxpr a call-like equation evaluates, or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    return None


def _recurse(eqn, operands: list[Operand]):
    from ..propagate import propagate_closed  # the engine; imported late to keep rules leaf modules

    inner = sub_jaxpr(eqn)
    assert inner is not None, f"{eqn.primitive} has no sub-jaxpr"
    n_in = len(inner.jaxpr.invars)
    return propagate_closed(inner, [op.fact for op in operands[len(operands) - n_in :]])


def _conservative(eqn, operands: list[Operand]):
    return [mixed(operands) for _ in eqn.outvars]


register(jit_p, Rule("control", _recurse))
register(custom_jvp_call_p, Rule("control", _recurse))
register(custom_vjp_call_p, Rule("control", _recurse))
for _primitive in (lax.cond_p, lax.scan_p, lax.while_p):
    register(_primitive, Rule("control", _conservative))
