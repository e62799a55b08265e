"""Model coverage: each construct of `tests/zoo_coverage.py` compiles, trains and is checked against BPTT.

Per model (float64, `STEPS` steps, loss Σ(o - TARGET)², the online estimate is Σ_t res.grads with the
parameters fixed — one-step windows, so the traces are exercised):

(a) it compiles under d_rtrl and es_d_rtrl with every batch size it lists (batch 2 unless upstream
    batches it wrongly; unbatched too for the event / sparse products and convolutions, whose unbatched
    primitives differ), and under e_prop with its first batch size where e_prop can differ from d_rtrl
    (see `E_PROP`);
(b) the summed gradient is finite, and every weight leaf BPTT moves gets a non-zero gradient or a
    diagnostic in `learner.explain(leaf)`; a diagnostic announcing a zero gradient is true;
(c) exact regime (a single hidden layer fed by inputs, no recurrent weight on the gradient path):
    d_rtrl equals BPTT to `RTOL_EXACT`, for every batch size the model is built with;
(d) approximate regime: cosine and norm ratio of d_rtrl against BPTT within the bounds of `BOUNDS`,
    and every weight whose d_rtrl gradient is not BPTT's says in its explanation that it is approximate.

Then targeted checks: sparse traces stay on the existing connections, a convolution's trace memory is
stated per output position, a per-neuron parameter gets an O(N) trace, and diagnostics name their cause.

BPTT is `brainstate.transform.grad` of the summed loss through `for_loop` on a twin model built by the
same factory (no fusetrace code); a model with a `while_loop` on its gradient path uses forward mode
(`jacfwd`), which JAX can differentiate through a while loop.
"""

import dataclasses
import functools

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fusetrace
import zoo
from fusetrace.errors import FusetraceError
from test_compile_exact import assert_matches
from test_no_silent_zeros import _loss
from zoo_coverage import APPROXIMATE, COVERAGE, ERROR_OR_APPROXIMATE, EXACT, MODELS

STEPS = 6
TARGET = 0.3
ALGORITHMS = ("d_rtrl", "es_d_rtrl", "e_prop")
RTOL_EXACT = 1e-6  # the acceptance bound; exact algebra gives ~1e-15 in float64
ZERO = 1e-12  # below this a float64 gradient norm counts as zero
SPARSE = ("fixed_prob_array", "csr_event", "csr_float")  # models with per-synapse sparse weights


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=zoo.DT)  # other test modules change the global dt


# --------------------------------------------------------------------------- running and references


@dataclasses.dataclass(frozen=True)
class Run:
    learner: fusetrace.Learner
    grads: dict  # Σ_t res.grads, shaped like learner.params


def _sequence(name: str, batch_size):
    spec = COVERAGE[name]
    case = spec.build(batch_size)
    return case, spec.sequence(case.inputs, STEPS)


def _online_sums(learners: tuple, xs: tuple) -> list:
    """Σ_t res.grads of each learner over the sequence `xs`, parameters fixed (one `lax.scan` each)."""

    def summed(learner):
        def body(state, x):
            state, res = learner.step(learner.params, state, x[0] if len(x) == 1 else x, TARGET)
            return state, res.grads

        _, grads = lax.scan(body, learner.init(), xs)
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)

    return [summed(learner) for learner in learners]


def _algorithms(name: str, batch_size) -> tuple[str, ...]:
    """The algorithms the tests run `name` with at `batch_size`."""
    listed = tuple(p.values[1] for p in _configurations() if p.values[0] == name and p.values[2] == batch_size)
    return listed or ALGORITHMS


@functools.cache
def _trained_together(name: str, batch_size) -> dict:
    """`{algorithm: Run or the exception it raised}` for every algorithm of `_algorithms`. The learners
    that compile are run in ONE jitted program (less compile time than one program each); when that
    fails, each is run alone so that a failure is charged to its own algorithm."""
    results, learners = {}, {}
    for algorithm in _algorithms(name, batch_size):
        case, xs = _sequence(name, batch_size)
        try:
            learners[algorithm] = fusetrace.compile(
                case.model, *case.inputs, loss=_loss, algorithm=algorithm, batch_size=batch_size
            )
        except Exception as error:
            results[algorithm] = error
    _, xs = _sequence(name, batch_size)
    try:
        sums = jax.jit(functools.partial(_online_sums, tuple(learners.values())))(xs)
        results.update({a: Run(learner, g) for (a, learner), g in zip(learners.items(), sums, strict=True)})
    except Exception:
        for algorithm, learner in learners.items():
            try:
                (grads,) = jax.jit(functools.partial(_online_sums, (learner,)))(xs)
                results[algorithm] = Run(learner, grads)
            except Exception as error:
                results[algorithm] = error
    return results


def trained(name: str, algorithm: str, batch_size) -> Run:
    """The compiled learner of `name` and its online gradient summed over `STEPS` steps (cached)."""
    result = _trained_together(name, batch_size)[algorithm]
    if isinstance(result, Exception):
        raise result
    return result


@functools.cache
def reference(name: str, batch_size) -> dict:
    """BPTT of the summed loss on a fresh twin of the model (forward mode where `reference='forward'`)."""
    case, xs = _sequence(name, batch_size)
    model = case.model
    weights = model.states(brainstate.ParamState)

    def sequence_loss():
        losses = brainstate.transform.for_loop(lambda *x: _loss(model.update(*x), TARGET), *xs)
        return jnp.sum(losses)

    if COVERAGE[name].reference == "forward":
        gradient = brainstate.transform.jacfwd(sequence_loss, grad_states=weights)
    else:
        gradient = brainstate.transform.grad(sequence_loss, weights)
    grads = brainstate.transform.jit(gradient)()  # one XLA program: faster than an eager gradient
    return {".".join(map(str, path)): value for path, value in grads.items()}


def leaves(grads: dict):
    """`(leaf path, mantissa)` for every weight leaf (a Linear's `{'weight', 'bias'}` gives two)."""
    for path, value in grads.items():
        flat, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=u.math.is_quantity)
        for keys, leaf in flat:
            suffix = "".join(f".{getattr(k, 'key', getattr(k, 'idx', k))}" for k in keys)
            yield path + suffix, np.asarray(u.get_mantissa(leaf))


def compared(run: Run, bptt: dict):
    """`(leaf path, online, bptt)` for every weight leaf, in params order."""
    online = dict(leaves(run.grads))
    return [(path, online[path], want) for path, want in leaves(bptt)]


# --------------------------------------------------------------------------- (a) + (b)


# e_prop is d_rtrl's trace with the recurrent presynaptic paths stop-gradiented: on a feed-forward
# (exact-regime) model there is nothing to stop and it runs d_rtrl's code, so it is compiled on the first
# model of every item and on every approximate model (recurrent cells, weight -> weight, mixing tails).
E_PROP = {next(s.name for s in MODELS if s.item == item) for item in {s.item for s in MODELS}} | {
    s.name for s in MODELS if s.regime == APPROXIMATE
}


def _configurations():
    for spec in MODELS:
        if spec.regime == ERROR_OR_APPROXIMATE:
            continue  # test_error_or_explained_approximation
        for index, batch_size in enumerate(spec.batch_sizes):
            algorithms = ALGORITHMS if index == 0 and spec.name in E_PROP else ("d_rtrl", "es_d_rtrl")
            for algorithm in algorithms:
                yield pytest.param(spec.name, algorithm, batch_size, id=f"{spec.name}-{algorithm}-b{batch_size}")


@pytest.mark.parametrize(("name", "algorithm", "batch_size"), list(_configurations()))
def test_trains_with_a_gradient_or_a_diagnostic(name, algorithm, batch_size):
    run = trained(name, algorithm, batch_size)
    for path, got, want in compared(run, reference(name, batch_size)):
        assert np.all(np.isfinite(got)), f"{path}: non-finite {algorithm} gradient"
        explanation = run.learner.explain(path)
        if np.linalg.norm(want) > ZERO and np.linalg.norm(got) <= ZERO:
            assert algorithm in explanation or "excluded" in explanation, (
                f"{path}: BPTT moves it ({np.linalg.norm(want):.3g}), {algorithm} gives zero with no "
                f"diagnostic:\n{explanation}"
            )
        if "zero gradient" in explanation:
            assert np.linalg.norm(got) <= ZERO, (
                f"{path}: the explanation announces a zero gradient but {algorithm} gives "
                f"{np.linalg.norm(got):.3g}:\n{explanation}"
            )


# --------------------------------------------------------------------------- (c) exact regime


@pytest.mark.parametrize(
    ("name", "batch_size"),
    [
        pytest.param(spec.name, b, id=f"{spec.name}-b{b}")
        for spec in MODELS
        if spec.regime == EXACT
        for b in spec.batch_sizes
    ],
)
def test_exact_regime_matches_bptt(name, batch_size):
    assert_matches(trained(name, "d_rtrl", batch_size).grads, reference(name, batch_size), RTOL_EXACT)


# --------------------------------------------------------------------------- (d) approximate regime

# (cosine >=, lo <= |online| / |bptt| <= hi) of d_rtrl against BPTT, for every weight leaf BPTT moves.
# Measured with 6 steps, batch 2 (cosine / norm ratio per leaf, readouts exact everywhere); "trunc" is BPTT
# truncated to one step (the same-step gradient), the floor a same-step treatment reaches:
BOUNDS = {
    # Wh.bias 0.949/0.788, Wh.weight 0.957/0.797, Wrz.bias 0.985/0.664, Wrz.weight 0.965/0.751 (per-gate
    # traces; the reset gate crosses Wh by its diagonal. Same-step only, Wrz was 0.961/0.266, 0.908/0.373)
    "gru": (0.9, 0.5, 2.0),
    # W.bias 0.986/0.923, W.weight 0.989/0.923 (per-gate traces; same-step only: 0.979/0.432, 0.969/0.462)
    "lstm": (0.95, 0.7, 1.5),
    # W.bias 0.544/1.347, W.weight 0.474/1.267 (= trunc: h reaches h only through W, so D = 0)
    "vanilla_rnn": (0.35, 0.8, 1.8),
    # Wf.bias 0.968/0.653, Wf.weight 0.944/0.693 (the forget gate crosses Wh by its diagonal; same-step only:
    # 0.964/0.578, 0.937/0.588), Wh.bias 0.969/0.969, Wh.weight 0.973/0.972
    "mgu": (0.9, 0.62, 2.0),
    # layers.0 0.949/0.187 (= trunc, weight -> weight); layers.1 exact
    "chained_linear": (0.85, 0.1, 1.5),
    # 0.816/0.145 (= trunc)
    "mean_subtraction": (0.7, 0.08, 1.5),
    # 0.977/0.154 (= trunc)
    "normalised": (0.85, 0.08, 1.5),
}


def test_every_approximate_model_has_bounds():
    assert set(BOUNDS) == {spec.name for spec in MODELS if spec.regime == APPROXIMATE}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_approximation_within_bounds(name):
    spec = COVERAGE[name]
    cosine_min, ratio_lo, ratio_hi = BOUNDS[name]
    batch_size = spec.batch_sizes[0]
    for path, got, want in compared(trained(name, "d_rtrl", batch_size), reference(name, batch_size)):
        if np.linalg.norm(want) <= ZERO:
            continue
        got_norm, want_norm = np.linalg.norm(got), np.linalg.norm(want)
        cosine = float(np.vdot(got, want) / (got_norm * want_norm)) if got_norm > 0 else 0.0
        ratio = float(got_norm / want_norm)
        assert cosine >= cosine_min, f"{path}: cosine {cosine:.3f} < {cosine_min}"
        assert ratio_lo <= ratio <= ratio_hi, f"{path}: norm ratio {ratio:.3f} outside [{ratio_lo}, {ratio_hi}]"


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_approximations_are_explained(name):
    """A d_rtrl gradient that is not BPTT's carries "approximat..." in its leaf's explanation."""
    spec = COVERAGE[name]
    batch_size = spec.batch_sizes[0]
    run = trained(name, "d_rtrl", batch_size)
    for path, got, want in compared(run, reference(name, batch_size)):
        if np.linalg.norm(got - want) <= RTOL_EXACT * np.linalg.norm(want):
            continue
        explanation = run.learner.explain(path)
        assert "approximat" in explanation.lower(), f"{path}: approximate with no word on it:\n{explanation}"


# --------------------------------------------------------------------------- diagnostics by their text

# (model, weight leaf, words its d_rtrl explanation must contain): what is approximated and why
DIAGNOSTICS = [
    # the reset gate reaches h through Wh (weight -> weight): name the weight it passes through
    ("gru", "cell.Wrz.weight.weight", ("cell.Wh.weight", "approximat")),
    ("mgu", "cell.Wf.weight.weight", ("cell.Wh.weight", "approximat")),
    ("chained_linear", "inp.comm.layers.0.weight.weight", ("inp.comm.layers[1].weight", "approximat")),
    # a tail that mixes neurons (mean over the neuron axis)
    ("mean_subtraction", "inp.comm.fc.weight.weight", ("non-element-wise", "approximat")),
    ("normalised", "inp.comm.fc.weight.weight", ("non-element-wise", "approximat")),
]


@pytest.mark.parametrize(("name", "path", "words"), DIAGNOSTICS, ids=[f"{n}-{p}" for n, p, _ in DIAGNOSTICS])
def test_diagnostic_names_its_cause(name, path, words):
    explanation = trained(name, "d_rtrl", COVERAGE[name].batch_sizes[0]).learner.explain(path)
    missing = [w for w in words if w not in explanation.lower() and w not in explanation]
    assert not missing, f"{path}: the explanation lacks {missing}:\n{explanation}"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", [spec.name for spec in MODELS if spec.regime == ERROR_OR_APPROXIMATE])
def test_error_or_explained_approximation(name, algorithm):
    """A weight inside a loop too long to unroll: either compiling fails with a four-part error that
    names the weight and the loop, or the model trains and each weight BPTT moves gets a finite, non-zero
    gradient whose explanation names the loop and says it is approximate."""
    batch_size = COVERAGE[name].batch_sizes[0]
    moved = [path for path, want in leaves(reference(name, batch_size)) if np.linalg.norm(want) > ZERO]
    try:
        run = trained(name, algorithm, batch_size)
    except FusetraceError as error:
        text = str(error)
        assert all(part in text for part in ("\n  where:", "\n  why:", "\n  fix:")), text
        assert "loop" in text and any(path in text for path in moved), text
        return
    for path, got, _ in compared(run, reference(name, batch_size)):
        if path not in moved:
            continue
        explanation = run.learner.explain(path)
        assert np.all(np.isfinite(got)) and np.linalg.norm(got) > ZERO, f"{path}: {explanation}"
        assert "loop" in explanation and "approximat" in explanation.lower(), explanation


# --------------------------------------------------------------------------- structure of the traces


def _avals(jaxpr):
    """Shapes of every value computed in `jaxpr` and in its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield from (tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
@pytest.mark.parametrize(
    ("name", "batch_size"), [(name, b) for name in SPARSE for b in COVERAGE[name].batch_sizes], ids=str
)
def test_sparse_traces_stay_on_existing_connections(name, batch_size, algorithm):
    """No trace and no intermediate of the fused step holds a dense n_pre x n_post array."""
    learner = trained(name, algorithm, batch_size).learner
    n_pre, n_post = 8, 12  # the sizes the sparse factories use
    for relation in learner.analysis.relations:
        leaf = learner.analysis.captured.leaves[relation.weight_leaf]
        assert int(np.prod(leaf.shape)) < n_pre * n_post, f"{relation.weight} is stored dense"
    dense = [s for s in _avals(learner.fused_jaxpr.jaxpr) if n_pre in s and n_post in s]
    assert not dense, f"dense n_pre x n_post values in the fused step: {sorted(set(dense))}"


@pytest.mark.parametrize("batch_size", [2, None])
@pytest.mark.parametrize("name", ["conv1d", "conv2d"])
def test_conv_trace_memory_is_per_output_position(name, batch_size):
    """The d_rtrl trace of a convolution holds one copy of the kernel per output position (not a dense
    n_pre x n_post trace), and the summary says so."""
    learner = trained(name, "d_rtrl", batch_size).learner
    analysis = learner.analysis
    ((relation,),) = [analysis.relations_of(leaf.path) for leaf in analysis.captured.leaves if leaf.role == "weight"]
    assert relation.status == "traced", analysis.explain(relation.weight)
    group = analysis.group_named(relation.group)
    kernel = analysis.captured.leaves[relation.weight_leaf]
    positions = int(np.prod(group.shape[:-1])) // (batch_size or 1)  # the neuron axis is positions x channels
    expected = (batch_size or 1) * positions * int(np.prod(kernel.shape)) * group.n_states * kernel.dtype.itemsize
    assert analysis.trace_bytes("d_rtrl") == expected
    allocated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(learner.init()["traces"]))
    assert allocated == expected
    assert "per output position" in learner.summary()


@pytest.mark.parametrize(("name", "path"), [("bias_current", "bias"), ("threshold", "N.theta")])
def test_per_neuron_parameter_gets_an_order_n_trace(name, path):
    """A learnable per-neuron parameter of shape (n,) (a bias current, a threshold) is traced per
    neuron: B x N x S under d_rtrl, beside the dense input weight's B x n_in x N x S."""
    learner = trained(name, "d_rtrl", 2).learner
    analysis = learner.analysis
    (relation,) = analysis.relations_of(path)
    assert relation.status == "traced", analysis.explain(path)
    group = analysis.group_named(relation.group)
    n_in, batch, itemsize = 6, 2, 8  # the factories' input size, the batch, float64
    per_neuron = batch * group.n_neurons * group.n_states * itemsize
    expected = per_neuron * (n_in + 1)
    assert analysis.trace_bytes("d_rtrl") == expected
    allocated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(learner.init()["traces"]))
    assert allocated == expected


def test_csr_models_use_the_batched_and_unbatched_primitives():
    """The CSR models really exercise both primitive variants (guards the factories, not fusetrace; the
    zoo's event models are checked in test_analyze_zoo)."""
    ops = {}
    for name in ("csr_event", "csr_float"):
        for batch_size in (2, None):
            analysis = trained(name, "d_rtrl", batch_size).learner.analysis
            ops[name, batch_size] = {r.op for r in analysis.relations if r.status == "traced"}
    assert ops == {
        ("csr_event", 2): {"binary_csrmm"},
        ("csr_event", None): {"binary_csrmv"},
        ("csr_float", 2): {"csrmm"},
        ("csr_float", None): {"csrmv"},
    }
