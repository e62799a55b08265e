"""An experiment, not a compile option (issue 16): es_d_rtrl's "matched" factorisation with its presynaptic
filters driven by the DIAGONAL of the group's mean `D` — each state's own mean decay — instead of the whole
mean matrix, then `fusetrace train` with the given arguments.

    python benchmarks/matched_diagonal.py train --task evidence --algorithm es_d_rtrl --factorisation matched \\
        --credit-depth 1 [the other `fusetrace train` arguments]

"matched" (`passes/components.py`) drives S presynaptic filters with `A_t`, the mean of `D_t` over the
batch and the neurons, and fits each neuron's kernel by them. On trained networks its gradient lost the
direction (docs/results.md: recurrent cosine −0.10 / −0.05 against d_rtrl): `A_t` averages the spike
resets and the surrogate-driven couplings of neurons that spike at different times. Here `A_t` keeps
only its diagonal, so each filter is close to one state's own leak (the membrane's 20 ms, the synapse's
5 ms, the adaptation's 2 s on e-prop's ALIF network); the postsynaptic moments, the Gram matrix and the
fit are "matched"'s, unchanged. This script replaces `components._mixing` for its own process only;
the measured runs are in docs/results.md. Whether to make it a factorisation (with its definition test
and a line in `explain`) is for the numbers to decide.
"""

import sys

import jax.numpy as jnp

from fusetrace.cli import main
from fusetrace.passes import components


def _diagonal_mixing(d):
    """`components._mixing` reduced to its diagonal: each state's own mean decay."""
    return jnp.diag(jnp.diagonal(jnp.mean(d, axis=(0, 1))))


if __name__ == "__main__":
    components._mixing = _diagonal_mixing
    sys.exit(main(sys.argv[1:]))
