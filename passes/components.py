"""es_d_rtrl's trace as a sum of K pairs of factors, O(K·B·(I + N·S)): "matched" and "low_rank".

Consumes: an `Analysis`, the relations that share one postsynaptic factor (an owner and its members,
`factorised.post_owner`), the step's values, the group's `D` and the owner's `F`, and the factors'
previous values. Produces their new values and, given the learning signals, op-layout cotangents with a
leading component axis (the weight product sums over it: `factorised.weight_product`).

    ε_t ≈ Σ_k ε^u_k ⊗ c_k,    ε^u_k: (batch, n_pre),  c_k: (batch, n_post, S)

* "matched": the presynaptic factors are the input filtered by the group's own mean dynamics,
  `ū ← A_t ū + 1·u` with `A_t` the mean of `D_t` over the batch and the neurons (S filters); the
  postsynaptic ones carry, per neuron and state, the same filters' moments of the neuron's own kernel,
  `b ← (A_t ⊗ D_t) b + 1 ⊗ F`, and `c = G⁺ b` with `G ← A G Aᵀ + 1 1ᵀ` (the least-squares fit of each
  neuron's kernel `h(t, k) = (D_t ⋯ D_{k+1} F_k)` by the filters' kernels, weighting every lag alike: the
  fit that is best for white-noise input). Exact when the group is linear time-invariant and its neurons
  share `(D, F)`: the kernel is then a combination of the filters' (`ε = Σ_m P_m F ⊗ ū_{λ_m}` in
  eigen-coordinates). Elsewhere (spikes make `D` time-varying) the fit is approximate.
* "low_rank": the trace of every batch entry as a rank-r matrix `L Rᵀ` (`L`: n_pre × r with orthonormal
  columns, the presynaptic factors; `R`: n_post·S × r), kept by the exact recursion followed by the best
  rank-r truncation at each step: `ε D_tᵀ + u Fᵀ = [L, ρ̂] [D_t R + F pᵀ, |ρ| F]ᵀ` with `p = Lᵀu`,
  `ρ = u − L p`, then the top r eigenvectors `V` of the (r+1)² Gram matrix of the right factor give
  `L ← [L, ρ̂] V`, `R ← [...] V`. Exact while the trace's rank stays ≤ r (a linear time-invariant group
  with shared `(D, F)` has rank ≤ S). Relations sharing a postsynaptic factor share one basis: their
  inputs are stacked into one presynaptic vector.
  The truncation's norm is a choice (`rank_metric`): "plain", the trace's own Frobenius norm, or
  "balanced", the norm after every state's block of the (extended) trace is scaled to unit norm — the
  same truncation whatever unit each state is written in. Under "plain" a state whose trace is large in
  its own unit (a slow adaptation variable summing spikes over seconds) takes the rank from the states
  the learning signal reads (measured: docs/results.md). "spike" weighs the states by how the group's
  spikes read them, carried through its dynamics: per neuron the S×S matrix `M ← Dᵀ M D + Σ g gᵀ`,
  `g = ∂x/∂h_t` the sensitivity of each spike's argument `x` to the states (`derive.spike_sensitivities`;
  `∂x_t/∂h_{t-1}` for a neuron that emits the spike of its last values),
  and the truncation is the best in the norm `‖E M^{1/2}‖` (an error in a state the spikes read only
  weakly, or only through a fast-decaying path, weighs little). It is the learning signal's own reading
  of the trace where the loss reads the group through its spikes (`δ_t = (∂L/∂z) σ' g`). A group that
  emits no spike falls back to "balanced"; a one-state group needs no metric (every norm is the plain
  one up to a per-neuron scale, kept plain).

Credit chains (`passes.credit`) carry, for such an owner, one neuron-layout trace per component; under
"low_rank" they are rotated with the basis at every step (`align_chains`).

Layout: every factor carries its K components right after the batch axis, `(B, K, ...)` (a unit batch
axis when the model is unbatched), so that the per-step arithmetic runs as batched matrix products; the
weight products see them component first, in the op's own input layout (`components_first`). An op that
reads its input with the batch elsewhere (brainevent's batched event products read `(n_pre, B)`) has it
moved first and back (`pre_batch_axis`: followed back through the step's transposes and slices to a
batched state or input).

Sharp edges: under "low_rank" an input whose batch axis cannot be followed back, and whose leading axis
is not the batch, is refused by the plan; each step costs one (r+1)² symmetric eigendecomposition per
batch entry (`passes.small_eigh`: Jacobi rotations over the batch up to rank 4, LAPACK above). The
truncation reads the Gram matrix of the extended right factor, so directions whose singular values are
under √ε of the largest are resolved only to rounding (which of two such directions is dropped can
differ between eigensolvers: 6e-9 against 3e-7 of a gradient leaf's norm on one fuzz network at full
rank, docs/reliability.md). The rank is capped at what the trace can have: `min(rank, n_pre, n_post·S)`
of the relations sharing the factor (`min(rank, n_pre)` when credit chains ride on the basis).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from fusetrace._compat import Literal
from fusetrace.interpret import producers
from fusetrace.rules import lookup

from . import derive, small_eigh

COMPONENT_FACTORISATIONS = ("matched", "low_rank")
RANK_METRICS = ("plain", "balanced", "spike")  # the norm of the "low_rank" truncation (module docstring)

# a pseudo-inverse cut-off for the filters' Gram matrix, relative to its largest eigenvalue (after the
# matrix is scaled to a unit diagonal): below it, two filters' kernels are the same on the lags seen so far
PINV_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
# an input whose part outside the basis is below this fraction of its norm adds no new direction
NEW_DIRECTION_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

# where each factor keeps its neurons, for a mesh (src/fusetrace/shard.py): the axis after the batch and
# component axes ("post" `(B, K, *units, S)`, a credit chain's trace `(B, K, *units)`), after the batch
# axis alone ("metric" `(B, *units, S, S)`), the presynaptic vector's axis when it is a neuron population
# ("pre" `(B, K, I)`), or none (the state of the basis: "rotation" `(B, K+1, K)`; "gram" and "mixing"
# `(K, K)`, which have no batch axis either)
FACTOR_NEURON_AXIS = {"pre": "pre", "post": 2, "chain": 2, "metric": 1, "rotation": None, "gram": None, "mixing": None}
UNBATCHED_FACTORS = ("gram", "mixing")

Pre = Float[Array, "batch component n_pre"]
Post = Float[Array, "batch component n_post n_states"]


def n_components(analysis, plan, index: int) -> int:
    """K of the factors `index` shares: the group's number of states ("matched"), or the rank capped at
    the largest rank the trace can have, `min(n_pre, n_post·S)` ("low_rank"). A factor whose credit
    chains ride on its basis is capped at n_pre only: a chain's sensitivities to the weights can span
    presynaptic directions the trace's n_post·S columns do not."""
    relation = analysis.relations[index]
    group = analysis.group_named(relation.group)
    if plan.factorisation == "matched":
        return group.n_states
    members = members_of(analysis, plan, index)  # the owner first
    n_pre = sum(_pre_size(analysis, m) for m in members)
    if any(node.owner == members[0] for node in plan.chains):
        return max(1, min(plan.rank, n_pre))
    n_post = int(np.prod(group.shape, dtype=int)) // _batch(analysis) * group.n_states
    return max(1, min(plan.rank, n_pre, n_post))


def init(analysis, plan, index: int, owner: bool) -> dict:
    """Zero factors of relation `index` (with the postsynaptic ones when it owns them), `(B, K, ...)`."""
    relation = analysis.relations[index]
    group = analysis.group_named(relation.group)
    dtype = analysis.captured.leaves[relation.weight_leaf].dtype
    k, batch = n_components(analysis, plan, index), _batch(analysis)
    factors = {"pre": jnp.zeros((batch, k, _pre_size(analysis, index)), dtype)}
    if plan.factorisation == "low_rank":  # an orthonormal basis from the start (the trace is zero)
        factors["pre"] = _first_basis(analysis, plan, index, k, dtype)
    if owner:
        factors["post"] = jnp.zeros((batch, k, *_units(analysis, group), group.n_states), dtype)
        if plan.factorisation == "matched":
            factors["gram"] = jnp.zeros((k, k), dtype)
            factors["mixing"] = jnp.zeros((k, k), dtype)
        else:
            factors["rotation"] = jnp.zeros((batch, k + 1, k), dtype)
            if truncation_norm(analysis, plan, index) == "spike":  # the per-neuron metric M
                factors["metric"] = jnp.zeros((batch, *_units(analysis, group), group.n_states, group.n_states), dtype)
    return factors


def truncation_norm(analysis, plan, index: int) -> str:
    """The norm the "low_rank" truncation of `index`'s owner is taken in: `plan.rank_metric`, except
    "plain" for a one-state group and "balanced" for "spike" on a group that emits no spike."""
    group = analysis.group_named(analysis.relations[index].group)
    if group.n_states == 1:
        return "plain"
    if plan.rank_metric == "spike" and not derive.spike_reading(analysis, group)[0]:
        return "balanced"
    return plan.rank_metric


def _batch(analysis) -> int:
    return analysis.batch_size or 1


def _units(analysis, group) -> tuple[int, ...]:
    """The group's shape without its batch axis."""
    return tuple(group.shape[1:]) if analysis.batch_size is not None else tuple(group.shape)


def _first_basis(analysis, plan, index: int, k: int, dtype) -> jax.Array:
    """Orthonormal columns for the stacked presynaptic vector of `index`'s owner, this relation's rows."""
    offset = 0
    for member in members_of(analysis, plan, index):
        if member == index:
            break
        offset += _pre_size(analysis, member)
    size = _pre_size(analysis, index)
    total = sum(_pre_size(analysis, m) for m in members_of(analysis, plan, index))
    rows = np.eye(max(total, k), k, dtype=dtype)[offset : offset + size]  # (size, k)
    return jnp.asarray(np.broadcast_to(rows.T[None], (_batch(analysis), k, size)))


def _pre_size(analysis, index: int) -> int:
    shape = analysis.facts.contractions[analysis.relations[index].contraction].pre_var.aval.shape
    return int(np.prod(shape, dtype=int)) // _batch(analysis)


def members_of(analysis, plan, index: int) -> list[int]:
    """The traced relations that share `index`'s postsynaptic factor, the owner first."""
    from .factorised import post_owner

    owner = post_owner(plan.algorithm, analysis.relations, index)
    return [i for i in plan.traced if post_owner(plan.algorithm, analysis.relations, i) == owner]


def state_sum(a: jax.Array, b: jax.Array, states) -> jax.Array:
    """`Σ_s a_s b_s` over the trailing state axis, `states` only, as a sum of products: a reduction over
    that short axis ran 10x slower in XLA's CPU fusions (measured, batch 32, 200 neurons, K = 4)."""
    return functools.reduce(jnp.add, [a[..., s] * b[..., s] for s in states])


def with_components(x: jax.Array, batched: bool) -> jax.Array:
    """A group-layout array `(B, ...)` (or unbatched `(...)`) seen beside `(B, K, ...)` factors."""
    return x[:, None] if batched else x[None, None]


def components_first(analysis, relation, x: jax.Array) -> jax.Array:
    """`(B, K, ...)` presynaptic factors of `relation` as K arrays in its op's input layout, component first."""
    return in_input_layout(analysis, relation, jnp.swapaxes(x, 0, 1))


def in_input_layout(analysis, relation, rows: jax.Array) -> jax.Array:
    """`(..., B, I)` batch-first rows as arrays in the layout of `relation`'s op input."""
    shape = analysis.facts.contractions[relation.contraction].pre_var.aval.shape
    return to_input_layout(rows, shape, pre_batch_axis(analysis, relation))


def to_input_layout(x: jax.Array, shape, batch_axis: int | None) -> jax.Array:
    """`(..., B, I)` batch-first rows as arrays of the op input's `shape`, whose batch is at `batch_axis`."""
    lead = x.shape[:-2]
    if not batch_axis:
        return jnp.reshape(x, (*lead, *shape))
    rest = tuple(n for axis, n in enumerate(shape) if axis != batch_axis)
    rows = jnp.reshape(x, (*lead, shape[batch_axis], *rest))
    return jnp.moveaxis(rows, len(lead), len(lead) + batch_axis)


def batch_rows(x: jax.Array, batch: int, batch_axis: int | None) -> jax.Array:
    """An op-input-layout array as `(B, I)` rows, one per batch entry (the inverse of `to_input_layout`)."""
    return jnp.reshape(jnp.moveaxis(x, batch_axis, 0) if batch_axis else x, (batch, -1))


def pre_batch_axis(analysis, relation) -> int | None:
    """The axis of `relation`'s op input that is the batch: followed back through the step's layout ops
    (`_batch_axis_of`) to a batched state or input, else 0 when the leading axis has the batch's size;
    None when the model is unbatched or no axis can be told."""
    batch = analysis.batch_size
    if batch is None:
        return None
    var = analysis.facts.contractions[relation.contraction].pre_var
    shape = var.aval.shape
    captured = analysis.captured
    invars = captured.jaxpr.jaxpr.invars
    sources = set(invars[: captured.n_inputs]) | {
        invars[captured.n_inputs + i] for i, leaf in enumerate(captured.leaves) if leaf.batch_axis == 0
    }
    axis = _batch_axis_of(var, sources, producers(captured.jaxpr.jaxpr), depth=64)
    if axis is not None and shape[axis] == batch:
        return axis
    return 0 if shape and shape[0] == batch else None


def _batch_axis_of(var, sources: set, made_by: dict, depth: int) -> int | None:
    """The batch axis of `var`, followed back through transposes, slices that keep the batch whole and
    element-wise ops (through an operand of the output's shape) to a batched source (its axis 0)."""
    if var in sources:
        return 0
    eqn = made_by.get(var)
    if eqn is None or depth == 0:
        return None
    name, rule = eqn.primitive.name, lookup(eqn.primitive)
    if name == "transpose":
        inner = _batch_axis_of(eqn.invars[0], sources, made_by, depth - 1)
        return None if inner is None else eqn.params["permutation"].index(inner)
    if name == "slice":
        inner = _batch_axis_of(eqn.invars[0], sources, made_by, depth - 1)
        whole = inner is not None and eqn.invars[0].aval.shape[inner] == var.aval.shape[inner]
        return inner if whole else None
    if rule is not None and rule.family == "elementwise":
        for operand in eqn.invars:
            if not isinstance(operand, Literal) and operand.aval.shape == var.aval.shape:
                inner = _batch_axis_of(operand, sources, made_by, depth - 1)
                if inner is not None:
                    return inner
    return None


def update(analysis, plan, owner: int, members, values, d, f, traces: dict, signals, step):
    """New factors of `owner` and its `members` (`{key: factors}`) and, given `signals` = `(δ, δ_prev)`
    in the group layout, the op-layout cotangents `{(index, "now" or "prev"): (K, *op output)}`."""
    del step
    relations = analysis.relations
    batch, batched = _batch(analysis), analysis.batch_size is not None
    inputs = [
        batch_rows(
            derive.op_input(
                analysis.facts.contractions[relations[i].contraction].eqn,
                values.u[relations[i].contraction],
                traces[plan.key(i)]["pre"].dtype,
            ),
            batch,
            pre_batch_axis(analysis, relations[i]),
        )
        for i in members
    ]
    old = traces[plan.key(owner)]
    pres = [traces[plan.key(i)]["pre"] for i in members]
    d, f = jnp.reshape(d, (batch, -1, *d.shape[-2:])), jnp.reshape(f, (batch, -1, f.shape[-1]))
    # settle D and F once: else XLA fuses their derivation into every component's arithmetic and
    # recomputes it K·S times per neuron (measured: 3x the cost of the whole "low_rank" step)
    d, f, inputs = lax.optimization_barrier((d, f, inputs))
    if plan.factorisation == "matched":
        new_pres, post, extra = _matched_step(pres, old, inputs, d, f)
    else:
        metric = None
        if "metric" in old:
            group = analysis.group_named(relations[owner].group)
            g = [jnp.reshape(x, f.shape).astype(f.dtype) for x in derive.spike_sensitivities(analysis, group, values)]
            metric = carry_metric(jnp.reshape(old["metric"], (*f.shape, f.shape[-1])), d, g)
        new_pres, post, extra = _low_rank_step(pres, old, inputs, d, f, truncation_norm(analysis, plan, owner), metric)
        if metric is not None:
            extra["metric"] = jnp.reshape(metric, old["metric"].shape)
    new = {plan.key(i): {"pre": pre} for i, pre in zip(members, new_pres, strict=True)}
    new[plan.key(owner)].update(post=post, **extra)
    if signals is None:
        return new, {}
    cotangents = {}
    for which, delta, factors in (("now", signals[0], new[plan.key(owner)]), ("prev", signals[1], old)):
        if which == "prev" and not _reads_previous(analysis, relations[owner]):
            continue
        signal = state_sum(with_components(delta, batched), coefficients_of(plan, factors), range(delta.shape[-1]))
        for index in members:
            cotangents[(index, which)] = to_op_layout(analysis, relations[index], signal)
    return new, cotangents


def _reads_previous(analysis, relation) -> bool:
    from .structure import prev_read_states

    return bool(prev_read_states(analysis, analysis.group_named(relation.group)))


def to_op_layout(analysis, relation, signal: jax.Array) -> jax.Array:
    """`derive.to_op_layout` of every component of a `(B, K, ...)` group-layout signal: `(K, *op output)`."""
    first = jnp.swapaxes(signal, 0, 1)
    if analysis.batch_size is None:
        first = first[:, 0]  # the unit batch axis of an unbatched model
    return jax.vmap(lambda s: derive.to_op_layout(relation, s))(first)


def coefficients_of(plan, factors: dict) -> Post:
    """The postsynaptic coefficients `c_k` the presynaptic factors multiply: `G⁺ b` ("matched") or `R`."""
    if plan.factorisation == "low_rank":
        return factors["post"]
    return jnp.einsum("kl,bl...->bk...", _gram_pinv(factors["gram"]), factors["post"])


def _gram_pinv(gram: jax.Array) -> jax.Array:
    """`G⁺`, taken on the unit-diagonal rescaling of `G` (the filters' kernels differ in scale by orders)."""
    scale = jnp.sqrt(jnp.diagonal(gram))
    safe = jnp.where(scale > 0, scale, 1.0)
    unit = gram / (safe[:, None] * safe[None, :])
    inverse = jnp.linalg.pinv(unit, rtol=PINV_RTOL[np.dtype(gram.dtype)], hermitian=True)
    return jnp.where((scale > 0)[:, None] & (scale > 0)[None, :], inverse / (safe[:, None] * safe[None, :]), 0.0)


def _mixing(d: jax.Array) -> jax.Array:
    """`A_t` of the "matched" factors: the mean of `D_t` over the batch and the neurons, `(S, S)` (a seam
    for experiments: benchmarks/matched_diagonal.py keeps its diagonal only)."""
    return jnp.mean(d, axis=(0, 1))


def _matched_step(pres, old: dict, inputs, d, f):
    """One step of the "matched" factors: filters driven by the group's mean dynamics `A_t`. `d`
    `(B, P, S, S)`, `f` `(B, P, S)`, inputs `(B, I)`."""
    a = _mixing(d)  # (S, S), the same for every neuron
    new_pres = [jnp.einsum("kl,bli->bki", a, pre) + u[:, None] for pre, u in zip(pres, inputs, strict=True)]
    post = jnp.reshape(old["post"], (*old["post"].shape[:2], -1, old["post"].shape[-1]))  # (B, K, P, S)
    moved = derive.apply_d(d[:, None], post)
    post = jnp.einsum("kl,blps->bkps", a, moved) + f[:, None]
    gram = a @ old["gram"] @ a.T + jnp.ones_like(old["gram"])
    return new_pres, jnp.reshape(post, old["post"].shape), {"gram": gram, "mixing": a}


def carry_metric(metric: jax.Array, d: jax.Array, g) -> jax.Array:
    """`Dᵀ M D + Σ_g g gᵀ` per neuron: `metric` `(B, P, S, S)`, `d` `(B, P, S, S)`, each g `(B, P, S)` (the
    "spike" truncation's metric, written as broadcast products: S is a few states)."""
    n = d.shape[-1]
    md = functools.reduce(jnp.add, [metric[..., :, j, None] * d[..., j, None, :] for j in range(n)])
    moved = functools.reduce(jnp.add, [d[..., k, :, None] * md[..., k, None, :] for k in range(n)])
    return functools.reduce(jnp.add, [x[..., :, None] * x[..., None, :] for x in g], moved)


def _low_rank_step(pres, old: dict, inputs, d, f, norm: str = "plain", metric=None):
    """One step of the rank-r trace of every batch entry: the exact update, then the best rank-r truncation
    in the norm `norm` names (`RANK_METRICS`; `metric`, the per-neuron `M` `(B, P, S, S)`, for "spike").
    The arithmetic runs with each factor's own axis last (`(B, K, ·)`): batched matrix products that XLA
    vectorises well (with K innermost it ran 5x slower)."""
    sizes = [p.shape[-1] for p in pres]
    basis = jnp.concatenate(pres, axis=-1)  # (B, K, I)
    u = jnp.concatenate(inputs, axis=-1)
    post_shape = old["post"].shape
    batch, k, n_states = post_shape[0], post_shape[1], post_shape[-1]
    right = derive.apply_d(d[:, None], jnp.reshape(old["post"], (batch, k, -1, n_states)))
    right = jnp.reshape(right, (batch, k, -1))
    weigh = None
    if norm == "balanced":
        weigh = functools.partial(_balanced, n_states=n_states)
    elif norm == "spike":
        assert metric is not None, "the 'spike' norm is taken with its metric"
        weigh = functools.partial(_by_metric, metric=metric)
    basis, right, rotation = _extend_and_truncate(basis, right, u, jnp.reshape(f, (batch, -1)), weigh)
    cuts = np.cumsum([0, *sizes])
    new_pres = [basis[:, :, lo:hi] for lo, hi in itertools.pairwise(cuts)]
    return new_pres, jnp.reshape(right, post_shape), {"rotation": rotation}


def _extend_and_truncate(basis, right, u, f, weigh=None):
    """`(L, R, V)` after `L Rᵀ ← L Rᵀ + u Fᵀ` (R already moved by D; `L` `(B, K, I)` with orthonormal rows,
    `R` `(B, K, P·S)`) and the rank-r truncation; V `(B, r+1, r)` maps the extended basis `[L, ρ̂]` to the
    new one. With `weigh` (`_balanced`, `_by_metric`: `(moved, f, norm) -> (M moved, M f)`), the truncation
    is the best in the norm `‖X M^{1/2}‖` of that metric: the Gram matrix is taken in it, and V applied to
    the unscaled factors. The extended factors `[L, ρ̂]`, `[R + F pᵀ, |ρ| F]` are never
    concatenated: their Gram matrix is assembled from blocks and the rotation applied to each part (a
    concatenation cost as much as the rest of the step)."""
    dtype = np.dtype(basis.dtype)
    p = _project(basis, u)
    rho = u - _combine(p[:, :, None], basis)[:, 0]
    again = _project(basis, rho)  # a second Gram-Schmidt pass ("twice is enough")
    rho, p = rho - _combine(again[:, :, None], basis)[:, 0], p + again
    norm = jnp.linalg.norm(rho, axis=-1)
    new = norm > NEW_DIRECTION_RTOL[dtype] * jnp.linalg.norm(u, axis=-1)
    unit = jnp.where(new[:, None], rho / jnp.where(new, norm, 1.0)[:, None], 0.0)
    norm = jnp.where(new, norm, 0.0)
    moved = right + p[:, :, None] * f[:, None, :]  # (B, K, P·S); the new column is norm · f
    weighted_moved, weighted_f = (moved, f) if weigh is None else weigh(moved, f, norm)
    if weigh is not None:  # settled once: else XLA recomputes the metric's products in every entry's sum
        weighted_moved, weighted_f = lax.optimization_barrier((weighted_moved, weighted_f))
    # a product and a sum per component, not `_project`: as a batched matrix product XLA's CPU backend
    # first copied `f` into a (B, P·S, 1) operand, element by element (46 µs of a rank-2 step at B 64,
    # P·S 300); one sum over a broadcast `f` was slower on DMS's sizes (measured, docs/results.md)
    cross = jnp.stack([jnp.sum(weighted_moved[:, k] * f, axis=-1) for k in range(moved.shape[1])], 1) * norm[:, None]
    corner = (norm**2 * jnp.sum(weighted_f * f, axis=-1))[:, None, None]
    gram = jnp.concatenate(
        [
            jnp.concatenate([jnp.einsum("bkx,blx->bkl", weighted_moved, moved), cross[:, :, None]], axis=2),
            jnp.concatenate([cross[:, None, :], corner], axis=2),
        ],
        axis=1,
    )
    _, vectors = small_eigh.eigh(gram)
    k = basis.shape[1]
    # eigenvalues ascending: drop the smallest. Without a new direction the trace keeps its rank and the
    # basis stays as it is (the dropped vector is the empty new column: a tie among zero eigenvalues, as
    # when the trace is still zero, could otherwise drop a direction the credit chains still hold)
    keep = jnp.where(new[:, None, None], vectors[..., 1:], jnp.eye(k + 1, k, dtype=gram.dtype))
    basis = _combine(keep[:, :k], basis) + keep[:, k, :, None] * unit[:, None, :]
    right = _combine(keep[:, :k], moved) + (keep[:, k] * norm[:, None])[:, :, None] * f[:, None, :]
    return basis, right, keep


def _balanced(moved: jax.Array, f: jax.Array, norm: jax.Array, n_states: int) -> tuple[jax.Array, jax.Array]:
    """The "balanced" metric applied to the extended right factor's parts (`_state_weights`)."""
    weights = _state_weights(moved, f, norm, n_states)  # (B, P·S)
    return moved * weights[:, None, :], f * weights


def _by_metric(moved: jax.Array, f: jax.Array, norm: jax.Array, metric: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The "spike" metric `M` `(B, P, S, S)` applied per neuron to the right factor's parts (`moved`
    `(B, K, P·S)`, `f` `(B, P·S)`)."""
    del norm
    shape = metric.shape[:-1]
    weighted = derive.apply_d(metric[:, None], jnp.reshape(moved, (moved.shape[0], moved.shape[1], *shape[1:])))
    return jnp.reshape(weighted, moved.shape), jnp.reshape(derive.apply_d(metric, jnp.reshape(f, shape)), f.shape)


def _state_weights(moved: jax.Array, f: jax.Array, norm: jax.Array, n_states: int) -> jax.Array:
    """`(B, P·S)`: per batch entry, `1 / ‖ε_s‖²` on every entry of state s, `ε_s` the state-s block of the
    extended trace `[L, ρ̂] [moved, norm·f]ᵀ` (`L` orthonormal: `‖ε_s‖² = ‖moved_s‖² + norm²‖f_s‖²`); 0 for
    a block that is zero (or whose squared norm is under the dtype's smallest normal number). The metric
    of the "balanced" truncation. The sums over the neurons of a state, and the spreading back, are
    products with a 0/1 `(P·S, S)` matrix: as reductions over the middle axis of `(B, K, P, S)` they made
    the truncation step 1.6x slower (measured, B 64, K 4, 140 × 150 factors, process CPU time over 500
    steps: 0.143 against 0.097 s; plain 0.088 s)."""
    indicator = jnp.asarray(np.tile(np.eye(n_states), (f.shape[-1] // n_states, 1)), moved.dtype)
    per_entry = functools.reduce(jnp.add, [moved[:, k] * moved[:, k] for k in range(moved.shape[1])])
    squared = (per_entry + (norm**2)[:, None] * f * f) @ indicator  # (B, S)
    held = squared >= np.finfo(moved.dtype).tiny  # below the smallest normal number: 1/x would overflow
    weights = jnp.where(held, 1.0 / jnp.where(held, squared, 1.0), 0.0)
    return weights @ indicator.T


def _project(vectors: jax.Array, x: jax.Array) -> jax.Array:
    """`(B, K)`: each of the K vectors `(B, K, X)` dotted with `x` `(B, X)`, a batched matrix product (as a
    product and a sum, XLA's CPU backend ran the low-rank step 1.2-1.4x slower: measured beside
    `_combine`, process CPU time)."""
    return jnp.einsum("bkx,bx->bk", vectors, x)


def _combine(coefficients: jax.Array, vectors: jax.Array) -> jax.Array:
    """`(B, L, X)`: `Σ_k coefficients[:, k, l] · vectors[:, k]`, unrolled over the few components K (a
    batched matrix product with K ≤ rank + 1 as its inner dimension was the low-rank step's costliest op.
    Measured, the truncation step alone over 2,100 steps, process CPU time, medians of 7 interleaved:
    B 32, rank 2, 300 × 600 factors 0.29 -> 0.25 s; B 64, rank 4, 140 × 300 0.99 -> 0.67 s)."""
    terms = [coefficients[:, k, :, None] * vectors[:, k, None, :] for k in range(vectors.shape[1])]
    return functools.reduce(jnp.add, terms)


def chain_shape(analysis, plan, owner_index: int) -> tuple[int, ...]:
    group = analysis.group_named(analysis.relations[owner_index].group)
    return (_batch(analysis), n_components(analysis, plan, owner_index), *_units(analysis, group))


def chain_injection(analysis, plan, factors: dict, p: jax.Array, states) -> jax.Array:
    """`Σ_s p_s post_{k,s}` per component: what enters a credit chain from the owner's factors (under
    "matched" the chain carries the filters' moments of the chain's kernel, like `b`)."""
    return state_sum(with_components(p, analysis.batch_size is not None), factors["post"], states)


def chain_signal(analysis, plan, factors: dict, pulled: dict, q: dict) -> jax.Array:
    """`Σ_s pull(δ)_s · q_s` per component, as coefficients of the presynaptic factors: `G⁺ ...` ("matched":
    the chain's moments, fitted like the owner's own) or itself ("low_rank")."""
    batched = analysis.batch_size is not None
    signal = functools.reduce(jnp.add, [with_components(pulled[s], batched) * q[s] for s in pulled])
    if plan.factorisation == "low_rank":
        return signal
    return jnp.einsum("kl,bl...->bk...", _gram_pinv(factors["gram"]), signal)


def align_chains(analysis, plan, old: dict, new: dict) -> dict:
    """`old` with the credit-chain traces and postsynaptic factors carried into this step's components
    (`_rotate`), so that the chains advance in the basis the new presynaptic factors span."""
    aligned = dict(old)
    for node in plan.chains:
        owner = new.get(plan.key(node.owner), {})
        if "post" in owner:  # a chain of a weight kept per weight (an element-wise one) has no components
            aligned[node.key] = tuple(_rotate(plan, q, owner) for q in old[node.key])
    for index in plan.traced:
        key = plan.key(index)
        if "post" in new.get(key, {}):
            aligned[key] = {**old[key], "post": _rotate(plan, old[key]["post"], new[key])}
    return aligned


def _rotate(plan, components: jax.Array, factors: dict) -> jax.Array:
    """Components `(B, K, ...)` of last step carried into this step's: by the filters' mixing `A_t`
    ("matched": `b ← A_t (D b) + ...`, the chain's moments alike), or by the basis rotation `(B, K+1, K)`
    ("low_rank"; the part outside the new basis, the truncation's error, is dropped)."""
    if plan.factorisation == "matched":
        return jnp.einsum("kl,bl...->bk...", factors["mixing"], components)
    rotation = factors["rotation"]
    batch, k = components.shape[:2]
    flat = jnp.reshape(components, (batch, k, -1))
    return jnp.reshape(_combine(rotation[:, :k, :], flat), components.shape)


def dense_trace(analysis, plan, traces: dict, key: str, index: int, owner: int) -> jax.Array:
    """`Σ_k ε^u_k ⊗ c_k`: `(batch, n_pre, n_post, S)` (for a chain `key`, its states last). Tests and
    diagnosis only."""
    pre = traces[plan.key(index)]["pre"]  # (B, K, I)
    if key == plan.key(index):
        post = coefficients_of(plan, traces[plan.key(owner)])
    else:
        factors, q = traces[plan.key(owner)], dict(enumerate(traces[key]))
        ones = {s: jnp.ones(x.shape[:1] + x.shape[2:]) for s, x in q.items()}  # each state's chain alone
        post = jnp.stack([chain_signal(analysis, plan, factors, {s: ones[s]}, q) for s in q], axis=-1)
    batch, k = pre.shape[:2]
    post = jnp.reshape(post, (batch, k, -1, post.shape[-1]))
    return jnp.einsum("bki,bkns->bins", pre, post)
