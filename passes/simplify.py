"""Simplify a captured step before analysis.

Consumes: a `Captured` step. Produces: a `Captured` with the same inputs, outputs and state leaves
whose jaxpr has (1) every nested `jit` inlined, (2) unit residue folded (`x * 1.0` and same-dtype
`convert_element_type`, left behind by brainunit), (3) identical equations merged (CSE), and
(4) dead code removed (`brainstate.transform.vmap` traces its body three times).

Invariant: the simplified step computes exactly the same values (it is re-traced by evaluating the
original, never edited by hand). Sharp edge: `custom_jvp`/`custom_vjp` calls are kept whole, so their
custom derivatives (surrogate spikes, `exprel`) survive.
"""

import dataclasses

from fusetrace._compat import dce, new_closed_jaxpr
from fusetrace.capture import Captured
from fusetrace.interpret import retrace


def simplify(captured: Captured) -> Captured:
    closed = retrace(captured.jaxpr, inline=True, fold=True)
    closed = new_closed_jaxpr(dce(closed.jaxpr), closed.consts)
    return dataclasses.replace(captured, jaxpr=closed)
