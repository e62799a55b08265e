"""Derivatives of one step, for online learning (DESIGN.md §2).

Consumes: an `Analysis` (simplified step, groups, relations) and the step's values. Produces, by
forward-mode JVPs and one reverse-mode VJP of the step's own evaluator — never a dense (N·S)² Jacobian:

* `D`: per group, per-neuron S×S blocks `∂h_t/∂h_{t-1}` with every weight-relation output held fixed
  (one JVP per state, a one-hot state tangent broadcast over neurons);
* `F`: per traced relation, `∂h_t/∂y_t` as an S-vector per neuron (one JVP with a ones tangent);
* `δ`: `∂L_t/∂h_t` with the step's new hidden values as independent leaves (paths inside the step
  are counted once, in D/F), plus the direct terms `∂L_t/∂h_{t-1}` and `∂L_t/∂W`;
* `P`: for a relation whose presynaptic input reads another group's new values element-wise,
  `∂u_t/∂h_t` per state (the cross-group credit through an LTI group);
* `credit`: `(∂y/∂u)ᵀ c`, the learning signal carried back through a relation's op.

Group arrays have the layout of the group's leaves plus a trailing state axis: `(..., n_states)`.
Invariant: every function here re-evaluates the captured jaxpr (with substitutions); values agree with
the plain step exactly. Only the part between what changes and what is wanted is re-evaluated
(`interpret.evaluate` with the forward values as `known`), so each derivative costs its own group's slice
of the step, not the whole step.
"""

import contextlib
import contextvars
import dataclasses
import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusetrace._compat import Jaxpr, Literal, aval_shape, bind_eqn, custom_vjp_call_p
from fusetrace.analysis import Analysis
from fusetrace.interpret import environment, evaluate, producers
from fusetrace.rules import lookup, reads_values

from . import event_product


@dataclasses.dataclass
class StepValues:
    """Inputs, leaves and the intermediate values one fused step needs (mantissas)."""

    inputs: list
    leaves: list
    outputs: list
    new_leaves: list
    y: dict[int, jax.Array]  # contraction index -> op output
    u: dict[int, jax.Array]  # contraction index -> presynaptic input
    w: dict[int, jax.Array] = dataclasses.field(default_factory=dict)  # transformed contraction -> its weight
    operands: dict[int, list] = dataclasses.field(default_factory=dict)  # contraction -> its op's operand values
    # every var of the step -> its value: what a derivative reads instead of re-evaluating it (empty: the
    # derivatives re-evaluate the whole step)
    known: dict = dataclasses.field(default_factory=dict, repr=False)


def forward(analysis: Analysis, inputs: Sequence, leaves: Sequence) -> StepValues:
    captured, facts = analysis.captured, analysis.facts
    jaxpr = captured.jaxpr
    contractions = facts.contractions
    transformed = [c for c in contractions if c.transformed]
    operands = [a for c in contractions for a in c.eqn.invars]
    want = [
        *jaxpr.jaxpr.outvars,
        *(c.out_var for c in contractions),
        *(c.pre_var for c in contractions),
        *(c.weight_var for c in transformed),
        *operands,
    ]
    # spikes @ W from the spikes (not on a mesh: the partitioner would gather a custom call's operands)
    rewrites = {} if on_mesh() else event_product.rewrites(contractions)
    known = environment(jaxpr.jaxpr, jaxpr.consts, [*inputs, *leaves], rewrites)
    values = [atom.val if isinstance(atom, Literal) else known[atom] for atom in want]
    n_out, n_all, n_c = captured.n_outputs, len(jaxpr.jaxpr.outvars), len(contractions)
    start = n_all + 2 * n_c + len(transformed)
    offsets = np.cumsum([0, *(len(c.eqn.invars) for c in contractions)]).tolist()
    return StepValues(
        inputs=list(inputs),
        leaves=list(leaves),
        outputs=values[:n_out],
        new_leaves=values[n_out:n_all],
        y={c.index: values[n_all + c.index] for c in contractions},
        u={c.index: values[n_all + n_c + c.index] for c in contractions},
        w={c.index: values[n_all + 2 * n_c + k] for k, c in enumerate(transformed)},
        operands={c.index: values[start + offsets[k] : start + offsets[k + 1]] for k, c in enumerate(contractions)},
        known=known,
    )


def weight_of(analysis: Analysis, values: StepValues, contraction: int) -> jax.Array:
    """The weight a relation's op multiplies: the weight leaf, or, when the op reads a transform of it
    (`Contraction.transformed`), the transform's value — the effective weight, which the traces follow."""
    c = analysis.facts.contractions[contraction]
    return values.w[contraction] if c.transformed else values.leaves[c.weight_leaf]


def to_weight_leaves(analysis: Analysis, values: StepValues, cotangents: Mapping[int, jax.Array]) -> dict:
    """`{weight leaf: (∂W_eff/∂θ)ᵀ g}` for `cotangents` = `{transformed contraction: g}`, gradients with
    respect to effective weights: the chain rule through their transforms, one VJP for all of them."""
    contractions = [analysis.facts.contractions[c] for c in sorted(cotangents)]
    leaves = sorted({leaf for c in contractions for leaf in c.weight_leaves})

    def effective(weights):
        substituted = list(values.leaves)
        for leaf, value in zip(leaves, weights, strict=True):
            substituted[leaf] = value
        return _evaluate_with(analysis, values, substituted, {}, [c.weight_var for c in contractions])

    _, vjp = jax.vjp(effective, [values.leaves[leaf] for leaf in leaves])
    (grads,) = vjp([cotangents[c.index] for c in contractions])
    return dict(zip(leaves, grads, strict=True))


def _evaluate_with(
    analysis: Analysis,
    values: StepValues,
    leaves: Sequence,
    substitute: dict,
    want: list,
    transform: dict | None = None,
):
    """The step's values of `want` with `leaves` and the `substitute`d vars changed, evaluating only the
    equations between the changed values and `want` (the rest is read from the forward values)."""
    jaxpr = analysis.captured.jaxpr
    return evaluate(
        jaxpr.jaxpr,
        jaxpr.consts,
        [*values.inputs, *leaves],
        want=want,
        substitute=substitute,
        transform=transform,
        known=values.known or None,
    )


def _feedback_path(contraction, matrix):
    """`y` forward; backward to the weight as usual, to the input through `matrix` instead:
    `op(sg(u), W) + op(u, B) - sg(op(u, B))`."""

    def swap(value, invals):
        to_weight = list(invals)
        to_weight[contraction.pre_operand] = lax.stop_gradient(invals[contraction.pre_operand])
        to_input = list(invals)
        to_input[contraction.weight_operand] = matrix
        (through_w,) = bind_eqn(contraction.eqn, to_weight)
        (through_b,) = bind_eqn(contraction.eqn, to_input)
        return through_w + through_b - lax.stop_gradient(through_b)

    return swap


def stack_states(arrays: Sequence[jax.Array]) -> jax.Array:
    return jnp.stack(list(arrays), axis=-1)


def apply_d(d: jax.Array, x: jax.Array) -> jax.Array:
    """`D x` per neuron (`d` `(..., S, S)`, `x` `(..., S)`, broadcast against each other) as S broadcast
    products added up: XLA's CPU backend runs the contraction as one tiny matrix product per neuron
    (measured: 0.7 ms of a 5 ms whole-brain step; 2x slower than this on batched factors)."""
    return functools.reduce(jnp.add, [d[..., t] * x[..., t, None] for t in range(x.shape[-1])])


def spike_eqns(analysis: Analysis, group, kind: str = "new") -> list:
    """The `spike` equations whose input reads `group`'s new values (`kind` "new") or previous ones
    ("hidden": a neuron that emits at the start of its step the spike its last values make) element-wise
    (in the group's shape)."""
    leaves = set(group.leaves)
    found = []
    for eqn in _spikes(analysis.captured.jaxpr.jaxpr):
        if tuple(aval_shape(eqn.invars[0])) != tuple(group.shape):
            continue
        fact = analysis.facts.propagation.of(eqn.invars[0])
        if any(read == kind and leaf in leaves and dep.aligned for (read, leaf), dep in fact.items()):
            found.append(eqn)
    return found


def spike_relevance(analysis: Analysis, group, values: StepValues) -> jax.Array | None:
    """`Σ |surrogate derivative|` of the spikes this step computes from `group`'s new values (the outputs
    of `spike` primitives whose input reads them element-wise), in the group's layout; None when the
    group emits no spike. Where it is zero, a neuron's spikes pass no credit on at this step."""
    surrogates = [eqn.invars[1] for eqn in spike_eqns(analysis, group)]
    if not surrogates:
        return None
    found = _evaluate_with(analysis, values, values.leaves, {}, surrogates)
    return functools.reduce(jnp.add, [jnp.abs(jnp.broadcast_to(x, group.shape)) for x in found])


def spike_reading(analysis: Analysis, group) -> tuple[list, bool]:
    """`(eqns, new)`: the spikes `group`'s new values make (`new` True), or else those its previous values
    make (False: a neuron that emits the spike of its last values); no equations when it emits none."""
    eqns = spike_eqns(analysis, group)
    return (eqns, True) if eqns else (spike_eqns(analysis, group, "hidden"), False)


def spike_sensitivities(analysis: Analysis, group, values: StepValues) -> list[jax.Array]:
    """`∂x/∂h` per state (shape (..., S)) of the input `x` of each spike `group` emits (`spike_reading`):
    `∂x_t/∂h_t`, or `∂x_t/∂h_{t-1}` for a spike of the last values (the same reading, one step later) —
    how the spike's argument reads each state, before the surrogate derivative. Empty when the group
    emits no spike."""
    eqns, new = spike_reading(analysis, group)
    return [pre_sensitivity(analysis, eqn.invars[0], group, values, new=new) for eqn in eqns]


# From how many neurons an unbatched group's derivative columns are materialised once (an optimisation
# barrier) before the trace updates read them. Fused into those updates, XLA's CPU backend evaluates each
# column's tangent map for every entry of every (N, S) trace it feeds. Measured on this project's 2-core
# CPU, `Learner.scan` of benchmarks/connectome_side_by_side.py, three runs each way: at 138,639 neurons
# (S = 3) that fusion took 1.7 ms per step and the scan 7.0-7.3 ms per step without the barrier, 5.6-5.7
# with it. Elsewhere the fusion is cheaper than the extra pass: 20,000 neurons unbatched 0.76-0.78 without
# against 0.84-0.98 ms with; batched, 16 x 20,000 (a gradient every step, benchmarks/connectome.py) 40.0-40.5
# against 41.8-43.7 ms, and the speed benchmark's layer at B = 16 (N = 512: 0.57 against 0.67 ms per step,
# N = 2048: +3.5%). Why the fused update costs 22 times more at 7 times the size is not established (XLA
# splits both over two threads).
MATERIALISE_FROM = 100_000


def transition_derivatives(analysis: Analysis, group, relations: Sequence, values: StepValues):
    """`(D, F)`: D of shape (..., S, S) with `D[..., s_out, s_in]`, and F, parallel to `relations` (all
    feeding `group`), each of shape (..., S): `∂h_t/∂y` with a ones tangent on the relation's op output,
    or for an element-wise parameter on the parameter itself.

    A relation with `crossings` (its op output or parameter also reaches the group through square
    products of values aligned with it: a gate read by the cell's other weight) has its F taken with each
    crossed product's tangent by its diagonal only (`d(pre @ W)_i = d(pre)_i · W[i, i]`): the per-neuron
    part of that path, as D keeps the per-neuron part of the recurrent one. D itself never crosses them."""
    crossing = [r for r in relations if r.crossings]
    plain = [r for r in relations if not r.crossings]
    d, f_plain = _derivatives(analysis, group, plain, values)
    assert d is not None, "D is formed with_d"
    if not crossing:
        return d, f_plain
    crossed = {i for r in crossing for i in r.crossings}
    _, f_cross = _derivatives(analysis, group, crossing, values, crossed, with_d=False)
    f_cross, f_plain = iter(f_cross), iter(f_plain)
    return d, [next(f_cross) if r.crossings else next(f_plain) for r in relations]


def _through_diagonal(contraction):
    """The transform of a square product's output that keeps its value and passes its input's tangent
    through the weight's diagonal only."""

    def transform(value, invals):
        pre, weight = invals[contraction.pre_operand], invals[contraction.weight_operand]
        return jax.lax.stop_gradient(value) + (pre - jax.lax.stop_gradient(pre)) * jnp.diagonal(weight)

    return transform


def _derivatives(
    analysis: Analysis,
    group,
    relations: Sequence,
    values: StepValues,
    crossed: frozenset | set = frozenset(),
    with_d: bool = True,
):
    """`(D, [F])` of `transition_derivatives`, the products in `crossed` passed through their diagonal;
    without `with_d`, F alone (D is None where forward mode is used: its S columns are not formed)."""
    facts = analysis.facts
    contractions = facts.contractions
    cut_y = {c.out_var: values.y[c.index] for c in contractions if c.index not in crossed}
    transform = {contractions[i].out_var: _through_diagonal(contractions[i]) for i in crossed} or None
    new_vars = [facts.new_vars[leaf] for leaf in group.leaves]
    through_op = [r for r in relations if not r.elementwise]
    through_param = [r for r in relations if r.elementwise]

    def transition(group_prev, ys, params):
        leaves = list(values.leaves)
        for leaf, value in zip(group.leaves, group_prev, strict=True):
            leaves[leaf] = value
        for relation, value in zip(through_param, params, strict=True):
            leaves[relation.weight_leaf] = value
        substitute = dict(cut_y)
        for relation, y in zip(through_op, ys, strict=True):
            substitute[contractions[relation.contraction].out_var] = y
        return _evaluate_with(analysis, values, leaves, substitute, new_vars, transform)

    primals = (
        [values.leaves[leaf] for leaf in group.leaves],
        [values.y[r.contraction] for r in through_op],
        [values.leaves[r.weight_leaf] for r in through_param],
    )
    if _has_custom_vjp(analysis.captured.jaxpr.jaxpr):  # forward mode cannot cross a custom_vjp: use reverse
        return _reverse_derivatives(analysis, group, relations, transition, primals)
    columns = [(part, i) for part, values_of in enumerate(primals) for i in range(len(values_of)) if with_d or part]
    outputs = jvp_columns(transition, primals, columns)  # per new state, (column, ...)
    if analysis.batch_size is None and int(np.prod(group.shape)) >= MATERIALISE_FROM:
        outputs = lax.optimization_barrier(outputs)
    n_d = group.n_states if with_d else 0
    # each array written once in its final layout (a stack over the columns and then a move of the column
    # axis last cost two passes with interleaved writes: 1.5 ms of a 5 ms whole-brain step)
    d = jnp.stack([stack_states([out[t] for out in outputs]) for t in range(n_d)], -1) if with_d else None
    f_op = iter([stack_states([out[n_d + i] for out in outputs]) for i in range(len(through_op))])
    n_f = n_d + len(through_op)
    f_param = iter([stack_states([out[n_f + i] for out in outputs]) for i in range(len(through_param))])
    return d, [next(f_param) if r.elementwise else next(f_op) for r in relations]


def jvp_columns(function: Callable, primals: tuple, columns: Sequence[tuple[int, int]]) -> Any:
    """`function`'s JVP at `primals` (a tuple of lists of arrays) for each column `(part, index)`: a ones
    tangent on `primals[part][index]`, zeros elsewhere. ONE JVP with the tangents stacked on a leading
    axis (`vmap`): the primal is traced once and so is the tangent map, whatever the number of columns.
    Returns `function`'s outputs (its pytree), each with the column axis first."""
    n = len(columns)

    def stacked(part: int, index: int, x: jax.Array) -> jax.Array:
        hot = np.asarray([column == (part, index) for column in columns], dtype=x.dtype)
        return lax.broadcast_in_dim(jnp.asarray(hot), (n, *x.shape), (0,))

    tangents = tuple([stacked(part, i, x) for i, x in enumerate(values)] for part, values in enumerate(primals))
    return jax.vmap(lambda *tangent: jax.jvp(function, primals, tangent)[1])(*tangents)


# facts about a whole captured jaxpr, found once per jaxpr (not once per group: that is O(groups²))
_SPIKES: "weakref.WeakKeyDictionary[Jaxpr, tuple]" = weakref.WeakKeyDictionary()
_CUSTOM_VJP: "weakref.WeakKeyDictionary[Jaxpr, bool]" = weakref.WeakKeyDictionary()


def _spikes(jaxpr: Jaxpr) -> tuple:
    """The equations of `jaxpr` whose primitive's rule is a spike."""
    if jaxpr not in _SPIKES:
        _SPIKES[jaxpr] = tuple(e for e in jaxpr.eqns if (rule := lookup(e.primitive)) is not None and rule.spike)
    return _SPIKES[jaxpr]


def _has_custom_vjp(jaxpr: Jaxpr) -> bool:
    if jaxpr not in _CUSTOM_VJP:
        _CUSTOM_VJP[jaxpr] = _holds_custom_vjp(jaxpr)
    return _CUSTOM_VJP[jaxpr]


def _holds_custom_vjp(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive is custom_vjp_call_p:
            return True
        params = [p for v in eqn.params.values() for p in (v if isinstance(v, tuple) else (v,))]
        if any(hasattr(getattr(p, "jaxpr", p), "eqns") and _holds_custom_vjp(getattr(p, "jaxpr", p)) for p in params):
            return True
    return False


def _reverse_derivatives(analysis: Analysis, group, relations: Sequence, transition, primals):
    """`transition_derivatives` by reverse mode (for steps whose custom_vjp rules forbid forward mode).

    Since `D` is block-diagonal per neuron and each op output element feeds one neuron, one VJP per state
    with a ones cotangent on that state gives the rows of every neuron's block at once. A parameter is
    shared over the batch (one per neuron) or over everything (a scalar), so its `F` (the ones-tangent
    JVP `Σ_j ∂h/∂θ_j`) is read one batch entry, or one group element, at a time (one-hot cotangents)."""
    out, vjp = jax.vjp(transition, *primals)
    through_op = [r for r in relations if not r.elementwise]
    n_states = group.n_states
    rows_h, rows_y, rows_p = [], [], []
    for s in range(n_states):
        cotangent = [jnp.ones_like(o) if i == s else jnp.zeros_like(o) for i, o in enumerate(out)]
        grads_h, grads_y, _ = vjp(cotangent)
        rows_h.append(grads_h)
        rows_y.append([from_op_layout(r, g, group.shape) for r, g in zip(through_op, grads_y, strict=True)])
        rows_p.append([_param_f(vjp, cotangent, s, i, theta, group, analysis) for i, theta in enumerate(primals[2])])
    d = jnp.stack([stack_states([rows_h[s][t] for s in range(n_states)]) for t in range(n_states)], -1)
    f_op = iter([stack_states([rows_y[s][i] for s in range(n_states)]) for i in range(len(through_op))])
    f_param = iter([stack_states([rows_p[s][i] for s in range(n_states)]) for i in range(len(primals[2]))])
    return d, [next(f_param) if r.elementwise else next(f_op) for r in relations]


def _param_f(vjp, cotangent, state: int, index: int, theta, group, analysis) -> jax.Array:
    """`F` of state `state` for parameter `index` in the group layout, from one-hot cotangents."""
    shape = tuple(group.shape)
    per_neuron = jnp.size(theta) > 1
    if per_neuron and analysis.batch_size is None:
        return jnp.reshape(vjp(cotangent)[2][index], shape)
    # one-hot over batch entries (a per-neuron parameter) or over every group element (a scalar)
    n_masks = analysis.batch_size if per_neuron else int(np.prod(shape, dtype=int))
    masks = jnp.eye(n_masks, dtype=cotangent[state].dtype).reshape((n_masks, *shape[: 1 if per_neuron else None]))
    masks = masks.reshape((n_masks, *masks.shape[1:], *(1,) * (len(shape) - masks.ndim + 1)))

    def row(mask):
        return jnp.sum(vjp([c * mask for c in cotangent])[2][index])

    if not per_neuron:
        return jnp.reshape(jax.vmap(row)(masks), shape)
    rows = jax.vmap(lambda mask: vjp([c * mask for c in cotangent])[2][index])(masks)
    return jnp.reshape(rows, shape)


def learning_signals(
    analysis: Analysis,
    values: StepValues,
    loss_of_outputs: Callable,
    weight_leaves: Sequence[int],
    feedback: Mapping[int, jax.Array] | None = None,
):
    """`(loss, δ_new, δ_prev, direct)`: δ per hidden leaf w.r.t. its new value (as a leaf) and its
    previous value (direct reads only), and the direct `∂L/∂W` for the given weight leaves.

    `feedback` maps contraction indices to fixed matrices that replace the weight on the backward path
    to the presynaptic input only (e-prop's random feedback); the forward values are unchanged."""
    facts = analysis.facts
    transform = {
        facts.contractions[c].out_var: _feedback_path(facts.contractions[c], matrix)
        for c, matrix in (feedback or {}).items()
    }
    hidden = sorted(facts.new_vars)
    new_vars = [facts.new_vars[leaf] for leaf in hidden]
    outvars = analysis.captured.jaxpr.jaxpr.outvars[: analysis.captured.n_outputs]

    def loss(new_hidden, prev_hidden, weights):
        leaves = list(values.leaves)
        for leaf, value in zip(hidden, prev_hidden, strict=True):
            leaves[leaf] = value
        for leaf, value in zip(weight_leaves, weights, strict=True):
            leaves[leaf] = value
        substitute = dict(zip(new_vars, new_hidden, strict=True))
        return loss_of_outputs(_evaluate_with(analysis, values, leaves, substitute, list(outvars), transform))

    args = (
        [values.new_leaves[leaf] for leaf in hidden],
        [values.leaves[leaf] for leaf in hidden],
        [values.leaves[leaf] for leaf in weight_leaves],
    )
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)
    delta_new = dict(zip(hidden, grads[0], strict=True))
    delta_prev = dict(zip(hidden, grads[1], strict=True))
    direct = dict(zip(weight_leaves, grads[2], strict=True))
    return value, delta_new, delta_prev, direct


def pre_sensitivity(analysis: Analysis, link, group, values: StepValues, new: bool = True) -> jax.Array:
    """`∂v/∂h_t` (`new`) or `∂v/∂h_{t-1}` per state of `group` (shape (..., S)) for a value `link` aligned
    with the group (the part of a relation's presynaptic input that this group's new, or previous, values
    produce)."""
    facts = analysis.facts
    new_vars = [facts.new_vars[leaf] for leaf in group.leaves]

    def pre(group_values):
        if new:
            substitute = dict(zip(new_vars, group_values, strict=True))
            return _evaluate_with(analysis, values, values.leaves, substitute, [link])[0]
        leaves = list(values.leaves)
        for leaf, value in zip(group.leaves, group_values, strict=True):
            leaves[leaf] = value
        return _evaluate_with(analysis, values, leaves, {}, [link])[0]

    primals = ([(values.new_leaves if new else values.leaves)[leaf] for leaf in group.leaves],)
    return jnp.moveaxis(jvp_columns(pre, primals, [(0, s) for s in range(group.n_states)]), 0, -1)


def param_sensitivity(analysis: Analysis, values: StepValues, link, leaf: int) -> jax.Array:
    """`Σ_j ∂v/∂θ_j` (a ones tangent on the parameter leaf `leaf`) of a value `link` computed with the
    parameter, every hidden value held fixed: the direct sensitivity of a group's read-out (its spikes) to
    a per-neuron parameter that also computes it (a trained threshold)."""
    facts = analysis.facts
    held = {facts.new_vars[i]: values.new_leaves[i] for i in sorted(facts.new_vars)}

    def link_of(theta):
        leaves = list(values.leaves)
        leaves[leaf] = theta
        return _evaluate_with(analysis, values, leaves, held, [link])[0]

    theta = values.leaves[leaf]
    return jax.jvp(link_of, (theta,), (jnp.ones_like(theta),))[1]


def pullback(analysis: Analysis, values: StepValues, source, target, cotangent: jax.Array) -> jax.Array:
    """`(∂target/∂source)ᵀ cotangent` for two vars of the step (target built from source by linear
    structural ops: its transpose is exact and selects the source's part)."""
    return pullback_map(analysis, values, source, target)(cotangent)


def pullback_map(
    analysis: Analysis, values: StepValues, source, target, *, linear: bool = True
) -> Callable[[jax.Array], jax.Array]:
    """`pullback` as a linear map, traced once and applied to any number of cotangents. `linear=False`:
    `target` is a nonlinear function of `source` (a normalisation across neurons), pulled back by its VJP
    at this step's values.

    Every hidden group's new values other than `source` are held at their step values: a target that also
    reads a group computed from `source` in the same step (a readout of two populations in series) takes
    only its direct part here; the path through that group's dynamics is a credit chain of its own."""
    if source is target:
        return lambda cotangent: cotangent
    (primal,) = _evaluate_with(analysis, values, values.leaves, {}, [source])
    held = _held_new_values(analysis, values, source)

    def forward(value):
        return _evaluate_with(analysis, values, values.leaves, {**held, source: value}, [target])[0]

    if not linear:
        _, vjp = jax.vjp(forward, primal)
        return lambda cotangent: vjp(cotangent)[0]
    # the transpose of the linear map alone: a VJP would also emit the forward and, for a target that
    # concatenates many groups' values, a zero cotangent for every other part (O(groups) per pullback)
    transpose = jax.linear_transpose(forward, primal)
    return lambda cotangent: transpose(cotangent)[0]


def _held_new_values(analysis: Analysis, values: StepValues, source) -> dict:
    """`{var: its step value}` for every hidden leaf's new-value var except `source` (the very objects of
    `values.known`, so a local evaluation reads them as unchanged)."""
    return {var: values.known[var] for var in analysis.facts.new_vars.values() if var is not source}


def op_output(
    analysis: Analysis, contraction: int, values: StepValues, pre, weight, *, float_input: bool = False
) -> jax.Array:
    """The relation's op output `y(u, W)` with the presynaptic input and the weight leaf replaced.

    `float_input`: `pre` is a real-valued stand-in for the input (es_d_rtrl's presynaptic trace), so an
    op that reads its input as spikes (a binary event product) is evaluated as its value-weighted twin
    (`weighted=True`: the same sparsity and kernel family, each event multiplied by its value), which is
    the op's linear extension from 0/1 inputs to real ones."""
    c = analysis.facts.contractions[contraction]
    leaves = list(values.leaves)
    substitute = {c.pre_var: pre}
    if c.transformed:
        substitute[c.weight_var] = weight
    else:
        leaves[c.weight_leaf] = weight
    transform = None
    if float_input and not reads_values(c.eqn):
        transform = {c.out_var: _weighted_twin(c.eqn, analysis)}
    return _evaluate_with(analysis, values, leaves, substitute, [c.out_var], transform)[0]


def csr_rows(indptr) -> np.ndarray:
    """The row of every stored entry of a CSR matrix (on the host: `compile` computes it once)."""
    indptr = np.asarray(indptr)
    return np.repeat(np.arange(indptr.shape[0] - 1, dtype=indptr.dtype), np.diff(indptr))


def twin_row_indptrs(analysis: Analysis) -> list:
    """`(operand, value)` for the indptr of every binary CSR x vector op whose weight cotangent the
    value-weighted twin forms in one pass (`_weighted_twin`) and whose value is known at compile time (a
    constvar of the step, or a literal under JAX's simplified constants): their row indices are worth
    computing once, at compile time."""
    jaxpr = analysis.captured.jaxpr
    known = list(zip(jaxpr.jaxpr.constvars, jaxpr.consts, strict=True))
    found = []
    for c in analysis.facts.contractions:
        indptr = c.eqn.invars[2] if len(c.eqn.invars) > 2 else None
        if not one_pass_csr(c.eqn) or any(indptr is operand for operand, _ in found):
            continue
        # identity, not hashing: a Literal operand is unhashable
        value = indptr.val if isinstance(indptr, Literal) else next((v for var, v in known if var is indptr), None)
        if value is not None:
            found.append((indptr, value))
    return found


def one_pass_csr(eqn) -> bool:
    """A binary CSR product (times a vector, or a batch of vectors) with one weight per connection: its
    twin's weight gradient is one pass over the connections (`connection_products`)."""
    return (
        eqn.primitive.name in ("binary_csrmv", "binary_csrmm")
        and not eqn.params.get("weighted", False)
        and eqn.invars[0].aval.shape[0] != 1
    )


_BATCH_GROUPS: contextvars.ContextVar[int] = contextvars.ContextVar("batch_groups", default=0)  # 0: not on a mesh


@contextlib.contextmanager
def batch_groups(count: int):
    """Trace the steps within as split into `count` parts over the batch (the devices of a data-parallel
    mesh, `fusetrace.shard_step`): `connection_products` then forms each part's sum on its own."""
    token = _BATCH_GROUPS.set(count)
    try:
        yield
    finally:
        _BATCH_GROUPS.reset(token)


def batch_split() -> bool:
    """Whether the steps being traced are split over the batch (`batch_groups`, a data-parallel mesh)."""
    return _BATCH_GROUPS.get() > 1


def on_mesh() -> bool:
    """Whether the steps being traced run on a device mesh (`fusetrace.shard_step` traces them under
    `batch_groups`, with 1 when the batch is not split)."""
    return _BATCH_GROUPS.get() > 0


def connection_products(xs: jax.Array, cts: jax.Array, pre: jax.Array, post: jax.Array) -> jax.Array:
    """`Σ_{t,b} xs[t, b, pre(k)] · cts[t, b, post(k)]` for every connection k: the weight cotangent of a
    sparse product summed over steps `t` and batch entries `b`, one entry at a time — the E-long sum is
    the only temporary, never a `T·B × E` array (which XLA materialises for the gathers; the loop was also
    3× faster on this CPU at 16 and 256 entries, E = 400k). Under `batch_groups(g)` (a batch split over g
    devices) the g parts of the batch are formed side by side, so that each device sums its own part and
    the sums are all-reduced (a `g × E` temporary), instead of the factors being gathered everywhere."""
    # the factors are formed once, before the gathers: XLA otherwise fuses their element-wise producers
    # into the E-long gather fusion and recomputes them for every connection (5x slower on the whole brain)
    xs, cts = jax.lax.optimization_barrier((xs, cts))
    steps, batch = xs.shape[:2]
    groups = _BATCH_GROUPS.get()
    groups = groups if groups > 1 and batch % groups == 0 else 1
    xs, cts = (jnp.reshape(a, (steps, groups, batch // groups, a.shape[-1])) for a in (xs, cts))
    xs, cts = (jnp.reshape(jnp.moveaxis(a, 1, 0), (groups, -1, a.shape[-1])) for a in (xs, cts))
    if xs.shape[1] == 1:
        return jnp.sum(xs[:, 0][:, pre] * cts[:, 0][:, post], axis=0)

    def add(i, total):
        return total + jnp.sum(xs[:, i][:, pre] * cts[:, i][:, post], axis=0)

    return jax.lax.fori_loop(0, xs.shape[1], add, jnp.zeros(pre.shape, jnp.result_type(xs, cts)))


def csr_endpoints(eqn, analysis: Analysis, invals) -> tuple[jax.Array, jax.Array]:
    """`(pre, post)`: each connection's presynaptic (input) and postsynaptic (output) index of a CSR op."""
    _, indices, indptr = invals[:3]
    precomputed = analysis.rows_of(eqn.invars[2])
    rows = _rows_in_program(indptr, eqn.params["shape"][0], indices.shape[0]) if precomputed is None else precomputed
    return (rows, indices) if eqn.params["transpose"] else (indices, rows)


def csr_rows_of(value: jax.Array, eqn) -> jax.Array:
    """A CSR op's vector operand or output as rows `(B, n)`: one row for a vector, one per batch entry for
    the `(n, B)` matrix of `binary_csrmm`."""
    return value[None] if eqn.primitive.name == "binary_csrmv" else value.T


def _weighted_twin(eqn, analysis: Analysis):
    """The transform that replaces a binary event product's output by its value-weighted twin's. A CSR
    matrix times a vector (or a batch of them) with one weight per connection gets its weight cotangent
    in one pass, `Σ_b x[pre(k)] · ct[post(k)]` (`connection_products`; brainevent's own also selects on
    `x != 0`, which costs a second pass over the connections, and writes a batch × connections array).
    The row of every connection is `analysis.rows_of(indptr)`, computed once by `compile`, else in the
    program."""
    if not one_pass_csr(eqn):
        return lambda value, invals: bind_eqn(eqn, invals, weighted=True)[0]

    def transform(value, invals):
        weights, indices, indptr, x, *workspace = invals
        pre, post = csr_endpoints(eqn, analysis, invals)

        @jax.custom_vjp
        def product(w, x):
            return bind_eqn(eqn, [w, indices, indptr, x, *workspace], weighted=True)[0]

        def forward(w, x):
            return product(w, x), x

        def backward(x, ct):
            grad = connection_products(csr_rows_of(x, eqn)[None], csr_rows_of(ct, eqn)[None], pre, post)
            return grad.astype(weights.dtype), jnp.zeros_like(x)

        product.defvjp(forward, backward)
        return product(weights, x)

    return transform


def _rows_in_program(indptr, n_rows: int, n_entries: int):
    return jnp.repeat(jnp.arange(n_rows, dtype=indptr.dtype), jnp.diff(indptr), total_repeat_length=n_entries)


def op_input(eqn, u: jax.Array, dtype) -> jax.Array:
    """What the op multiplies its weights by, as a real array: `u`, or for a binary event product the
    activity mask of `u` (brainevent's contract: an event is active where it is non-zero)."""
    return u.astype(dtype) if reads_values(eqn) else (u != 0).astype(dtype)


def credit(
    analysis: Analysis, contraction: int, values: StepValues, cotangent: jax.Array, feedback: jax.Array | None = None
) -> jax.Array:
    """`(∂y/∂u)ᵀ cotangent`: a learning signal carried back through the op to its presynaptic input
    (through the fixed matrix `feedback` instead of the weight, when given)."""
    return credit_map(analysis, contraction, values, feedback)(cotangent)


def credit_map(
    analysis: Analysis, contraction: int, values: StepValues, feedback: jax.Array | None = None
) -> Callable[[jax.Array], jax.Array]:
    """`credit` as a linear map, traced once and applied to any number of cotangents."""
    weight = weight_of(analysis, values, contraction) if feedback is None else feedback
    _, vjp = jax.vjp(lambda pre: op_output(analysis, contraction, values, pre, weight), values.u[contraction])
    return lambda cotangent: vjp(cotangent)[0]


def step_invariant_operands(analysis: Analysis, contraction: int) -> bool:
    """Whether the op's operands other than its input and weight are the same at every step: computed
    from constants and weights only (CSR indices, shapes), not from inputs or any state. Then `op_alone`
    with one step's operands stands for every step's op."""
    captured = analysis.captured
    jaxpr = captured.jaxpr.jaxpr
    c = analysis.facts.contractions[contraction]
    fixed = {jaxpr.invars[captured.n_inputs + i] for i, leaf in enumerate(captured.leaves) if leaf.role == "weight"}
    inputs = set(jaxpr.invars) - fixed
    producer = producers(jaxpr)
    pending = [v for i, v in enumerate(c.eqn.invars) if i not in (c.pre_operand, c.weight_operand)]
    seen = set()
    while pending:
        var = pending.pop()
        if isinstance(var, Literal) or var in seen:
            continue
        seen.add(var)
        if var in inputs:
            return False
        eqn = producer.get(var)
        if eqn is not None:
            pending.extend(eqn.invars)
    return True


def op_alone(analysis: Analysis, contraction: int, values: StepValues, pre, weight, *, float_input: bool = False):
    """`op_output` from the op's own equation alone (its other operands as this step computed them), not
    from the whole step: for batching it over time (`weight_vjp_over_time`)."""
    c = analysis.facts.contractions[contraction]
    invals = list(values.operands[contraction])
    invals[c.pre_operand], invals[c.weight_operand] = pre, weight
    if float_input and not reads_values(c.eqn):
        return _weighted_twin(c.eqn, analysis)(None, invals)
    return bind_eqn(c.eqn, invals)[0]


def weight_vjp_over_time(
    analysis: Analysis, contraction: int, values: StepValues, pres: jax.Array, cotangents: jax.Array
) -> jax.Array:
    """`Σ_t (∂y(pre_t, W)/∂W)ᵀ cotangent_t` over a stack of steps (leading axis), in ONE contraction: the op
    is vmapped over time with the weight shared, so its weight VJP contracts the time and batch axes
    together (one GEMM for a dense weight, one pass over the connections for a sparse one) instead of
    writing the whole weight-shaped gradient at every step. Presynaptic factors are real-valued stand-ins
    (`float_input`, as es_d_rtrl's). A binary CSR product folds the steps and batch entries into one
    `connection_products` loop (vmapping its one-pass gradient would write a steps × connections array)."""
    c = analysis.facts.contractions[contraction]
    if one_pass_csr(c.eqn):  # a binary op (never reads values): the steps and batch entries folded into one loop
        invals = list(values.operands[contraction])
        pre, post = csr_endpoints(c.eqn, analysis, invals)

        def rows(stack):  # (T, n) or (T, n, B) -> (T, B, n)
            return jax.vmap(lambda value: csr_rows_of(value, c.eqn))(stack)

        grad = connection_products(rows(pres), rows(cotangents), pre, post)
        return grad.astype(weight_of(analysis, values, contraction).dtype)
    if event_product.plain_matmul(c):  # `x @ W`: the steps and batch entries as one axis, one "TN" GEMM
        # (the vmapped VJP contracts them as two axes, and XLA's CPU backend transposes both operands
        # first: at N = 2048, B = 16, T = 100, 58 ms against 47 for the GEMM alone, quiet)
        lhs, rhs = (jnp.reshape(a, (-1, a.shape[-1])) for a in (pres, cotangents))
        grad = lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())))
        return grad.astype(weight_of(analysis, values, contraction).dtype)

    def stacked(weight):
        return jax.vmap(lambda pre: op_alone(analysis, contraction, values, pre, weight, float_input=True))(pres)

    _, vjp = jax.vjp(stacked, weight_of(analysis, values, contraction))
    return vjp(cotangents)[0]


def weight_vjp(
    analysis: Analysis, contraction: int, values: StepValues, pre, cotangent, *, float_input: bool = False
) -> jax.Array:
    """`(∂y(pre, W)/∂W)ᵀ cotangent`, summed over the batch: the factorised gradient of a relation, with
    respect to the weight its op multiplies (`weight_of`; `float_input`: see `op_output`)."""
    _, vjp = jax.vjp(
        lambda w: op_output(analysis, contraction, values, pre, w, float_input=float_input),
        weight_of(analysis, values, contraction),
    )
    return vjp(cotangent)[0]


def same_step_grad(analysis: Analysis, values: StepValues, relation, delta_new: Mapping[int, jax.Array]) -> jax.Array:
    """`(∂h_t/∂W)ᵀ δ_t` with `h_{t-1}` fixed, through this relation only: the weight's effect on this
    step's new hidden values (its effect on later steps is not carried). Through the relation's op
    output when it has a contraction (so other uses of the same weight are not counted twice), else
    through the weight leaf itself with the outputs of its own contracting ops held fixed."""
    facts = analysis.facts
    hidden = sorted(facts.new_vars)
    new_vars = [facts.new_vars[leaf] for leaf in hidden]
    cotangent = [delta_new[leaf] for leaf in hidden]
    if relation.contraction is not None and relation.group is not None:  # this relation's group only
        mine = set(analysis.group_named(relation.group).leaves)
        cotangent = [c if leaf in mine else jnp.zeros_like(c) for leaf, c in zip(hidden, cotangent, strict=True)]
    if relation.contraction is not None:
        out_var = facts.contractions[relation.contraction].out_var
        _, vjp = jax.vjp(
            lambda y: _evaluate_with(analysis, values, values.leaves, {out_var: y}, new_vars),
            values.y[relation.contraction],
        )
        (through_y,) = vjp(cotangent)
        return weight_vjp(analysis, relation.contraction, values, values.u[relation.contraction], through_y)

    # the weight's own contracting ops are traced or credited on their own: hold their outputs fixed
    own = {c.out_var: values.y[c.index] for c in facts.contractions if relation.weight_leaf in c.weight_leaves}

    def new_hidden(weight):
        leaves = list(values.leaves)
        leaves[relation.weight_leaf] = weight
        return _evaluate_with(analysis, values, leaves, own, new_vars)

    _, vjp = jax.vjp(new_hidden, values.leaves[relation.weight_leaf])
    return vjp(cotangent)[0]


def to_op_layout(relation, array: jax.Array) -> jax.Array:
    """A group-layout array (without state axis) in the layout of the relation's op output."""
    if relation.tail_perm is not None:
        inverse = tuple(relation.tail_perm.index(axis) for axis in range(len(relation.tail_perm)))
        array = jnp.transpose(array, inverse)
    if relation.op_shape is not None and array.shape != relation.op_shape:
        array = jnp.reshape(array, relation.op_shape)  # unit axes only (the tail keeps element order)
    return array


def from_op_layout(relation, array: jax.Array, shape: tuple[int, ...] | None = None) -> jax.Array:
    """An op-output-layout array in the group layout (`shape`: the group's, for unit-axis reshapes)."""
    if relation.tail_perm is not None:
        array = jnp.transpose(array, relation.tail_perm)
    if shape is not None and array.shape != tuple(shape):
        array = jnp.reshape(array, shape)
    return array
