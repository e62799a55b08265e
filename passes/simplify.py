"""Simplify a captured step before analysis.

Consumes: a `Captured` step. Produces: a `Captured` with the same inputs, outputs and state leaves
whose jaxpr has (1) every nested `jit` inlined, (2) control flow made straight-line where that is an
exact program transformation — an effect-free `cond` whose branches hold a contraction is if-converted
(every branch evaluated, `select_n` on the index), an effect-free `scan` of static length at most
`fusetrace.rules.control.UNROLL_MAX_LENGTH` is unrolled — (3) unit residue folded (`x * 1.0` and same-dtype
`convert_element_type`, left behind by brainunit), (4) identical equations merged (CSE; a second pass
merges equations that inlining brought to one level, e.g. the same product in every unrolled iteration),
and (5) dead code removed (`brainstate.transform.vmap` traces its body three times).

Invariant: the simplified step computes exactly the same values, and the same forward-mode derivatives
(it is re-traced by evaluating the original, never edited by hand). Sharp edges: `custom_jvp`/`custom_vjp`
calls are kept whole, so their custom derivatives (surrogate spikes, `exprel`) survive; `while_loop`s,
longer scans and conds without a contraction are kept whole (the analysis recurses into them); reverse
mode through an if-converted cond sends zero cotangents into the branches not taken (NaN where such a
branch has an infinite local derivative).
"""

import dataclasses

from fusetrace._compat import dce, new_closed_jaxpr
from fusetrace.capture import Captured
from fusetrace.interpret import retrace


def simplify(captured: Captured) -> Captured:
    closed = retrace(captured.jaxpr, inline=True, fold=True)
    closed = retrace(new_closed_jaxpr(dce(closed.jaxpr), closed.consts), inline=False, fold=True)
    closed = new_closed_jaxpr(dce(closed.jaxpr), closed.consts)
    return dataclasses.replace(captured, jaxpr=closed)
