"""The credit chains at one step: advance every chain node's trace and form its gradient terms.

Consumes: an `Analysis`, a `Plan` (its `chains`: `passes.chains.Node`s, parents first), the step's
values, the traces before and after this step's own updates, and (for gradients) the learning signals.
Produces the nodes' new traces and, per node that the loss reads, its gradient: a term for the owner's
weight (per-weight traces) or op-layout cotangents for every relation sharing the owner's factor
(es_d_rtrl; the weight product is taken once per relation by `fuse`).

The recursion and its exactness are in `passes.chains`. Per step, each stage's dynamics are reduced to
one `(S, S)` block `D̄_c` and one `S`-vector `F̄_c` per class of units: the class representative's
(exact classes), or the class mean weighted by the surrogate derivatives of the units' spikes (a
nonlinear or crowded group); a resolved node (`Node.resolved`) keeps each unit's own `D` and `F` and
enters the path's pullback of each unit at this step (`_advance_resolved`).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import components, derive, factorised
from .per_weight import contract, layout_of, per_state, used_trace
from .structure import state_structure

DERIVATIVES = "derivatives"
"""`cache[(DERIVATIVES, group name)]`: `(D, {relation index: F})` of a group at this step, where `fuse`
computed them for the group's own traces (relations whose op outputs enter the group summed share an F:
the key is `factorised.post_owner`'s)."""


def _mask(analysis, stage, unit_class: int, dtype) -> jax.Array:
    return jnp.asarray(stage.classes.masks[unit_class], dtype)


def _stage_factors(analysis, plan, values, stage, cache: dict) -> tuple[jax.Array, jax.Array]:
    """`(D̄, F̄)` of a stage: `(C, S, S)` and `(C, S)`, one block per class of units — the class
    representative's `D` and `F` for exact classes, else their mean over the class's units and the batch,
    each unit weighted by the surrogate derivative of its spikes (`derive.spike_relevance`): the dynamics
    of the neurons through which credit passes on at this step. `D` and `F` are the group's own traces'
    (`DERIVATIVES` in `cache`) where they hold the via's `F`."""
    key = (stage.group, stage.via)
    if key in cache:
        return cache[key]
    group = analysis.group_named(stage.group)
    d, f = _per_unit_factors(analysis, plan, values, stage, cache)
    batch, n_units = f.shape[:2]
    if stage.classes.exact:
        reps = jnp.asarray(stage.classes.representatives)
        cache[key] = (d[0, reps], f[0, reps])
        return cache[key]
    masks = jnp.stack([jnp.asarray(m.reshape(-1), d.dtype) for m in stage.classes.masks])  # (C, units)
    weights = jnp.ones((masks.shape[0], batch, n_units), d.dtype)
    relevance = derive.spike_relevance(analysis, group, values)
    if relevance is not None:  # a class none of whose neurons passes credit on keeps the plain mean
        relevance = jnp.reshape(relevance, (batch, n_units)).astype(d.dtype)
        passing = jnp.einsum("cu,bu->c", masks, relevance) > 0
        weights = jnp.where(passing[:, None, None], relevance[None], weights)
    counts = jnp.einsum("cu,cbu->c", masks, weights)
    cache[key] = (
        jnp.einsum("cu,cbu,bust->cst", masks, weights, d) / counts[:, None, None],
        jnp.einsum("cu,cbu,bus->cs", masks, weights, f) / counts[:, None],
    )
    return cache[key]


def _link_sensitivity(analysis, values, stage, group_name: str, cache: dict) -> jax.Array:
    """`∂link/∂h` of the stage's link w.r.t. the states of the group it reads, once per step."""
    key = ("sensitivity", stage.link, stage.link_new, group_name)  # shared by every chain with this link
    if key not in cache:
        group = analysis.group_named(group_name)
        cache[key] = derive.pre_sensitivity(analysis, stage.link, group, values, new=stage.link_new)
    return cache[key]


def _injection(analysis, plan, values, node, old, new, cache) -> jax.Array:
    """What enters the first stage: `P^A · ε` with the owner's trace (its new or previous value)."""
    owner = analysis.relations[node.owner]
    source = analysis.group_named(owner.group)
    traces = new if node.stage.link_new else old
    p = _link_sensitivity(analysis, values, node.stages[0], source.name, cache)  # (..., S_A)
    fact = analysis.facts.propagation.of(node.stages[0].link)
    kind = "new" if node.stages[0].link_new else "hidden"
    states = [s for s, leaf in enumerate(source.leaves) if (kind, leaf) in fact]  # others: ∂u/∂h ≡ 0
    if factorised.factorised(plan.algorithm, owner):
        return factorised.chain_injection(analysis, plan, traces[plan.key(node.owner)], p, states)
    layout = layout_of(analysis, owner, values)
    signal = dict(zip(states, per_state(p[..., states]), strict=True))
    total = contract(layout, signal, used_trace(plan, traces[plan.key(node.owner)]), states)
    assert total is not None, "a link reads at least one state of its group"
    if owner.elementwise:  # a parameter that also computes the link (a threshold in the spikes): ∂u/∂θ
        total = total + derive.param_sensitivity(analysis, values, node.stages[0].link, owner.weight_leaf)
    return total


def _stage_scalars(analysis, plan, values, stage, unit_class: int, cache: dict) -> tuple[list, list]:
    """`(F̄_c[s] for s, D̄_c[s, t] by s then t)` of a stage's class as scalars, split once per step."""
    key = ("scalars", stage.group, stage.via, unit_class)
    if key not in cache:
        with jax.named_scope("stage_factors"):
            d, f = _stage_factors(analysis, plan, values, stage, cache)
            n_states = f.shape[-1]
            flat = jnp.unstack(d[unit_class].reshape(-1))
            cache[key] = jnp.unstack(f[unit_class]), [flat[s * n_states : (s + 1) * n_states] for s in range(n_states)]
    return cache[key]


def advance(analysis, plan, values, old: dict, new: dict, cache: dict) -> dict:
    """`new` with every chain node's trace advanced: `q ← D̄_c q + F̄_c · In`, nodes parents first."""
    new = dict(new)
    nodes = {node.key: node for node in plan.chains}
    for node in plan.chains:
        if node.parent is None:
            with jax.named_scope("injection"):
                entering = _injection(analysis, plan, values, node, old, new, cache)
        else:
            parent = nodes[node.parent]
            source = new if node.stage.link_new else old
            entering = source[node.parent][parent.states.index(node.read_state[-1])]
        if node.resolved:
            new[node.key] = _advance_resolved(analysis, plan, values, node, entering, old, cache)
            continue
        f, d = _stage_scalars(analysis, plan, values, node.stage, node.unit_class[-1], cache)
        new[node.key] = _recursion(
            analysis, node, entering, old, lambda s, x, f=f: f[s] * x, lambda s, t, x, d=d: d[s][t] * x
        )
    return new


def _recursion(analysis, node, entering, old: dict, injected_term, carried_term) -> tuple:
    """A node's new trace, state by state: `q_s ← Σ_t D_st q_t + F_s · In` over the terms the group's
    structure keeps (`injected_term(s, In)`, `carried_term(s, t, q_t)`)."""
    previous = dict(zip(node.states, old[node.key], strict=True))
    reads, injected, _ = state_structure(analysis, analysis.group_named(node.stage.group), node.stage.source)
    out = []
    for s in node.states:
        total = injected_term(s, entering) if s in injected else jnp.zeros_like(entering)
        for t in reads[s]:
            if t in previous:
                total = total + carried_term(s, t, previous[t])
        out.append(total)
    return tuple(out)


def _advance_resolved(analysis, plan, values, node, entering, old: dict, cache: dict) -> tuple:
    """A resolved node's new trace (`Node.resolved`), one slice per unit `o` of its last stage (a trailing
    axis): `q_o ← D_o q_o + F_o · (C_o ⊙ In)`, with `D_o`, `F_o` the unit's own dynamics and `C_o` the
    unit's op output pulled back through the whole path at this step, the step the credit enters it."""
    times = _times(analysis, plan, values, node.owner)
    paths = _unit_paths(analysis, plan, values, node, entering.dtype, cache)  # (owner's group layout, U)
    entering = jax.vmap(lambda c: times(c, entering), in_axes=-1, out_axes=-1)(paths)
    d, f = _per_unit_factors(analysis, plan, values, node.stage, cache)
    if analysis.batch_size is None:
        d, f = d[0], f[0]
    return _recursion(
        analysis,
        node,
        entering,
        old,
        lambda s, x: _per_unit(analysis, node, times, f[..., s], x),
        lambda s, t, x: _per_unit(analysis, node, times, d[..., s, t], x),
    )


def _times(analysis, plan, values, owner_index: int):
    """`(c, q) -> c ⊙ q`: a signal in the owner's group layout times a trace laid out like the owner's
    (per weight, or the factorised owner's neuron layout)."""
    owner = analysis.relations[owner_index]
    if not factorised.factorised(plan.algorithm, owner):
        layout = layout_of(analysis, owner, values)
        return lambda c, q: layout.gather(c) * q
    if factorised.has_components(plan):
        batched = analysis.batch_size is not None
        return lambda c, q: components.with_components(c, batched) * q
    return lambda c, q: c * q


def _per_unit(analysis, node, times, x: jax.Array, q: jax.Array) -> jax.Array:
    """A resolved trace `q (..., U)` times `x (B, U)` (or `(U,)` unbatched): unit `o`'s slice scaled by
    `x[..., o]`, the same number for every element of a batch entry."""
    shape = analysis.group_named(analysis.relations[node.owner].group).shape
    batched = analysis.batch_size is not None

    def one(x_o, q_o):
        c = jnp.reshape(x_o, x_o.shape + (1,) * (len(shape) - 1)) if batched else x_o
        return times(jnp.broadcast_to(c, shape).astype(q_o.dtype), q_o)

    return jax.vmap(one, in_axes=(-1, -1), out_axes=-1)(x, q)


def _lead(analysis) -> tuple[int, ...]:
    """The batch axis of a group-layout array, as a shape prefix (empty unbatched)."""
    return () if analysis.batch_size is None else (analysis.batch_size,)


def _per_unit_factors(analysis, plan, values, stage, cache: dict) -> tuple[jax.Array, jax.Array]:
    """`(D, F)` of a stage's group, per unit: `(B, U, S, S)` and `(B, U, S)` (B = 1 unbatched) — the
    group's own traces' (`DERIVATIVES` in `cache`) where they hold the via's `F`."""
    key = ("unit factors", stage.group, stage.via)
    if key not in cache:
        group = analysis.group_named(stage.group)
        d, by_relation = cache.get((DERIVATIVES, stage.group), (None, {}))
        f = by_relation.get(factorised.post_owner(plan.algorithm, analysis.relations, stage.via))
        if d is None or f is None:
            d, (f,) = derive.transition_derivatives(analysis, group, [analysis.relations[stage.via]], values)
        batch, units = analysis.batch_size or 1, stage.classes.masks[0].size
        cache[key] = (jnp.reshape(d, (batch, units, *d.shape[-2:])), jnp.reshape(f, (batch, units, f.shape[-1])))
    return cache[key]


def _unit_paths(analysis, plan, values, node, dtype, cache: dict) -> jax.Array:
    """`C`: per unit `o` of a resolved node's last stage, a unit cotangent on its op output pulled back
    through every stage to the owner's group at this step — `(owner's group layout, U)`, the units pulled
    together (one vmapped map per stage)."""
    group = analysis.group_named(node.stage.group)
    units, lead = node.stage.classes.masks[0].size, _lead(analysis)
    eye = jnp.eye(units, dtype=dtype).reshape((units, *(1 for _ in lead), units))
    eye = jnp.broadcast_to(eye, (units, *lead, units))
    pulled = _pull(analysis, plan, values, node, ("units",), jnp.reshape(eye, (units, *group.shape)), cache, True)
    return jnp.moveaxis(pulled, 0, -1)


def _pull(analysis, plan, values, node, signal: tuple, cotangent: jax.Array, cache: dict, stacked=False) -> jax.Array:
    """The learning signal `cotangent` on the last stage's units, carried back through every stage to the
    values of the owner's group that the first link reads. `signal` names `cotangent` (a hashable key):
    each partial pull is named by what it is made of and computed once per step, so chains that share
    their last stages (other owners upstream, d_rtrl's several owners per group, the readout's pull to
    every population) share those pulls. `stacked`: `cotangent` holds several signals along a leading
    axis, each pulled alike (one vmapped map per stage)."""
    stages = node.stages
    last = stages[-1]
    key = ("pull", signal, last.via, node.unit_class[-1])
    c = _once(cache, key, lambda: cotangent * _mask(analysis, last, node.unit_class[-1], cotangent.dtype))
    for j in reversed(range(len(stages))):
        stage = stages[j]
        via = analysis.relations[stage.via]
        key = (key, "credit", stage.via)
        c = _once(
            cache,
            key,
            functools.partial(
                _apply, functools.partial(_to_input(analysis, plan, values, via, cache), via), c, stacked
            ),
        )
        key = (key, "link", stage.link)
        c = _once(cache, key, functools.partial(_apply, _to_link(analysis, values, stage, cache), c, stacked))
        if j > 0:
            before, read, unit_class = stages[j - 1], node.read_state[j], node.unit_class[j - 1]
            key = (key, "sensitivity", stage.link_new, read, before.via, unit_class)

            def scaled(c=c, stage=stage, before=before, read=read, unit_class=unit_class):
                p = _link_sensitivity(analysis, values, stage, before.group, cache)[..., read]
                return c * p * _mask(analysis, before, unit_class, c.dtype)

            c = _once(cache, key, scaled)
    return c


def _apply(linear_map, c: jax.Array, stacked: bool) -> jax.Array:
    return jax.vmap(linear_map)(c) if stacked else linear_map(c)


def _once(cache: dict, key, compute):
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _to_input(analysis, plan, values, via, cache: dict):
    """`(via, cotangent on its op output) -> cotangent on its input`: the op's VJP, traced once per step."""
    to_input = _once(
        cache,
        ("credit map", via.contraction),
        lambda: derive.credit_map(analysis, via.contraction, values, plan.feedback.get(via.contraction)),
    )
    return lambda via, cotangent: to_input(derive.to_op_layout(via, cotangent))


def _to_link(analysis, values, stage, cache: dict):
    """The pullback from the via's input to the stage's link (the previous group's values), traced once
    per step (a VJP at this step's values when the input mixes the neurons: `Stage.mixing`)."""
    pre_var = analysis.facts.contractions[stage.contraction].pre_var
    return _once(
        cache,
        ("pullback map", stage.link, pre_var),
        lambda: derive.pullback_map(analysis, values, stage.link, pre_var, linear=not stage.mixing),
    )


def gradients(analysis, plan, values, signals, old: dict, new: dict, step, cache: dict):
    """`(terms, cotangents)`: `[(relation index, gradient)]` of per-weight owners and `{(relation, "now" or
    "prev"): op-layout cotangent}` of factorised ones (see `factorised.es_update`), from every chain node
    the loss reads (its new values with `δ`, its previous ones with `δ_prev`)."""
    delta_new, delta_prev = signals
    terms, cotangents = [], {}
    for node in plan.chains:
        group = analysis.group_named(node.stage.group)
        for read, delta, traces in ((node.read, delta_new, new), (node.read_prev, delta_prev, old)):
            if not read:
                continue
            if node.resolved:
                _add_resolved_terms(
                    analysis, plan, values, node, read, delta, traces, traces is old, step, terms, cotangents
                )
                continue
            kind = "new" if traces is new else "previous"
            with jax.named_scope("pull"):
                pulled = {
                    s: _pull(analysis, plan, values, node, (kind, group.leaves[s]), delta[group.leaves[s]], cache)
                    for s in read
                }
            q = dict(zip(node.states, traces[node.key], strict=True))
            _add_terms(analysis, plan, values, node, pulled, q, traces, traces is old, step, terms, cotangents)
    return terms, cotangents


def _add_resolved_terms(analysis, plan, values, node, read, delta, traces, previous: bool, step, terms, cotangents):
    """A resolved node's gradient terms: its trace was pulled back where the credit entered, so the learning
    signal is read per unit, `Σ_s Σ_o δ_s[o] q_s[..., o]`, and paired with ones in the owner's layout."""
    group = analysis.group_named(node.stage.group)
    q = dict(zip(node.states, traces[node.key], strict=True))
    times = _times(analysis, plan, values, node.owner)
    per_unit = [
        _per_unit(analysis, node, times, jnp.reshape(delta[group.leaves[s]], (*_lead(analysis), -1)), q[s])
        for s in read
    ]
    total = functools.reduce(jnp.add, [_unit_sum(x) for x in per_unit])
    ones = jnp.ones(analysis.group_named(analysis.relations[node.owner].group).shape, total.dtype)
    _add_terms(analysis, plan, values, node, {0: ones}, {0: total}, traces, previous, step, terms, cotangents)


def _unit_sum(x: jax.Array) -> jax.Array:
    """`Σ_o x[..., o]` over a resolved node's units, one slice at a time: they are a small group's (at most
    `chains.RESOLVED_MAX_UNITS`, a readout's), and XLA's CPU backend ran the reduction over that short axis,
    fused with the product before it, at 0.3 ms a step (measured, GIF DMS network, rank 2: a sixth of
    the iteration)."""
    return functools.reduce(jnp.add, [x[..., o] for o in range(x.shape[-1])])


def _add_terms(analysis, plan, values, node, pulled, q, traces, previous: bool, step, terms, cotangents):
    owner = analysis.relations[node.owner]
    if not factorised.factorised(plan.algorithm, owner):
        layout = layout_of(analysis, owner, values)
        settled = lax.optimization_barrier([q[s] for s in pulled])
        terms.append((node.owner, layout.reduce([(pulled[s], e) for s, e in zip(pulled, settled, strict=True)])))
        return
    signal = factorised.chain_signal(analysis, plan, traces[plan.key(node.owner)], pulled, q)
    for index in plan.traced:
        relation = analysis.relations[index]
        if relation.elementwise or factorised.post_owner(plan.algorithm, analysis.relations, index) != node.owner:
            continue
        if previous:  # pairs with the previous presynaptic factor
            key, cotangent = (index, "prev"), factorised.prev_cotangent(analysis, plan, relation, signal, step)
        else:
            key, cotangent = (index, "now"), factorised.now_cotangent(analysis, plan, relation, signal, step)
        cotangents[key] = cotangent if key not in cotangents else cotangents[key] + cotangent
