"""Facts of one captured step: the shared input of the `hidden` and `relations` passes.

Seeds every hidden leaf's input with its own source ('hidden', leaf) and every weight leaf's input
with ('weight', leaf); cuts every written hidden leaf at its new value (source ('new', leaf)); and
turns each contracting equation that multiplies a weight operand computed from weights alone — a
weight itself, or any state-free transform of one or several (a view, `abs(w) * sign`, a mask, a
normalisation, `u @ v`) — with one other operand (the presynaptic input, which may itself read other
weights) into a relation candidate whose output is the fresh source ('relation', index). A contraction
of weights with weights only (the `u @ v` of a low-rank weight) is part of a weight's transform, not a
relation.
"""

import dataclasses

import jax.numpy as jnp

from ._compat import JaxprEqn, Literal, Var
from .capture import Captured
from .propagate import Propagation, propagate
from .rules import ALIGNED_AFFINE, Fact, Operand, Source, lookup


@dataclasses.dataclass(frozen=True)
class Contraction:
    """One weight used by one contracting equation (a relation candidate)."""

    index: int  # position in StepFacts.contractions (the source id of its output)
    eqn_index: int
    eqn: JaxprEqn
    weight_leaf: int  # the weight the relation is filed under (the first of `weight_leaves`)
    weight_operand: int
    pre_operand: int  # the operand carrying the presynaptic input
    pre_fact: Fact
    weight_leaves: tuple[int, ...] = ()  # every weight the operand is computed from, in leaf order
    transformed: bool = False  # the operand is not the weight leaf itself (its effective weight is traced)

    def __post_init__(self):
        if not self.weight_leaves:
            object.__setattr__(self, "weight_leaves", (self.weight_leaf,))
        if self.weight_leaf != self.weight_leaves[0]:
            raise ValueError("a contraction is filed under the first of its weights")
        if len(self.weight_leaves) > 1 and not self.transformed:
            raise ValueError("an operand computed from several weights is a transform of them")

    @property
    def out_var(self) -> Var:
        return self.eqn.outvars[0]

    @property
    def pre_var(self):
        return self.eqn.invars[self.pre_operand]

    @property
    def weight_var(self):
        """The op's weight operand: the weight leaf's own input var, or the transform's output."""
        return self.eqn.invars[self.weight_operand]


@dataclasses.dataclass(frozen=True)
class StepFacts:
    captured: Captured
    propagation: Propagation
    contractions: tuple[Contraction, ...]
    new_vars: dict[int, Var]  # hidden leaf -> the var holding its new value (written leaves only)

    def describe(self, source: Source) -> str:
        kind, index = source
        if kind == "input":
            return f"input #{index}"
        if kind in ("hidden", "new", "weight"):
            prefix = "the new value of " if kind == "new" else ""
            return f"{prefix}`{self.captured.leaves[index].path}`"
        contraction = self.contractions[index]
        weight = self.captured.leaves[contraction.weight_leaf].path
        return f"the output of `{contraction.eqn.primitive.name}` with `{weight}`"

    def new_fact(self, leaf: int) -> Fact:
        """What a hidden leaf's new value depends on (before its own cut)."""
        var = self.new_vars.get(leaf)
        if var is None:
            return {("hidden", leaf): ALIGNED_AFFINE}
        return self.propagation.before_cut.get(var, self.propagation.of(var))


def _weights_only(fact: Fact) -> tuple[int, ...]:
    """The weight leaves `fact` depends on when it depends on nothing else; empty otherwise."""
    if not fact or any(kind != "weight" for kind, _ in fact):
        return ()
    return tuple(sorted(index for _, index in fact))


def _inexact(atom) -> bool:
    dtype = getattr(getattr(atom, "aval", None), "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def step_facts(captured: Captured) -> StepFacts:
    jaxpr = captured.jaxpr.jaxpr
    n_in, n_out = captured.n_inputs, captured.n_outputs
    in_facts: list[Fact] = [{("input", i): ALIGNED_AFFINE} for i in range(n_in)]
    new_vars: dict[int, Var] = {}
    for index, leaf in enumerate(captured.leaves):
        kind = {"hidden": "hidden", "weight": "weight"}.get(leaf.role)
        in_facts.append({(kind, index): ALIGNED_AFFINE} if kind else {})
        out = jaxpr.outvars[n_out + index]
        if leaf.role == "hidden" and isinstance(out, Var) and out is not jaxpr.invars[n_in + index]:
            new_vars[index] = out
    contractions: list[Contraction] = []

    weight_vars = {jaxpr.invars[n_in + i]: i for i, leaf in enumerate(captured.leaves) if leaf.role == "weight"}

    def on_contract(eqn_index: int, eqn: JaxprEqn, operands: list[Operand]):
        rule = lookup(eqn.primitive)
        assert rule is not None  # called on contracting equations only
        carrying = [i for i, op in enumerate(operands) if op.fact]
        if len(carrying) > 1 and all(_weights_only(operands[i].fact) for i in carrying):
            return None  # weights times weights: part of a weight's transform (a low-rank `u @ v`)
        for position in rule.weight_operands:
            weights = _weights_only(operands[position].fact)
            others = [i for i in carrying if i != position]
            if not others:  # the input carries no tracked source (a constant, or a delay buffer's value)
                others = [i for i, v in enumerate(eqn.invars) if i != position and _inexact(v)]
            if not weights or len(others) != 1:
                continue
            pre = others[0]  # it may read other weights (a weight -> weight path): they get no trace
            operand = eqn.invars[position]
            transformed = isinstance(operand, Literal) or weight_vars.get(operand) != weights[0]
            contractions.append(
                Contraction(
                    index=len(contractions),
                    eqn_index=eqn_index,
                    eqn=eqn,
                    weight_leaf=weights[0],
                    weight_operand=position,
                    pre_operand=pre,
                    pre_fact=dict(operands[pre].fact),
                    weight_leaves=weights,
                    transformed=transformed or len(weights) > 1,
                )
            )
            return {("relation", contractions[-1].index): ALIGNED_AFFINE}
        return None

    cut = {var: ("new", leaf) for leaf, var in new_vars.items()}

    def describe(source: Source) -> str:
        return StepFacts(captured, Propagation({}, {}), tuple(contractions), new_vars).describe(source)

    propagation = propagate(jaxpr, in_facts, cut=cut, on_contract=on_contract, describe=describe)
    return StepFacts(captured, propagation, tuple(contractions), new_vars)
