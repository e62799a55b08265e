"""The primitive registry: one frozen `Rule` per primitive, looked up by the primitive object.

A rule says how facts (which sources a value depends on, and how) flow through one equation:

* a *source* is something the analysis tracks: a hidden state's previous value, a hidden state's new
  value (the cut at hidden outputs), a weight leaf, or the output of a weight relation;
* a `Dep` says how a value depends on one source: `aligned` (element `i` of the value depends only on
  element `i` of the source: same shape, element-wise path) and `affine` (the value is `a·source + c`
  with a coefficient `a` that depends on no tracked source: the mark of a linear time-invariant update).

Families register in one line (`register_elementwise(lax.add_p, ...)`). A decorator that registers a
special rule returns the function unchanged. Registering a primitive twice is an error.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from typing import Literal as TypingLiteral

from .._compat import Primitive

Source = tuple[str, int]
"""('hidden', leaf), ('new', leaf), ('weight', leaf), ('input', index) or ('relation', index)."""


@dataclasses.dataclass(frozen=True)
class Dep:
    """How a value depends on one source.

    aligned: element `i` of the value depends only on element `i` of the source (same layout).
    affine: the value is `a * source + c` with `a` free of tracked sources.
    perm: set when the value is the source's elements in transposed layout (value axis `k` is
      source axis `perm[k]`): still one element per element, but not `aligned`.
    """

    aligned: bool
    affine: bool
    perm: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.aligned and self.perm is not None:
            raise ValueError("an aligned dependency has the identity layout; perm must be None")

    @property
    def one_to_one(self) -> bool:
        """Each element of the value depends on exactly one element of the source (any layout)."""
        return self.aligned or self.perm is not None

    def __and__(self, other: "Dep") -> "Dep":
        affine = self.affine and other.affine
        if self.aligned and other.aligned:
            return Dep(True, affine)
        return Dep(False, affine, self.perm if self.perm == other.perm else None)

    def weaken(self, same_shape: bool, linear: bool) -> "Dep":
        """This dependency seen through an element-wise op."""
        return Dep(self.aligned and same_shape, self.affine and linear, self.perm if same_shape else None)


ALIGNED_AFFINE = Dep(True, True)
MIXED = Dep(False, False)

Fact = Mapping[Source, Dep]
"""What one value depends on. An empty fact: the value depends on no tracked source."""

CONTROL = Dep(True, False)
"""A dependency without derivative (through a boolean or integer value): see `fusetrace.propagate`."""


def join(*facts: Fact) -> dict[Source, Dep]:
    """What a value that may be any of `facts` depends on: every source of any of them; a dependency is
    aligned / affine / permuted only if it is so in every fact that carries the source."""
    out: dict[Source, Dep] = {}
    for fact in facts:
        for source, dep in fact.items():
            out[source] = out[source] & dep if source in out else dep
    return out


def with_control(fact: Fact, control: Fact) -> Fact:
    """`fact` of a value whose computation is also steered by values that depend on `control`'s sources
    without derivative (see `fusetrace.propagate`)."""
    if not control:
        return fact
    out = {source: Dep(dep.aligned, False, dep.perm) for source, dep in fact.items()}
    for source in control:
        out.setdefault(source, CONTROL)
    return out


Family = TypingLiteral["elementwise", "structural", "contracting", "control", "opaque"]


@dataclasses.dataclass(frozen=True)
class Operand:
    """What a rule sees of one equation input: its fact and its shape."""

    fact: Fact
    shape: tuple[int, ...]


PropagateFn = Callable[[Any, list[Operand]], Sequence[Fact]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Everything fusetrace knows about one primitive.

    family: the rule family, shown in the graph and in error messages.
    propagate: `(eqn, operands) -> one fact per output`.
    linear: the primitive is linear in each operand when the others carry no source (affine survives).
    weight_operands: for contracting primitives, the operand positions that may hold a weight; the
      remaining differentiable operand is the presynaptic input.
    per_synapse: for contracting primitives, each weight element reaches at most one output element
      (true of event/sparse products; for `dot_general` it depends on the dimension numbers and is
      checked where used).
    spike: the output is piecewise constant (a spike) and its derivative a surrogate: the credit chains
      weigh a group's neurons by that derivative (`derive.spike_relevance`).
    """

    family: Family
    propagate: PropagateFn
    linear: bool = False
    weight_operands: tuple[int, ...] = ()
    per_synapse: bool = False
    spike: bool = False

    def __post_init__(self):
        if self.family == "contracting" and not self.weight_operands:
            raise ValueError("a contracting rule must name the operands that may hold a weight")


RULES: dict[Primitive, Rule] = {}


def register(primitive: Primitive, rule: Rule) -> None:
    if primitive in RULES:
        raise ValueError(f"primitive {primitive} is registered twice")
    RULES[primitive] = rule


def lookup(primitive: Primitive) -> Rule | None:
    return RULES.get(primitive)


def broadcasts_over_leading_axes(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """`shape` equals `out_shape` except for leading size-1 axes that the op broadcasts (a per-neuron
    value of shape (1, N) meeting a batch (B, N)): like `broadcast_in_dim` over new leading axes, each
    output element still reads the source element at its own trailing position."""
    shape, out_shape = tuple(shape), tuple(out_shape)
    if len(shape) != len(out_shape):
        return False
    k = 0
    while k < len(shape) and shape[k] == 1 and out_shape[k] != 1:
        k += 1
    return shape[k:] == out_shape[k:]


def merge(operands: Sequence[Operand], out_shape: tuple[int, ...], linear: bool) -> dict[Source, Dep]:
    """Element-wise merge: a source stays aligned only if every operand carrying it has the output's
    shape (up to broadcast leading axes), and affine only if the primitive is `linear` (in the sense of
    `Rule.linear`)."""
    out: dict[Source, Dep] = {}
    for op in operands:
        same_shape = broadcasts_over_leading_axes(op.shape, out_shape)
        for source, dep in op.fact.items():
            dep = dep.weaken(same_shape, linear)
            out[source] = out[source] & dep if source in out else dep
    return out


def mixed(operands: Sequence[Operand], linear: bool = False) -> dict[Source, Dep]:
    """Every source of every operand, no longer aligned (the op mixes elements)."""
    out: dict[Source, Dep] = {}
    for op in operands:
        for source, dep in op.fact.items():
            dep = Dep(False, dep.affine and linear)
            out[source] = out[source] & dep if source in out else dep
    return out
