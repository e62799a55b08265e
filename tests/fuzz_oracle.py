"""The differential oracle: one generated model, every algorithm, against BPTT and the definitional references.

For a `fuzz_models.Spec` (float64, `spec.steps` steps, weights fixed; the online gradient is Σ_t of
`res.grads`):

1. BPTT through brainstate (`brainstate.transform.grad` of Σ_t loss over `for_loop`) on a twin model, with
   every spiking population's firing rate; a model whose spiking populations are silent or saturated is
   rejected (it would test nothing), and so is one whose hidden state overflows (the model diverges, read
   by the loss or not).
2. Per algorithm: `fusetrace.compile` either succeeds or raises a `FusetraceError` with the four-part
   message; anything else is a bug. A compiled learner runs the sequence (all algorithms in one jitted
   program); the step must not fail.
3. Per weight leaf, what `learner.report()` claims must hold: "exact" equals BPTT to `RTOL_EXACT`;
   "approximate" names its reason; a zero where BPTT moves the weight is reported approximate with a
   reason (`zero_diagnostics` records the explanations); every gradient is finite.
4. Where a definitional reference of tests/references.py applies (a single LIF/ALIF population, see
   `reference_shape`): d_rtrl equals masked brute-force RTRL, e_prop the BPTT of the stop-gradient graph,
   es_d_rtrl its naive formulas — to `RTOL_REFERENCE`.
5. The spec's extra invariant (`spec.check`): `jax.jit(step)` equals the eager step, a batch of one equals
   the unbatched model, or `learner.scan` over the sequence (its weight products deferred in chunks of a
   drawn length, some steps' loss masked out) equals a Python loop of jitted steps — to
   `RTOL_SAME`, each leaf relative to its own norm or, for a leaf under `SAME_FLOOR` of the largest,
   to that floor (such a leaf is a cancellation: a saturated tanh's `1 − tanh²` carries the two programs'
   rounding at 1e-5 of itself, first seen in a gated cell, fuzz seed 4).
6. In long runs (`FUSETRACE_FUZZ` set), a differential check between two algorithms: es_d_rtrl's
   "low_rank" factorisation with a rank that truncates nothing equals d_rtrl, credit chains included, to
   `RTOL_EXACT`, or is refused with the four-part message. The truncation's norm is drawn from the spec's
   seed (`RANK_METRICS`): it must not matter where nothing is truncated, and "spike" derives its metric
   from the model's spikes, wherever they are. (Not `RTOL_REFERENCE`: every step's truncation
   is an eigendecomposition of a Gram matrix with near-zero eigenvalues; one batch-of-one network of fuzz
   seed 11 measured 2.3e-7, all others ≤ 1e-11.)

`check_model(spec)` returns an `Outcome`; every broken promise is a string in `outcome.disagreements`.
"""

import dataclasses
import functools
import os

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fusetrace
import fuzz_models as fm
import references as ref
from fusetrace.errors import FusetraceError
from fusetrace.passes.components import RANK_METRICS

ALGORITHMS = ("d_rtrl", "e_prop", "es_d_rtrl")
RTOL_EXACT = 1e-6  # issue 15's bar for "exact" against BPTT (float64; exact algebra gives ~1e-14)
RTOL_REFERENCE = 1e-8  # issue 15's bar against the definitional references (both are the same algebra)
RTOL_SAME = 1e-9  # jit/eager, batch of one/unbatched, scan/loop: one computation, reassociated at most
SAME_FLOOR = 1e-6  # relative to the largest leaf: the smallest norm a leaf's RTOL_SAME is measured against
ZERO = 1e-12  # relative to the largest BPTT gradient, a leaf norm below this counts as zero
RATE_RANGE = (0.02, 0.8)  # spikes per neuron and step that make a spiking population worth testing
FOUR_PARTS = ("\n  where:", "\n  why:", "\n  fix:")
FULL_RANK = 10_000  # above every factor's n_pre: capped there, so "low_rank" truncates nothing
CHECK_FULL_RANK = os.environ.get("FUSETRACE_FUZZ", "0") != "0"  # long runs only (one more program per model)
# XLA's CPU compile dominates the fuzz's time; its backend optimisations change no value beyond rounding
# and cost about a third of it, so the oracle's own programs skip them.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------- data, loss, regulariser


def sequence(spec: fm.Spec, batch="spec") -> tuple[tuple, object]:
    """`(inputs, targets)`: inputs a tuple of `(T, [batch,] ...)` arrays (spikes, noise, clock) as the
    model's `update` takes them; targets a pytree with leading time axis shaped like the outputs."""
    batch = spec.batch if batch == "spec" else batch
    lead = (spec.steps,) if batch is None else (spec.steps, batch)
    rng = np.random.default_rng(spec.seed + 1)
    inputs = [jnp.asarray(rng.random((*lead, n)) < spec.input_rate, dtype=float) for n in spec.n_inputs]
    if spec.noise is not None:
        pop = spec.populations[spec.noise]
        inputs.append(jnp.asarray(0.3 * fm.SCALES[pop.kind].drive * rng.standard_normal((*lead, pop.size))))
    if spec.clock:
        inputs.append(jnp.arange(spec.steps) * fm.DT)
    targets = []
    for index in range(len(spec.readouts)):
        shape = (*lead, fm.output_size(spec, index))
        if spec.loss == "cross_entropy":
            labels = rng.integers(0, shape[-1], shape[:-1])
            targets.append(jax.nn.one_hot(labels, shape[-1], dtype=float))
        else:
            targets.append(jnp.asarray(0.3 * rng.standard_normal(shape)))
    target = _structure(spec, targets)
    if spec.loss == "window":
        target = (target, jnp.asarray(np.arange(spec.steps) >= spec.steps // 2, dtype=float))
    return tuple(inputs), target


def _structure(spec: fm.Spec, leaves: list):
    if spec.outputs == "tuple":
        return tuple(leaves)
    if spec.outputs == "dict":
        return {f"out{i}": leaf for i, leaf in enumerate(leaves)}
    return leaves[-1]


def make_loss(spec: fm.Spec):
    """The step loss `loss(output, target)` of `spec`: MSE, MSE times a window mask, or cross-entropy."""

    def loss(output, target):
        mask = 1.0
        if spec.loss == "window":
            target, mask = target
        outs = jax.tree.leaves(output, is_leaf=u.math.is_quantity)
        total = 0.0
        for out, want in zip(outs, jax.tree.leaves(target), strict=True):
            out = u.get_mantissa(out)
            if spec.loss == "cross_entropy":
                total = total - jnp.sum(want * jax.nn.log_softmax(out, axis=-1))
            else:
                total = total + jnp.sum((out - want) ** 2)
        return total * mask

    return loss


def regularizer(model: fm.FuzzNet):
    """A user's firing-rate penalty on every spiking population's new spikes."""
    total = 0.0
    for pop, neuron in zip(model.spec.populations, model.pops, strict=True):
        if pop.spiking:
            rate = jnp.mean(neuron.get_spike(), axis=-1)
            total = total + 0.5 * jnp.sum((rate - 0.1) ** 2)
    return total


def _step_input(inputs: tuple):
    return inputs[0] if len(inputs) == 1 else inputs


# --------------------------------------------------------------------------- BPTT


def bptt(spec: fm.Spec) -> tuple[dict, dict, bool]:
    """`({weight path: BPTT gradient}, {population index: spikes per neuron and step}, finite)` on a twin
    model, `finite` whether every hidden state stayed finite at every step."""
    model = fm.build(spec)
    inputs, target = sequence(spec)
    loss = make_loss(spec)
    weights = model.states(brainstate.ParamState)
    spiking = [k for k, p in enumerate(spec.populations) if p.spiking]

    def one_step(*args):
        *xs, y = args
        value = loss(model.update(*xs), y)
        if spec.regularizer:
            value = value + regularizer(model)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(u.get_mantissa(s.value))) for s in hidden]))
        return value, ([jnp.mean(model.pops[k].get_spike()) for k in spiking], finite)

    def total():
        losses, (rates, finite) = brainstate.transform.for_loop(one_step, *inputs, target)
        return jnp.sum(losses), ([jnp.mean(r) for r in rates], jnp.all(finite))

    hidden = list(model.states(brainstate.HiddenState).values())
    grads, (rates, finite) = brainstate.transform.jit(
        brainstate.transform.grad(total, weights, has_aux=True), compiler_options=FAST_COMPILE
    )()
    grads = {".".join(map(str, path)): value for path, value in grads.items()}
    rates = {k: float(r) for k, r in zip(spiking, rates, strict=True)}
    return grads, rates, bool(finite)


def firing_rates(spec: fm.Spec) -> dict:
    """`{population index: spikes per neuron and step}` of every spiking population, forward only."""
    model = fm.build(spec)
    inputs, _ = sequence(spec)
    spiking = [k for k, p in enumerate(spec.populations) if p.spiking]

    def one_step(*xs):
        model.update(*xs)
        return [jnp.mean(model.pops[k].get_spike()) for k in spiking]

    def run():
        return [jnp.mean(r) for r in brainstate.transform.for_loop(one_step, *inputs)]

    rates = brainstate.transform.jit(run, compiler_options=FAST_COMPILE)()
    return {k: float(r) for k, r in zip(spiking, rates, strict=True)}


def silent_or_saturated(rates: dict) -> str | None:
    """Why the model tests nothing (a spiking population outside `RATE_RANGE`), or None."""
    for k, rate in rates.items():
        if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
            kind = "silent" if rate < RATE_RANGE[0] else "saturated"
            return f"{kind}: population p{k} fires {rate:.3f} spikes per neuron and step"
    return None


# --------------------------------------------------------------------------- online gradients


def compile_learner(spec: fm.Spec, algorithm: str, batch="spec", **options):
    model = fm.build(spec, batch)
    inputs, target = sequence(spec, batch)
    x0 = tuple(jax.tree.map(lambda a: a[0], inputs))
    return fusetrace.compile(
        model,
        *x0,
        loss=make_loss(spec),
        algorithm=algorithm,
        batch_size=spec.batch if batch == "spec" else batch,
        regularizer=regularizer if spec.regularizer else None,
        example_target=jax.tree.map(lambda a: a[0], target),
        **options,
    )


def scan_sums(learners: tuple, inputs: tuple, target) -> list:
    """Σ_t res.grads of each learner over the sequence, weights fixed (one `lax.scan` per learner)."""

    def summed(learner):
        def body(state, xy):
            xs, y = xy
            state, res = learner.step(learner.params, state, _step_input(xs), y)
            return state, res.grads

        _, grads = lax.scan(body, learner.init(), (inputs, target))
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)

    return [summed(learner) for learner in learners]


def loop_sums(learner, inputs: tuple, target, step=None, mask=None):
    """Σ_t res.grads by a Python loop over `step` (default: `jax.jit(learner.step)`); with `mask`, the steps
    where it is False advance without a gradient (`gradient=False`) and add nothing."""
    if step is None:
        step = jax.jit(learner.step, static_argnames="gradient", compiler_options=FAST_COMPILE)
    state, total = learner.init(), None
    for t in range(len(inputs[0])):
        xs = tuple(x[t] for x in inputs)
        forms = mask is None or bool(mask[t])
        target_t = jax.tree.map(lambda a, t=t: a[t], target)
        if forms:
            state, res = step(learner.params, state, _step_input(xs), target_t)
            total = res.grads if total is None else jax.tree.map(jnp.add, total, res.grads)
        else:
            state, _ = step(learner.params, state, _step_input(xs), target_t, gradient=False)
    return total, state


def scan_plan(spec: fm.Spec) -> tuple[int, np.ndarray]:
    """`(chunk, loss mask)` of the scan_loop check, drawn from the spec's seed: a chunk length in 1..T and
    a mask with about a third of the steps left out (never all)."""
    rng = np.random.default_rng(spec.seed)
    chunk = int(rng.integers(1, spec.steps + 1))
    mask = rng.random(spec.steps) < 0.7
    mask[rng.integers(spec.steps)] = True
    return chunk, mask


def _fast_jit(function):
    return jax.jit(function, compiler_options=FAST_COMPILE)


def leaves(grads: dict) -> dict:
    """`{leaf path: mantissa}` for every weight leaf (a Linear's `{'weight', 'bias'}` gives two)."""
    found = {}
    for path, value in grads.items():
        flat, _ = jax.tree_util.tree_flatten_with_path(value, is_leaf=u.math.is_quantity)
        for keys, leaf in flat:
            suffix = "".join(f".{getattr(k, 'key', getattr(k, 'idx', k))}" for k in keys)
            found[path + suffix] = np.asarray(u.get_mantissa(leaf), dtype=float)
    return found


def relative(got, want) -> float:
    scale = max(np.linalg.norm(want), 1e-300)
    return float(np.linalg.norm(np.asarray(got) - np.asarray(want)) / scale)


# --------------------------------------------------------------------------- outcomes


@dataclasses.dataclass
class AlgorithmOutcome:
    """What one algorithm did with a model: "compiled", "refused" (a FusetraceError) or "crashed"."""

    status: str
    reason: str = ""
    exact: int = 0
    approximate: int = 0
    references: tuple[str, ...] = ()


@dataclasses.dataclass
class Outcome:
    """What the oracle found for one spec. `rejected`: why the model was not tested (silent network)."""

    spec: fm.Spec
    rates: dict = dataclasses.field(default_factory=dict)
    rejected: str | None = None
    algorithms: dict = dataclasses.field(default_factory=dict)
    disagreements: list = dataclasses.field(default_factory=list)
    zero_diagnostics: list = dataclasses.field(default_factory=list)
    checks: tuple[str, ...] = ()

    def disagree(self, text: str):
        self.disagreements.append(text)


def _error_summary(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"[:300]


def _four_part(error: BaseException) -> bool:
    """Whether a refusal's message has the four parts (what, where, why, fix)."""
    return all(part in str(error) for part in FOUR_PARTS)


def _compile_all(spec: fm.Spec, outcome: Outcome, algorithms: tuple[str, ...]) -> dict:
    learners = {}
    for algorithm in algorithms:
        try:
            learners[algorithm] = compile_learner(spec, algorithm)
        except FusetraceError as error:
            outcome.algorithms[algorithm] = AlgorithmOutcome("refused", _error_summary(error))
            if not _four_part(error):
                outcome.disagree(f"{algorithm}: refusal without the four-part message: {_error_summary(error)}")
        except Exception as error:  # anything but a FusetraceError is a bug
            outcome.algorithms[algorithm] = AlgorithmOutcome("crashed", _error_summary(error))
            outcome.disagree(f"{algorithm}: compile raised {_error_summary(error)}")
    return learners


def _run_all(spec: fm.Spec, learners: dict, outcome: Outcome) -> dict:
    """`{algorithm: Σ_t grads}`: all learners in one jitted program, one by one if that fails."""
    inputs, target = sequence(spec)
    try:
        sums = _fast_jit(functools.partial(scan_sums, tuple(learners.values())))(inputs, target)
        return dict(zip(learners, sums, strict=True))
    except Exception:
        pass
    found = {}
    for algorithm, learner in learners.items():
        try:
            (found[algorithm],) = _fast_jit(functools.partial(scan_sums, (learner,)))(inputs, target)
        except Exception as error:
            outcome.algorithms[algorithm] = AlgorithmOutcome("crashed", _error_summary(error))
            outcome.disagree(f"{algorithm}: the compiled step raised {_error_summary(error)}")
    return found


def _check_claims(algorithm: str, learner, online: dict, reference: dict, outcome: Outcome) -> AlgorithmOutcome:
    """Every leaf's gradient against what `learner.report()` says of it."""
    got_leaves, want_leaves = leaves(online), leaves(reference)
    scale = max([np.linalg.norm(w) for w in want_leaves.values()] + [1e-300])
    result = AlgorithmOutcome("compiled")
    if set(got_leaves) != set(want_leaves):
        outcome.disagree(f"{algorithm}: gradient leaves {sorted(got_leaves)} differ from BPTT's {sorted(want_leaves)}")
    for report in learner.report():
        if report.path not in got_leaves or report.path not in want_leaves:
            outcome.disagree(f"{algorithm}: report path {report.path} is not a weight leaf")
            continue
        got, want = got_leaves[report.path], want_leaves[report.path]
        if not np.all(np.isfinite(got)):
            outcome.disagree(f"{algorithm}: {report.path} has a non-finite gradient")
            continue
        moved = np.linalg.norm(want) > ZERO * scale
        if report.exact:
            result.exact += 1
            error = np.linalg.norm(got - want) / (np.linalg.norm(want) if moved else scale)
            if error > RTOL_EXACT:
                outcome.disagree(f"{algorithm}: {report.path} reported exact but differs from BPTT by {error:.3g}")
        else:
            result.approximate += 1
            if not report.why.strip():
                outcome.disagree(f"{algorithm}: {report.path} is approximate with no reason")
        if moved and np.linalg.norm(got) <= ZERO * scale:
            text = learner.explain(report.path)
            outcome.zero_diagnostics.append((algorithm, report.path, text))
            if report.exact or not report.why.strip():
                outcome.disagree(f"{algorithm}: {report.path} gets zero where BPTT moves it, undiagnosed:\n{text}")
    return result


# --------------------------------------------------------------------------- definitional references


def reference_shape(spec: fm.Spec) -> tuple[str, ...]:
    """The references of tests/references.py that apply to `spec`: "rtrl" and "e_prop" need one LIF/ALIF
    population fed by one input and its own previous spikes (presynaptic modules on the input only, no
    delay), readouts of its new values (or of a stateful readout's), and a loss of the outputs alone;
    "es_naive" further needs AlignPost projections through plain bias-free Linear comms and stateless
    readouts."""
    (pop, *others) = spec.populations
    if others or pop.kind not in ("lif", "alif") or pop.channels or len(spec.n_inputs) != 1:
        return ()
    if spec.noise is not None or spec.clock or spec.regularizer or spec.dropout or spec.control in ("cond", "scan"):
        # (the split step re-reads spikes from states, which a cond or loop on V changes after the spike; the
        # references' own calls would draw other dropout masks)
        return ()
    for readout in spec.readouts:
        if readout.read == "prev_spikes":
            return ()
        # a readout of a Linear readout's output: a weight -> weight path, which d_rtrl and e_prop cut by
        # design (reported approximate, "per-neuron traces do not cross another weight"); the references
        # carry credit through it
        if any(s.startswith("r") and spec.readouts[int(s[1:])].kind.startswith("linear") for s in readout.sources):
            return ()
    for proj in spec.projections:
        if proj.delay or (proj.source == "p0" and (proj.stp or proj.synapse.startswith("pre_"))):
            return ()
        if pop.param == "threshold" and proj.source == "p0" and proj.timing == "prev":
            # the learnable threshold enters the previous spikes the recurrent op reads this step: d_rtrl and
            # e_prop keep that path's diagonal (a gate read through a weight, reported approximate); the
            # references detach the recurrent spikes and cut it whole (fuzz seed 14; docs/reliability.md)
            return ()
    found = ("rtrl", "e_prop")
    plain = all(
        p.synapse.startswith("post_") and p.comm == "linear" and not p.stp and p.tie is None for p in spec.projections
    )
    stateless = all(r.kind in ("none", "linear", "linear_bias") for r in spec.readouts)
    if plain and stateless and pop.param == "none":
        found += ("es_naive",)
    return found


def _reference(name: str, spec: fm.Spec):
    (xs,), target = sequence(spec)
    loss, model, batch = make_loss(spec), fm.build(spec), spec.batch
    if name == "rtrl":
        groups, lti = model.groups()
        with ref.stop_recurrent(model):
            return ref.rtrl_reference(model, xs, target, loss, groups, lti, batch_size=batch)
    if name == "e_prop":
        return ref.bptt_grads_stopgrad(model, xs, target, loss, batch_size=batch)
    return ref.es_d_rtrl_naive(model, xs, target, loss, alpha=0.9, batch_size=batch)


REFERENCE_OF = {"d_rtrl": "rtrl", "e_prop": "e_prop", "es_d_rtrl": "es_naive"}


def _check_references(spec: fm.Spec, learners: dict, sums: dict, outcome: Outcome):
    applicable = reference_shape(spec)
    for algorithm, online in sums.items():
        name = REFERENCE_OF[algorithm]
        if name not in applicable:
            continue
        want = leaves(_reference(name, spec))
        got = leaves(online)
        scale = max([np.linalg.norm(w) for w in want.values()] + [1e-300])
        for path, value in want.items():
            error = np.linalg.norm(got[path] - value) / max(np.linalg.norm(value), ZERO * scale)
            if error > RTOL_REFERENCE:
                outcome.disagree(f"{algorithm}: {path} differs from the {name} reference by {error:.3g}")
        outcome.algorithms[algorithm].references += (name,)


# --------------------------------------------------------------------------- invariants


def _numbers(x) -> np.ndarray:
    """A leaf's numbers: a quantity's mantissa, a random key's data (dropout's key is part of the state)."""
    x = u.get_mantissa(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.extended):
        x = jax.random.key_data(x)
    return np.asarray(x, float)


def _close(a, b) -> float:
    """The largest relative difference between two pytrees' leaves (mantissas): each leaf's against its own
    norm, or against `SAME_FLOOR` times the largest leaf's norm when it is smaller than that."""
    leaves_a, leaves_b = (jax.tree.leaves(tree, is_leaf=u.math.is_quantity) for tree in (a, b))
    pairs = [(_numbers(x), _numbers(y)) for x, y in zip(leaves_a, leaves_b, strict=True)]
    floor = SAME_FLOOR * max((float(np.linalg.norm(y)) for _, y in pairs), default=0.0)
    worst = 0.0
    for x, y in pairs:
        if np.any(y):
            worst = max(worst, float(np.linalg.norm(x - y) / max(np.linalg.norm(y), floor, 1e-300)))
        elif np.any(x):
            worst = max(worst, float(np.linalg.norm(x)))
    return worst


def _check_invariant(spec: fm.Spec, learners: dict, sums: dict, outcome: Outcome):
    if spec.check == "none" or not sums:
        return
    order = ALGORITHMS[spec.seed % 3 :] + ALGORITHMS[: spec.seed % 3]
    algorithm = next(a for a in order if a in sums)
    learner, inputs, target = learners[algorithm], *sequence(spec)
    if spec.check == "jit_eager":  # one step from a state reached by two jitted steps (eager steps are slow)
        step = _fast_jit(learner.step)
        _, state = loop_sums(learner, tuple(x[:2] for x in inputs), jax.tree.map(lambda a: a[:2], target), step)
        x, y = _step_input(tuple(x[2] for x in inputs)), jax.tree.map(lambda a: a[2], target)
        eager, jitted = learner.step(learner.params, state, x, y), step(learner.params, state, x, y)
        error = _close(eager, jitted)
    elif spec.check == "scan_loop":  # Learner.scan (one lax.scan, deferred products) against a loop of steps
        chunk, mask = scan_plan(spec)
        scan = functools.partial(learner.scan, chunk=chunk)
        _, result = _fast_jit(scan)(learner.params, learner.init(), _step_input(inputs), target, loss_mask=mask)
        error = _close(result.grads, loop_sums(learner, inputs, target, mask=mask)[0])
    else:  # batch_one: the unbatched spec against a batch of one
        one = compile_learner(spec, algorithm, batch=1)
        (batched,) = _fast_jit(functools.partial(scan_sums, (one,)))(*sequence(spec, batch=1))
        error = _close(batched, sums[algorithm])
    outcome.checks += (f"{spec.check}:{algorithm}",)
    if error > RTOL_SAME:
        outcome.disagree(f"{algorithm}: {spec.check} differs by {error:.3g}")


def _check_full_rank(spec: fm.Spec, sums: dict, outcome: Outcome):
    """es_d_rtrl's "low_rank" at full rank against d_rtrl (item 6 of the module docstring)."""
    if not CHECK_FULL_RANK or "d_rtrl" not in sums or "es_d_rtrl" not in outcome.algorithms:
        return
    try:
        metric = RANK_METRICS[spec.seed % len(RANK_METRICS)]
        learner = compile_learner(spec, "es_d_rtrl", factorisation="low_rank", rank=FULL_RANK, rank_metric=metric)
    except FusetraceError as error:
        outcome.checks += ("full_rank_refused",)
        if not _four_part(error):
            outcome.disagree(f"es_d_rtrl low_rank: refused without the four-part message: {_error_summary(error)}")
        return
    (full,) = _fast_jit(functools.partial(scan_sums, (learner,)))(*sequence(spec))
    outcome.checks += ("full_rank",)
    error = _close(full, sums["d_rtrl"])
    if error > RTOL_EXACT:
        outcome.disagree(f"es_d_rtrl low_rank ('{metric}') at full rank differs from d_rtrl by {error:.3g}")


# --------------------------------------------------------------------------- one model


def check_model(spec: fm.Spec, algorithms: tuple[str, ...] = ALGORITHMS) -> Outcome:
    """Run the whole oracle on `spec` (see the module docstring), for `algorithms` (all by default)."""
    outcome = Outcome(spec)
    try:
        reference, outcome.rates, finite = bptt(spec)
    except Exception as error:  # the generator built something brainstate cannot run: fix the generator
        outcome.rejected = f"BPTT failed: {_error_summary(error)}"
        return outcome
    if not finite:  # the model itself diverges (an AdEx exponential overflows), read by the loss or not
        outcome.rejected = "not finite: the model's hidden state overflows"
        return outcome
    if not all(np.all(np.isfinite(g)) for g in leaves(reference).values()):
        outcome.rejected = "not finite: the BPTT gradient overflows"  # the model itself diverges
        return outcome
    outcome.rejected = silent_or_saturated(outcome.rates)
    if outcome.rejected:
        return outcome
    learners = _compile_all(spec, outcome, algorithms)
    sums = _run_all(spec, learners, outcome)
    for algorithm, online in sums.items():
        outcome.algorithms[algorithm] = _check_claims(algorithm, learners[algorithm], online, reference, outcome)
    _check_references(spec, learners, sums, outcome)
    _check_invariant(spec, learners, sums, outcome)
    _check_full_rank(spec, sums, outcome)
    return outcome
