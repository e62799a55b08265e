"""The fused program by part: where a learner's step spends its equations, arithmetic and memory.

Consumes: a closed jaxpr of a fused step (`Learner.fused_jaxpr`), whose equations carry the named scopes
`passes.fuse.SCOPES` on their name stacks. Produces a `ProgramSummary` (`summarize_program`, which
`Learner.program_summary()` calls): for each part of the step (the outermost scope on an equation's name
stack; "other" for equations outside every scope) its equations, nested sub-jaxprs counted as
`rules.control.count_equations` counts them, and estimates of its floating-point operations and bytes per
step.

The estimates are read from the jaxpr, before XLA optimises it:
* FLOPs: `2·|out|·k` for a `dot_general` (k: the contracted size) and a convolution (k: the kernel's size
  per output feature); one per output element for element-wise arithmetic; one per input element for a
  reduction; for a primitive this module does not know (brainevent's event and sparse kernels), two per
  element of its largest operand (a sparse product reads each stored weight once: multiply and add);
  none for data movement (reshape, slice, gather, concatenate, broadcast, select, convert). A `scan`
  body counts once per iteration, a `cond` its costliest branch, a `while` body once (its trip count is
  not known before it runs).
* bytes: what each equation writes (its outputs' sizes). XLA fuses element-wise chains and keeps much of
  that in registers, so this is an upper bound on the step's memory traffic, useful for comparing parts.

Sharp edges: an equation that a derivative emits but nobody reads (the primal copy beside a JVP's tangent)
is counted here; `jax.jit` drops it before lowering.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from ._compat import ClosedJaxpr, Jaxpr, JaxprEqn, aval_shape
from .passes.fuse import SCOPES
from .rules.control import sub_jaxprs

LABELS = {
    "forward": "forward dynamics",
    "learning_signal": "learning signal",
    "derivatives": "D and F derivatives",
    "traces": "trace updates",
    "credit_chains": "credit traces",
    "same_step": "same-step gradients",
    "weight_products": "gradient contraction",
    "other": "other: checks, sums",
}
PARTS = (*SCOPES, "other")

_SCOPE = re.compile(rf"(?:^|/)({'|'.join(SCOPES)})(?:/|$)")
# data movement: no arithmetic (an equation with sub-jaxprs — jit, scan, cond, while, custom calls — is
# costed by its bodies)
_MOVEMENT = {
    "reshape", "broadcast_in_dim", "squeeze", "expand_dims", "transpose", "slice", "dynamic_slice",
    "dynamic_update_slice", "gather", "scatter", "concatenate", "pad", "select_n", "convert_element_type",
    "copy", "copy_p", "rev", "iota", "split", "stop_gradient", "device_put", "optimization_barrier",
    "bitcast_convert_type",
}  # fmt: skip
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "cumsum", "cumprod",
               "cummax", "cummin", "reduce_and", "reduce_or"}  # fmt: skip
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "sqrt", "rsqrt", "pow", "integer_pow", "square", "sin", "cos", "erf", "erf_inv", "floor", "ceil",
    "round", "rem", "gt", "ge", "lt", "le", "eq", "ne", "and", "or", "not", "xor", "is_finite", "clamp", "atan2",
    "nextafter", "add_any", "select_and_scatter_add", "cbrt", "tan", "asin", "acos", "atan", "sinh", "cosh",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the fused step: its name (a `passes.fuse.SCOPES` entry or "other"), what it is, and its
    equations, estimated FLOPs and bytes written per step."""

    name: str
    label: str
    equations: int
    flops: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class ProgramSummary:
    """The fused step by part (`parts`, in the order the step runs them; empty parts left out)."""

    parts: tuple[Part, ...]

    @property
    def equations(self) -> int:
        return sum(p.equations for p in self.parts)

    @property
    def flops(self) -> int:
        return sum(p.flops for p in self.parts)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    def as_dict(self) -> dict:
        return {p.name: {"equations": p.equations, "flops": p.flops, "bytes": p.bytes} for p in self.parts}

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """The table (header, rows; a total last) for `fusetrace.display`'s HTML and markdown tables."""
        header = ["part", "equations", "FLOPs/step", "bytes/step"]
        rows = [[p.label, f"{p.equations:,d}", _si(p.flops), _si(p.bytes, "B")] for p in self.parts]
        return header, [*rows, ["total", f"{self.equations:,d}", _si(self.flops), _si(self.bytes, "B")]]

    def __str__(self) -> str:
        header = f"  {'part':<24s} {'equations':>10s} {'FLOPs/step':>12s} {'bytes/step':>12s}"
        lines = ["fused program by part (estimated from the jaxpr, before XLA fuses it):", header]
        for p in (*self.parts, Part("total", "", self.equations, self.flops, self.bytes)):
            label = p.label if p.name != "total" else "total"
            lines.append(f"  {label[:24]:<24s} {p.equations:>10,d} {_si(p.flops):>12s} {_si(p.bytes, 'B'):>12s}")
        return "\n".join(lines) + "\n"


def summarize_program(closed: ClosedJaxpr) -> ProgramSummary:
    """The `ProgramSummary` of a fused step's closed jaxpr."""
    totals = {part: [0, 0, 0] for part in PARTS}

    def visit(jaxpr: Jaxpr, part: str | None, times: int) -> None:
        for eqn in jaxpr.eqns:
            found = _SCOPE.search(str(eqn.source_info.name_stack))
            own = part or (found.group(1) if found else "other")
            inner = sub_jaxprs(eqn)
            totals[own][0] += 1
            totals[own][1] += 0 if inner else times * _flops(eqn)
            totals[own][2] += times * sum(_nbytes(v.aval) for v in eqn.outvars)
            name = eqn.primitive.name
            if name == "cond" and len(inner) > 1:  # counted: every branch's equations; costed: the costliest
                costs = [summarize_program(branch) for branch in inner]
                heaviest = max(costs, key=lambda s: s.flops)
                totals[own][0] += sum(c.equations for c in costs)
                totals[own][1] += times * heaviest.flops
                totals[own][2] += times * heaviest.bytes
                continue
            repeat = eqn.params.get("length", 1) if name == "scan" else 1
            for sub in inner:
                visit(sub.jaxpr, own, times * repeat)

    visit(closed.jaxpr, None, 1)
    return ProgramSummary(tuple(Part(p, LABELS[p], *totals[p]) for p in PARTS if totals[p][0]))


def _size(aval) -> int:
    return int(math.prod(getattr(aval, "shape", ())))


def _nbytes(aval) -> int:
    """Bytes of an abstract value; a random key (an extended dtype, `key<fry>`) counts its key data."""
    dtype = getattr(aval, "dtype", None)
    if dtype is None or dtype == np.dtype("O"):
        return 0
    if jnp.issubdtype(dtype, jax.dtypes.extended):
        return _size(aval) * int(getattr(dtype, "itemsize", 0) or 0)
    return _size(aval) * np.dtype(dtype).itemsize


def _flops(eqn: JaxprEqn) -> int:
    """The estimated FLOPs of one equation without sub-jaxprs (the module docstring says how)."""
    name = eqn.primitive.name
    out = sum(_size(v.aval) for v in eqn.outvars)
    if name == "dot_general":
        (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = aval_shape(eqn.invars[0])
        return 2 * out * math.prod(lhs[d] for d in lhs_contracting)
    if name == "conv_general_dilated":
        rhs = aval_shape(eqn.invars[1])
        out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
        return 2 * out * math.prod(rhs) // max(rhs[out_feature], 1)
    if name in _MOVEMENT:
        return 0
    if name in _REDUCTIONS:
        return sum(_size(v.aval) for v in eqn.invars if hasattr(v, "aval"))
    if name in _ELEMENTWISE:
        return out
    return 2 * max((_size(v.aval) for v in eqn.invars if hasattr(v, "aval")), default=0)


def _si(value: int, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value} {unit}".rstrip()
