"""Contracting primitives: `dot_general` and brainevent's event/sparse matrix products. When one of
the `weight_operands` carries a weight (and nothing else), the equation is a weight relation: the
analysis cuts the path there and its output becomes a fresh source. Otherwise the op mixes neurons."""

import brainevent
from jax import lax

from .base import Operand, Rule, lookup, mixed, register


def _contracting(linear: bool):
    def propagate(eqn, operands: list[Operand]):
        return [mixed(operands, linear=linear) for _ in eqn.outvars]

    return propagate


def register_contracting(
    *primitives, weight_operands: tuple[int, ...], per_synapse: bool = False, linear: bool = True
) -> None:
    for primitive in primitives:
        register(
            primitive,
            Rule(
                "contracting",
                _contracting(linear),
                linear=linear,
                weight_operands=weight_operands,
                per_synapse=per_synapse,
            ),
        )


register_contracting(lax.dot_general_p, weight_operands=(0, 1))
# convolutions: (input, kernel); each kernel element is shared over the output positions
register_contracting(lax.conv_general_dilated_p, weight_operands=(1,))
# event products read their spike operand as binary (x > 0): linear in the weight only
register_contracting(
    *(
        getattr(brainevent, name).primitive
        for name in (
            "binary_densemv_p",
            "binary_densemm_p",  # EventLinear: (weights, spikes)
            "binary_fcnmv_p",
            "binary_fcnmm_p",  # EventFixedProb: (weights, indices, spikes)
            "binary_csrmv_p",
            "binary_csrmm_p",  # CSR: (weights, indices, indptr, spikes)
        )
    ),
    weight_operands=(0,),
    per_synapse=True,
    linear=False,
)
register_contracting(
    *(getattr(brainevent, name).primitive for name in ("csrmv_p", "csrmm_p")),  # CSR with float vectors
    weight_operands=(0,),
    per_synapse=True,
)


def reads_values(eqn) -> bool:
    """Whether a contracting op reads its presynaptic input's values, not only which entries are non-zero:
    binary event products read spikes (active where non-zero) unless bound with `weighted=True`
    (brainevent's value-weighted events)."""
    return bool(getattr(lookup(eqn.primitive), "linear", True) or eqn.params.get("weighted", False))
