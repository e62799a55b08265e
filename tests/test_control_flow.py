"""Control flow inside a step: the simplify pass's exact rewrites and the cond / scan / while rules.

Tier 1: an if-converted `cond` and an unrolled `scan` compute the same values and the same forward-mode
derivatives as the original (`jax.jvp` of both jaxprs); what must stay whole stays whole; each rule's
claims (aligned / affine) hold on small programs, and a weight product hidden inside a loop is an error
that names the loop. Tier 2: small spiking models with a long `for_loop` or a `cond` that is kept whole,
d_rtrl against BPTT (exact regime: one input-fed layer, one-step windows, float64).
"""

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fusetrace
import zoo
import zoo_coverage
from fusetrace.capture import capture
from fusetrace.errors import UnsupportedPrimitiveError
from fusetrace.interpret import UNROLL_MAX_LENGTH, retrace
from fusetrace.passes.simplify import simplify
from fusetrace.propagate import propagate
from fusetrace.rules import ALIGNED_AFFINE
from fusetrace.rules.base import CONTROL
from references import state_grad

RTOL_F64 = 1e-12  # the same arithmetic, re-traced (float64)
RTOL_EXACT = 1e-6  # the acceptance bound for d_rtrl vs BPTT; observed ~1e-16
RNG = np.random.default_rng(0)
H = ("hidden", 0)


def _primitives(jaxpr) -> set:
    """Every primitive of `jaxpr`, inside sub-jaxprs too."""
    found = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive)
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    found |= _primitives(inner)
    return found


def _run(closed, *args):
    return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)


def _assert_same(fn, args, *, differentiable: tuple[int, ...]):
    """The simplified jaxpr of `fn` gives the same values and the same JVP (in the `differentiable`
    arguments) as the original; returns the simplified ClosedJaxpr."""
    closed = jax.make_jaxpr(fn)(*args)
    simple = retrace(closed, inline=True, fold=True)
    for got, want in zip(_run(simple, *args), _run(closed, *args), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL_F64)
    tangents = [jnp.asarray(RNG.normal(size=np.shape(a))) for a in args]

    def jvp(jaxpr):
        def f(*moving):
            full = list(args)
            for i, value in zip(differentiable, moving, strict=True):
                full[i] = value
            return _run(jaxpr, *full)

        return jax.jvp(f, [args[i] for i in differentiable], [tangents[i] for i in differentiable])[1]

    for got, want in zip(jvp(simple), jvp(closed), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL_F64, atol=RTOL_F64)
    return simple


# --------------------------------------------------------------------------- cond if-conversion


def _switch(index, x, w):
    return lax.switch(
        index,
        [lambda x, w: x @ w, lambda x, w: 2.0 * jnp.tanh(x) @ w, lambda x, w: jnp.full((4,), jnp.sum(x))],
        x,
        w,
    )


@pytest.mark.parametrize("index", [-1, 0, 1, 2, 7])  # lax.switch clamps out-of-range indices
def test_cond_holding_a_contraction_is_if_converted(index):
    args = (jnp.int32(index), jnp.asarray(RNG.normal(size=3)), jnp.asarray(RNG.normal(size=(3, 4))))
    simple = _assert_same(_switch, args, differentiable=(1, 2))
    assert lax.cond_p not in _primitives(simple.jaxpr)
    assert sum(e.primitive is lax.dot_general_p for e in simple.jaxpr.eqns) == 2  # lifted to the top level


@pytest.mark.parametrize("on", [True, False])
def test_two_branch_cond_and_pass_through_outputs(on):
    """Both branches of `lax.cond`; an output every branch passes through unchanged needs no select."""

    def fn(x, w, h):
        return lax.cond(jnp.sum(x) > 0.0, lambda x, w, h: (x @ w, h), lambda x, w, h: (jnp.zeros(4), h), x, w, h)

    x = jnp.asarray(RNG.uniform(0.1, 1.0, 3)) * (1.0 if on else -1.0)
    simple = _assert_same(fn, (x, jnp.asarray(RNG.normal(size=(3, 4))), jnp.ones(4)), differentiable=(0, 1, 2))
    assert simple.jaxpr.outvars[1] is simple.jaxpr.invars[2]
    assert sum(e.primitive is lax.select_n_p for e in simple.jaxpr.eqns) == 1


def test_conds_without_a_contraction_or_with_effects_stay_whole():
    def plain(x):
        return lax.cond(jnp.sum(x) > 0.0, lambda x: 2.0 * x, lambda x: x, x)

    def effectful(x, w):
        def loud(x, w):
            jax.debug.print("x = {}", x)
            return x @ w

        return lax.cond(jnp.sum(x) > 0.0, loud, lambda x, w: jnp.zeros(4), x, w)

    x = jnp.asarray(RNG.uniform(0.1, 1.0, 3))
    assert lax.cond_p in _primitives(_assert_same(plain, (x,), differentiable=(0,)).jaxpr)
    closed = jax.make_jaxpr(effectful)(x, jnp.ones((3, 4)))
    assert lax.cond_p in _primitives(retrace(closed, inline=True, fold=True).jaxpr)


# --------------------------------------------------------------------------- scan unrolling


def _scan(length, reverse):
    def fn(c, xs, k):
        def body(carry, x):
            a, b = carry
            a = 0.9 * a + k * x
            b = b + jnp.sin(a)
            return (a, b), (a * b, jnp.sum(a))

        return lax.scan(body, (c, 0.5 * c), xs, length=length, reverse=reverse)

    return fn


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [1, 5, UNROLL_MAX_LENGTH])
def test_short_scans_are_unrolled_exactly(length, reverse):
    args = (jnp.asarray(RNG.normal(size=3)), jnp.asarray(RNG.normal(size=(length, 3))), jnp.asarray(1.3))
    simple = _assert_same(_scan(length, reverse), args, differentiable=(0, 1, 2))
    assert lax.scan_p not in _primitives(simple.jaxpr)


def test_longer_scans_stay_whole():
    length = UNROLL_MAX_LENGTH + 1
    args = (jnp.ones(3), jnp.asarray(RNG.normal(size=(length, 3))), jnp.asarray(1.3))
    assert lax.scan_p in _primitives(_assert_same(_scan(length, False), args, differentiable=(0, 1, 2)).jaxpr)


def test_simplified_models_keep_their_values_and_lift_products():
    """cond_gate: the gated product is lifted out of the cond (both gate positions checked);
    loop_weight: the product repeated in each unrolled sub-step is merged into one."""
    for name, expected_products in (("cond_gate", 1), ("loop_weight", 1), ("for_loop_substeps", 1)):
        case = zoo_coverage.COVERAGE[name].build(2)
        captured = capture(case.model, *case.inputs, batch_size=2)
        simple = simplify(captured)
        assert not {lax.cond_p, lax.scan_p} & _primitives(simple.jaxpr.jaxpr), name
        assert sum(e.primitive is lax.dot_general_p for e in simple.jaxpr.jaxpr.eqns) == expected_products, name
        for scale in (1.0, 0.0):  # cond_gate's gate is open, then shut
            inputs = captured.strip_inputs(case.inputs[0] * scale)
            for got, want in zip(
                jax.tree.leaves(simple.step(inputs, simple.leaf_values())),
                jax.tree.leaves(captured.step(inputs, captured.leaf_values())),
                strict=True,
            ):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL_F64)


# --------------------------------------------------------------------------- rules


def _out_fact(fn, *args, facts=None):
    closed = jax.make_jaxpr(fn)(*args)
    in_facts = facts if facts is not None else [{H: ALIGNED_AFFINE}] + [{} for _ in args[1:]]
    result = propagate(closed.jaxpr, in_facts)
    return [result.of(v) for v in closed.jaxpr.outvars]


def test_while_predicate_reading_every_neuron_does_not_mix_them():
    """while_reset's loop: the predicate `any(v > 1.2)` reads all neurons but carries no derivative."""
    (fact,) = _out_fact(
        lambda v: lax.while_loop(lambda v: jnp.any(v > 1.2), lambda v: jnp.where(v > 1.2, v - 0.5, v), v),
        jnp.ones(4),
    )
    assert fact[H].aligned and not fact[H].affine  # the trip count depends on v: not affine


def test_while_with_a_source_free_predicate_keeps_affine():
    (_, fact) = _out_fact(
        lambda v: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, 0.5 * c[1]), (0, v)),
        jnp.ones(4),
    )
    assert fact == {H: ALIGNED_AFFINE}


def test_long_scan_carry_reaches_a_fixed_point():
    length = UNROLL_MAX_LENGTH + 8
    y = ("relation", 0)

    def fn(v, y, xs):
        return lax.scan(lambda v, x: (0.9 * v + y + x, 2.0 * v), v, xs, length=length)

    carry, ys = _out_fact(
        fn,
        jnp.ones(4),
        jnp.ones(4),
        jnp.ones((length, 4)),
        facts=[{H: ALIGNED_AFFINE}, {y: ALIGNED_AFFINE}, {("input", 0): ALIGNED_AFFINE}],
    )
    assert carry[H] == ALIGNED_AFFINE and carry[y] == ALIGNED_AFFINE
    assert not carry[("input", 0)].aligned  # a slice of xs is not in xs's layout
    assert ys[H] == ALIGNED_AFFINE  # stacked along a new leading axis


def test_cond_rule_joins_its_branches():
    (fact,) = _out_fact(
        lambda h, x: lax.cond(jnp.sum(x) > 0, lambda h: 2.0 * h, lambda h: h + 1.0, h),
        jnp.ones(4),
        jnp.ones(4),
        facts=[{H: ALIGNED_AFFINE}, {("input", 0): ALIGNED_AFFINE}],
    )
    assert fact[H].aligned and not fact[H].affine  # the branch taken depends on x
    (fact,) = _out_fact(lambda h: lax.cond(True, lambda h: 2.0 * h, lambda h: jnp.zeros(4), h), jnp.ones(4))
    assert fact == {H: ALIGNED_AFFINE}


def test_boolean_values_steer_without_mixing():
    """A predicate over every neuron selects per neuron without mixing; a mask chosen by a tracked value
    is never an affine coefficient."""
    select, masked = _out_fact(
        lambda h, r: (jnp.where(jnp.any(h > 0.5), h, 2.0 * h), r * (h > 0.5)),
        jnp.ones(4),
        jnp.ones(4),
        facts=[{H: ALIGNED_AFFINE}, {("hidden", 1): ALIGNED_AFFINE}],
    )
    assert select[H].aligned and not select[H].affine
    assert masked == {("hidden", 1): CONTROL, H: CONTROL}  # r stays aligned, but is not affine


def test_sources_entering_control_flow_are_recorded():
    closed = jax.make_jaxpr(lambda h, x: lax.while_loop(lambda v: jnp.sum(v) < 9.0, lambda v: v + x, 2.0 * h))(
        jnp.ones(4), jnp.ones(4)
    )
    result = propagate(closed.jaxpr, [{H: ALIGNED_AFFINE}, {("input", 0): ALIGNED_AFFINE}])
    (index,) = [i for i, e in enumerate(closed.jaxpr.eqns) if e.primitive is lax.while_p]
    assert result.inside == {("input", 0): [index], H: [index]}


WEIGHT = ("weight", 0)


@pytest.mark.parametrize(
    "construct, fn",
    [
        (
            "while_loop",
            lambda w, x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] + x @ w), (0, x @ w))[1],
        ),
        ("scan", lambda w, x: lax.scan(lambda c, _: (c + x @ w, None), x @ w, None, length=UNROLL_MAX_LENGTH + 1)[0]),
    ],
)
def test_a_weight_product_inside_a_loop_is_an_error_naming_it(construct, fn):
    closed = jax.make_jaxpr(fn)(jnp.ones((4, 4)), jnp.ones(4))
    with pytest.raises(UnsupportedPrimitiveError, match=construct):
        propagate(closed.jaxpr, [{WEIGHT: ALIGNED_AFFINE}, {}], on_contract=lambda *_: None)


# --------------------------------------------------------------------------- models, d_rtrl vs BPTT


class SubSteps(brainstate.nn.Module):
    """`n_sub` LIF sub-steps per step in a `for_loop`; the weight's product is computed before the loop."""

    def __init__(self, n_in, n, n_sub):
        super().__init__()
        self.n_sub = n_sub
        self.N = zoo._lif(n)
        self.fc = zoo._dense(n_in, n, scale=3.0)

    def update(self, x):
        current = self.fc(x)

        def substep(i):
            with brainstate.environ.context(dt=zoo.DT / self.n_sub):
                return self.N(current)

        return jnp.mean(brainstate.transform.for_loop(substep, jnp.arange(self.n_sub)), axis=0)


class ShrinkWhenAnyAbove(brainstate.nn.Module):
    """A `cond` without a contraction (kept whole) whose predicate reads every neuron's V."""

    def __init__(self, n_in, n):
        super().__init__()
        self.N = zoo._lif(n)
        self.fc = zoo._dense(n_in, n, scale=3.0)

    def update(self, x):
        spikes = self.N(self.fc(x))
        v = self.N.V.value.to_decimal(u.mV)
        self.N.V.value = brainstate.transform.cond(jnp.any(v > 0.5), lambda: 0.9 * v, lambda: v) * u.mV
        return spikes


def _loss(output, target):
    return jnp.sum((u.get_mantissa(output) - target) ** 2)


def _build(make, batch):
    zoo._begin(0)
    model = make()
    brainstate.nn.init_all_states(model, batch_size=batch)
    return model


@pytest.mark.parametrize(
    "make",
    [lambda: SubSteps(4, 5, UNROLL_MAX_LENGTH + 8), lambda: ShrinkWhenAnyAbove(4, 5)],
    ids=["long_for_loop", "kept_cond"],
)
def test_control_flow_left_whole_is_exact_under_d_rtrl(make):
    batch, steps = 2, 5
    xs = (jax.random.uniform(jax.random.PRNGKey(1), (steps, batch, 4)) < 0.6).astype(jnp.float64)
    learner = fusetrace.compile(_build(make, batch), xs[0], loss=_loss, algorithm="d_rtrl", batch_size=batch)
    step, params, state, online = jax.jit(learner.step), learner.params, learner.init(), None
    for x in xs:
        state, res = step(params, state, x, 0.3)
        online = res.grads if online is None else jax.tree.map(jnp.add, online, res.grads)
    model = _build(make, batch)
    weights = model.states(brainstate.ParamState)
    reference = state_grad(
        lambda: jnp.sum(brainstate.transform.for_loop(lambda x: _loss(model.update(x), 0.3), xs)), weights
    )
    got = np.asarray(u.get_mantissa(online["fc.weight"]["weight"]))
    want = np.asarray(u.get_mantissa(reference[("fc", "weight")]["weight"]))
    assert np.linalg.norm(want) > 0
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= RTOL_EXACT
