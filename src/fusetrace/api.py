"""The public entry points and the one visible pipeline:
capture -> simplify -> step facts -> hidden groups -> relations -> graph (-> derive -> fuse)."""

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import brainstate
import brainunit as u
import equinox as eqx
import jax
import jax.numpy as jnp

from . import checks, sequence
from . import leaves as flat
from .analysis import Analysis
from .capture import capture, states_of
from .drawing import Drawing, build_drawing, to_dot
from .errors import CompileError, FusetraceError, four_part
from .graph import build_graph
from .naming import Names
from .passes import derive, event_product, events, factorised
from .passes.fuse import (
    DEFAULT_CREDIT_DEPTH,
    DEFAULT_LOOP_HOPS,
    DEFAULT_OWN_LOOP_HOPS,
    Plan,
    by_weight_leaf,
    fused_step,
    init_traces,
    make_plan,
)
from .passes.gates import split_gates
from .passes.hidden import find_groups
from .passes.relations import find_relations
from .passes.report import weight_reports
from .passes.simplify import simplify
from .program import ProgramSummary, summarize_program
from .stepfacts import step_facts


def analyze(
    model: brainstate.nn.Module,
    *example_inputs,
    batch_size: int | None = None,
    regularizer: Callable[[brainstate.nn.Module], Any] | None = None,
) -> Analysis:
    """Analyse one step of `model`: hidden groups, weight relations and the dependency graph.

    Arguments:
        model: a `brainstate.nn.Module` (e.g. built from brainpy.state parts). Its states are
            initialised with `batch_size` unless they already exist with that batch size.
        example_inputs: the arguments of one `model.update(...)` call; batched inputs carry the
            batch axis first.
        batch_size: the batch size, or None for unbatched states.
        regularizer: optional `regularizer(model) -> scalar` read right after the step (see `compile`).

    Returns:
        An `Analysis` with `.groups`, `.relations`, `.graph`, `.summary()`, `.to_dot()`, `.explain()`.

    Raises:
        UnsupportedPrimitiveError: a primitive without a rule lies on a hidden/weight path.
        NotNeuronAlignedError: a hidden state's update mixes neurons without a weight.
        CaptureError: the step cannot be traced.

    Examples:
        ```python
        analysis = fusetrace.analyze(net, x0)  # net: a brainstate.nn.Module, x0: one step's input
        print(analysis.summary())
        print(analysis.explain("inp.comm.weight"))
        ```
    """
    captured = split_gates(simplify(capture(model, *example_inputs, batch_size=batch_size, regularizer=regularizer)))
    try:
        facts = step_facts(captured)
        groups = find_groups(facts)
        relations = find_relations(facts, groups)
    except FusetraceError as error:  # the passes speak raw paths: say them as the user named them
        error.args = (Names.of(captured.leaves).translate(str(error)),)
        raise
    return Analysis(
        captured=captured, facts=facts, groups=groups, relations=relations, graph=build_graph(facts, groups, relations)
    )


_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plan -> its fused step's ProgramSummary


@dataclasses.dataclass(frozen=True, eq=False)
class _Snapshot:
    """Host-side values a Learner keeps as static data (hashed by identity)."""

    params: dict
    model: dict
    inputs: tuple[Any, ...]
    target: Any
    target_given: bool = False  # the target came from the user (so steps' targets are checked against it)


class StepResult(eqx.Module):
    """What `Learner.step` returns beside the new state.

    Attributes:
        output: the step's output, with units, as `model.update` returns it.
        loss: the step's scalar loss.
        grads: this step's gradient estimate, with the structure and units of `Learner.params`; None
            for a step taken with `gradient=False`.
    """

    output: Any
    loss: jax.Array
    grads: dict | None


class Learner(eqx.Module):
    """A compiled online learner: the model's step fused with its trace updates and gradient.

    `params`, `init()` and `step()` are pure; `graph`, `summary()`, `to_dot()` and `explain()` show
    the analysis and what the chosen algorithm does with each weight.
    """

    analysis: Analysis = eqx.field(static=True)
    plan: Plan = eqx.field(static=True)
    loss: Callable = eqx.field(static=True)
    param_paths: tuple[str, ...] = eqx.field(static=True)
    snapshot: _Snapshot = eqx.field(static=True)  # initial params and states; example inputs and target

    @property
    def algorithm(self) -> str:
        """The algorithm the learner was compiled with: "d_rtrl", "es_d_rtrl" or "e_prop"."""
        return self.plan.algorithm

    @property
    def params(self) -> dict:
        """`'.'.join(path)` of each ParamState -> its value (a pytree with units), as at compile time."""
        return dict(self.snapshot.params)

    def init(self) -> dict:
        """The initial state: the model's non-parameter states (as after `init_all_states`), zero traces
        and a step counter."""
        traces = init_traces(self.analysis, self.plan)
        return {"model": dict(self.snapshot.model), "traces": traces, "step": jnp.zeros((), jnp.int32)}

    @property
    def constants(self) -> dict:
        """The large arrays the compiled step closes over (a connectome's CSR indices and, for
        es_d_rtrl, their row index; those of at least 64 KiB), as `{"step": (...), "csr_rows": (...)}`.

        `jax.jit` embeds what a function closes over in the program it compiles, and XLA may copy and
        fold it while compiling: a 15-million-connection graph then costs its size several times over.
        Pass them as an argument instead and hand them to `step(..., constants=...)`:

        ```python
        run = jax.jit(lambda params, state, consts, x, y: learner.step(params, state, x, y, constants=consts))
        state, res = run(learner.params, state, learner.constants, x, y)
        ```
        """
        return self.analysis.constants()

    def step(
        self, params: dict, state: dict, x_t, target_t, *, gradient: bool = True, constants: dict | None = None
    ) -> tuple[dict, StepResult]:
        """Advance the network and its traces one step; return the new state and this step's result.

        Arguments:
            params: the structure of `Learner.params`.
            state: as returned by `init()` or a previous `step`.
            x_t: this step's input (a tuple when `model.update` takes several arguments).
            target_t: whatever `loss` takes as its second argument.
            gradient: False advances the states and traces without forming a gradient (`grads` is None):
                for steps whose loss is identically zero, such as those between the read-outs of a
                sparse loss, where the result is the same and the step costs about a forward step plus
                the O(N) trace update. A Python bool: under `jax.jit` mark it static
                (`jax.jit(learner.step, static_argnames="gradient")`).
            constants: `Learner.constants` (or arrays of its structure, shapes and dtypes), typically
                an argument of the caller's `jax.jit`, used in place of the step's own; None: the
                step's own, which `jax.jit` embeds in the compiled program.

        Returns:
            The new state (the structure of `init()`) and a `StepResult` with this step's output, loss and
                gradient.

        Raises:
            InputError: `x_t` (or `target_t`, when compiled with `example_target`) differs from the example
                in structure, shape, dtype kind or unit (checked while tracing: free under `jax.jit`).
        """
        new_state, result, _ = self._step(params, state, x_t, target_t, gradient=gradient, constants=constants)
        return new_state, result

    def _step(self, params, state, x_t, target_t, *, gradient=True, constants=None, defer=False):
        """`step`, and with `defer` es_d_rtrl's weight products left out of `grads` and returned apart (see
        `fuse.fused_step`) for `Learner.scan` to contract over many steps at once."""
        checks.check_step(self.snapshot, self.analysis.captured.batch_size, x_t, target_t)
        analysis = self.analysis if constants is None else self.analysis.with_constants(constants)
        captured = analysis.captured
        inputs = captured.strip_inputs(*(x_t if len(self.snapshot.inputs) > 1 else (x_t,)))
        leaves = flat.leaves_from(captured, params, state["model"])
        weights = {leaf: leaves[leaf] for leaf in flat.weight_leaves(captured)}

        new_leaves, traces, outputs, loss, grads = fused_step(
            analysis,
            self.plan,
            lambda out_leaves: self.step_loss(out_leaves, target_t),
            weights,
            leaves,
            state["traces"],
            state["step"],
            inputs,
            gradient=gradient,
            defer=defer,
        )
        products = {}
        if defer:
            grads, products = grads
        new_state = {
            "model": flat.states_from(captured, new_leaves, state["model"]),
            "traces": traces,
            "step": state["step"] + 1,
        }
        grads = None if grads is None else flat.grads_like(captured, params, grads)
        return new_state, StepResult(captured.wrap_outputs(outputs), loss, grads), products

    def _contract(
        self,
        params: dict,
        state: dict,
        x_t,
        products: dict,
        start: dict,
        into: dict,
        constants: dict | None = None,
    ) -> dict:
        """`into` (a gradient sum like `params`) plus the gradient of es_d_rtrl's weight products over a
        stack of steps: `products` as `_step(..., defer=True)` returns them, stacked on a leading time axis;
        one contraction each (the event-driven contraction of a weight used as it is adds its part to `into`
        in place). `start`: the traces before the stack's first step (the event-driven contraction reads
        them)."""
        analysis = self.analysis if constants is None else self.analysis.with_constants(constants)
        captured = analysis.captured
        inputs = captured.strip_inputs(*(x_t if len(self.snapshot.inputs) > 1 else (x_t,)))
        leaves = flat.leaves_from(captured, params, state["model"])
        values = derive.forward(analysis, inputs, leaves)
        terms = []
        for (index, _), (pre, cot) in products["pairs"].items():
            relation = analysis.relations[index]
            pre, cot = factorised.per_step_products(analysis, self.plan, relation, pre, cot)  # components: more steps
            terms.append((index, derive.weight_vjp_over_time(analysis, relation.contraction, values, pre, cot)))
        given = flat.leaves_from(captured, into, state["model"])
        sums = {leaf: given[leaf] for leaf in flat.weight_leaves(captured)}
        for index, masks in products["inputs"].items():  # event by event (`passes.events`)
            now, prev = (products["events"].get((index, kind)) for kind in ("now", "prev"))
            first = start[self.plan.key(index)]["pre"]
            relation = analysis.relations[index]
            if relation.transformed:  # to the weights through the transforms' VJP, with the other terms
                terms.append((index, events.contract(analysis, self.plan, index, values, first, masks, now, prev)))
            else:
                leaf = relation.weight_leaf
                sums[leaf] = events.contract(analysis, self.plan, index, values, first, masks, now, prev, sums[leaf])
        return flat.grads_like(captured, params, by_weight_leaf(analysis, values, sums, terms))

    def scan(
        self, params: dict, state: dict, xs, targets, *, loss_mask=None, constants: dict | None = None, chunk=None
    ):
        """Run `step` over a whole sequence in one `lax.scan`; return the final state and a `ScanResult`.

        Arguments:
            params: as for `step`.
            state: as for `step`: the state the sequence starts from.
            xs: the inputs of every step, time first (`x_t = xs[t]`; a tuple when `model.update` takes
                several arguments).
            targets: what `loss` takes at every step, time first.
            loss_mask: optional, one value per step: where it is 0 (or False) the step's loss forms no
                gradient (the step advances the states and traces only; its loss is still reported).
            constants: as for `step`.
            chunk: es_d_rtrl's weight products are contracted once per `chunk` steps (deferred
                contraction, `fusetrace.sequence`); default: as many steps as keep the buffer of deferred
                factors under 256 MiB (`summary()` shows a step's share), at most 64 with a `loss_mask`
                (whose steps before the first and after the last that form a gradient advance alone and
                are not buffered), or no deferral for an unbatched learner whose products are all binary
                CSR products that cannot be contracted event by event (`fusetrace.passes.events`;
                deferring them as pairs of factors is slower there); 0: no deferral, each step that forms a
                gradient takes its own products.

        Returns:
            `(state, result)`: `result.output` and `result.loss` stacked over time, `result.grads` the sum
            of the per-step gradients (equal to summing `step`'s), with the structure of `params`.

        Raises:
            CompileError: the sequence's leaves differ in length, or `loss_mask` has the wrong shape.

        Examples:
            ```python
            run = jax.jit(learner.scan, donate_argnums=1)
            state, result = run(learner.params, learner.init(), xs, ys)   # xs: (T, batch, n_in)
            ```
        """
        return sequence.scan(self, params, state, xs, targets, loss_mask=loss_mask, constants=constants, chunk=chunk)

    def step_loss(self, out_leaves, target_t) -> jax.Array:
        """One step's loss from the captured step's output leaves: `loss(output, target_t)`, plus the
        regulariser's value when the learner was compiled with one."""
        captured = self.analysis.captured
        value = checks.loss_value(self.loss(captured.wrap_outputs(out_leaves), target_t))
        return value + out_leaves[-1] if captured.regularized else value

    @property
    def fused_jaxpr(self):
        """The fused step as one jaxpr (dynamics, derivatives, trace updates, gradient)."""
        inputs = self.snapshot.inputs
        x = inputs[0] if len(inputs) == 1 else inputs
        return jax.make_jaxpr(self.step)(self.params, self.init(), x, self.snapshot.target)

    @property
    def graph(self):
        """The dependency graph of the analysis (a frozen networkx `DiGraph`; schema in `fusetrace.graph`)."""
        return self.analysis.graph

    def program_summary(self) -> ProgramSummary:
        """The fused step by part (forward dynamics, learning signal, D and F derivatives, trace updates,
        credit traces, same-step gradients, gradient contraction): equations, and estimated FLOPs and bytes
        per step (`fusetrace.program`). Traced once per compiled learner; `print` it for a table."""
        if self.plan not in _PROGRAMS:
            _PROGRAMS[self.plan] = summarize_program(self.fused_jaxpr)
        return _PROGRAMS[self.plan]

    def summary(self, program: bool = True) -> str:
        """The analysis summary, then the algorithm and, for every weight: what it gets (trace, same-step
        gradient, ...), its trace shapes and bytes, exact or approximate, and why; with `program`, the fused
        step by part (`program_summary`, which traces the step once)."""
        lines = [self.analysis.summary(), f"algorithm: {self.algorithm}", "per weight:"]
        lines += [f"  {report.line()}" for report in self.report()]
        lines.append(f"traces of this learner: {self.trace_bytes()} bytes{factorised.memory_note(self.plan)}")
        per_step = sequence.deferred_bytes(self)
        if per_step and not sequence.deferral_pays(self):
            lines.append(
                "Learner.scan: weight products taken step by step by default (unbatched binary CSR products: "
                f"deferring them is slower); chunk=k defers them, {per_step} bytes of factors per step"
            )
        elif per_step:
            chunk = max(1, sequence.DEFERRED_BYTES // per_step)
            lines.append(
                f"Learner.scan: weight products deferred, {per_step} bytes of factors per step, contracted once "
                f"per chunk of up to {chunk} steps ({sequence.DEFERRED_BYTES >> 20} MiB; with a loss mask, up to "
                f"{min(chunk, sequence.MASKED_CHUNK)} steps of the span from its first to its last learning step)"
            )
            driven = sequence.event_driven(self)
            if driven:
                lines.append(
                    "  event by event (one pass over the connections per chunk, then the outgoing connections "
                    f"of each step's spikes): {', '.join(f'`{name}`' for name in driven)}"
                )
        spiking = self._event_products()
        if spiking:
            lines.append(
                "forward products formed from their non-zero inputs on the CPU, at steps where at most "
                f"{event_product.DENSITY:.0%} are non-zero (`passes.event_product`): "
                + ", ".join(f"`{name}`" for name in spiking)
            )
        if program:
            lines += ["", str(self.program_summary()).rstrip("\n")]
        return "\n".join(lines) + "\n"

    def _event_products(self) -> list[str]:
        """The weights whose `x @ W` the fused forward may form from the non-zeros of `x` (off a mesh)."""
        contractions = self.analysis.facts.contractions
        names = [
            relation.weight
            for relation in self.analysis.relations
            if relation.contraction is not None and event_product.eligible(contractions[relation.contraction])
        ]
        return list(dict.fromkeys(names))

    def trace_bytes(self) -> int:
        """Bytes of the traces `init()` allocates, for this learner's algorithm and options (a factorisation's
        K pairs of factors, credit chains and the factors' bookkeeping included)."""
        shapes = jax.eval_shape(lambda: self.init()["traces"])
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

    def drawing(self, title: str = "") -> Drawing:
        """The drawing: groups as boxes holding their states, each weight an arrow labelled with its name
        and op and coloured by what this learner gives it (exact / approximate / same-step / none)."""
        return build_drawing(self.analysis, self.report(), title=title)

    def draw(self, path, title: str = "") -> str:
        """Write the drawing to `path` (`.svg` or `.png`); Graphviz when its `dot` program is on PATH, else a
        layered matplotlib layout. Returns the engine used ("dot" or "matplotlib")."""
        from . import plots  # matplotlib is loaded only to draw

        return plots.draw(self.drawing(title), path)

    def to_dot(self) -> str:
        """The drawing in Graphviz dot syntax (render it with `dot -Tsvg`)."""
        return to_dot(self.drawing())

    def report(self) -> tuple:
        """One `WeightReport` per weight leaf: its treatment, trace shapes and bytes, whether its gradient
        is exact (equal to BPTT's) and why. `path` is the raw leaf path, `name` the user's name."""
        names = self.analysis.names
        return tuple(
            dataclasses.replace(report, name=names.name_of(report.path), why=names.translate(report.why))
            for report in weight_reports(self.analysis, self.plan)
        )

    def explain(self, path: str) -> str:
        """What fusetrace does with the state or weight at `path` (a name such as `I.V`, or a raw path), and
        why, including the algorithm's notes."""
        text = self.analysis.explain(path)
        raw = self.analysis.path_of(path)
        reports = [r for r in self.report() if r.path == raw or r.path.startswith(raw + ".")]
        return text + "".join(f"  {self.algorithm}: {report.line()}\n" for report in reports)

    def with_names(self, tree: dict) -> dict:
        """`tree` with its state keys written as the user's names, for reading: `learner.params` (or a
        gradient like it), or a state from `init()` / `step` (its `"model"` dict renamed). The learner
        itself keeps raw paths as keys; this copy is for printing, e.g.
        `equinox.tree_pprint(learner.with_names(state), short_arrays=True)`.
        """
        names = self.analysis.names
        if "model" in tree and isinstance(tree["model"], dict):
            return {**tree, "model": {names.name_of(k): v for k, v in tree["model"].items()}}
        return {names.name_of(k): v for k, v in tree.items()}

    def __repr__(self) -> str:
        weights = ", ".join(self.analysis.names.name_of(path) for path in self.param_paths)
        groups = ", ".join(self.analysis.names.group(g.name) for g in self.analysis.groups)
        return f"Learner(algorithm={self.algorithm!r}, groups=[{groups}], params=[{weights}])"

    def _repr_html_(self) -> str:
        from . import display, plots

        tables = [
            display.html_table(display.group_rows(self.analysis), "hidden groups"),
            display.html_table(display.report_rows(self.report()), f"per weight ({self.algorithm})"),
            display.html_table(display.memory_rows(self.analysis.trace_memory()), "trace memory"),
            display.html_table(self.program_summary().rows(), "the fused program by part (estimated)"),
        ]
        return display.html_view(f"fusetrace learner ({self.algorithm})", tables, plots.svg(self.drawing()))


def compile(
    model: brainstate.nn.Module,
    *example_inputs,
    loss: Callable,
    algorithm: str = "es_d_rtrl",
    batch_size: int | None = None,
    example_target=None,
    decay: float = 0.9,
    factorisation: str = "filtered",
    kappa: float | None = None,
    feedback: str = "symmetric",
    feedback_seed: int = 0,
    regularizer: Callable[[brainstate.nn.Module], Any] | None = None,
    credit_depth: int = DEFAULT_CREDIT_DEPTH,
    rank: int | None = None,
    loop_hops: int = DEFAULT_LOOP_HOPS,
    own_loop_hops: int = DEFAULT_OWN_LOOP_HOPS,
    rank_metric: str | None = None,
) -> Learner:
    """Compile `model` into a fused online learner.

    Arguments:
        model: a `brainstate.nn.Module`; states are initialised with `batch_size` unless present.
        example_inputs: the arguments of one `model.update` call (batch axis first when batched).
        loss: `loss(output, target) -> scalar` for one step; it sees the whole (batched) output.
        algorithm: "d_rtrl", "es_d_rtrl" or "e_prop" (see docs/concepts.md for when each is exact).
        batch_size: batch size of the states, or None.
        example_target: one step's target: `Learner.step` and `Trainer` then check every target against
            its structure, shapes, dtypes and units (default: zeros like the output, used only to show
            `fused_jaxpr` and to check the loss; targets are then not checked).
        decay: es_d_rtrl's smoothing factor α.
        factorisation: es_d_rtrl's factorisation of the trace: "filtered" (both factors low-pass filtered
            with α, as pp-prop) or "averaged" (the moving average of the presynaptic input times the exact
            postsynaptic sensitivity; equals d_rtrl when the input is constant in time), "matched" (S
            presynaptic filters driven by the group's own mean dynamics, the postsynaptic factors their
            least-squares fit of each neuron's kernel; exact for a linear time-invariant group whose
            neurons share their dynamics) or "low_rank" (the trace of each batch entry kept at rank
            `rank` by the exact recursion and a truncation at every step; exact while the trace's rank
            stays within it). The last two keep K pairs of factors (K = S, or the rank), K times the
            memory, and ignore `decay`.
        kappa: e_prop's optional low-pass filter of the trace (None: no filter).
        feedback: e_prop's learning signal through the readout weights ("symmetric") or through fixed
            random matrices of the same shape and scale ("random", seeded by `feedback_seed`).
        regularizer: optional `regularizer(model) -> scalar` added to every step's loss. It is called
            right after `model.update`, so it reads the step's NEW states (e.g. `net.neurons.get_spike()`)
            and the weights; its gradient reaches the weights through the same traces as the loss
            (`fusetrace.firing_rate_regularizer` builds one).
        credit_depth: how many downstream groups a weight's credit chain may cross on its way to the loss
            (through a readout, further spiking layers, another area): exact through linear time-invariant
            groups, approximate through nonlinear ones (docs/concepts.md); longer paths are dropped with
            a note in `explain`. 0 keeps only the credit of groups the loss reads directly.
        rank: the rank of es_d_rtrl's trace per batch entry under factorisation="low_rank" (default
            `fusetrace.passes.factorised.DEFAULT_RANK`); an error with any other factorisation.
        rank_metric: the norm in which factorisation="low_rank" keeps the best rank-`rank` trace: "plain"
            (the default: the trace's own) or "balanced" (every hidden state's block of the trace scaled to
            unit norm first, so that the truncation does not depend on the unit each state is written in,
            nor let a state that is large in its own unit — a slow adaptation variable — take the rank
            from the others; docs/concepts.md), or "spike" (the states weighed by how the group's spikes read
            them, through its dynamics: an S×S matrix per neuron more; a group without spikes falls back to
            "balanced"). An error with any other factorisation.
        loop_hops: how many times a credit chain follows a downstream group's own recurrent weights (the
            E population of an E/I loop reading its own spikes, a recurrent second layer): each round is one
            more credit trace per chain and counts as one group toward `credit_depth`; further rounds are
            dropped with a note (docs/concepts.md). The weight's own group: `own_loop_hops`.
        own_loop_hops: how many times a credit chain follows the weight's own group's recurrent weights,
            beyond the algorithm's per-neuron trace (which drops the credit that reaches other neurons
            through them): 0 (the default) keeps each algorithm as defined; 1 or 2 bring a recurrent
            layer's gradient close to BPTT's (docs/concepts.md) at one more trace of the weight's size
            (d_rtrl, e_prop) or of its neurons (es_d_rtrl) per round, times the units of a small last
            stage kept per unit.

    Returns:
        A `Learner` with `params`, `init()`, `step(params, state, x_t, target_t)`.

    Raises:
        CompileError: bad options, or a loss that does not return a floating-point scalar on the example
            output and target. Plus everything `analyze` raises.

    Examples:
        ```python
        learner = fusetrace.compile(net, x0, loss=lambda out, y: jnp.sum((out - y) ** 2), algorithm="d_rtrl")
        state = learner.init()
        state, res = jax.jit(learner.step)(learner.params, state, x0, y0)  # res.output, res.loss, res.grads
        ```
    """
    if not callable(loss):
        raise CompileError(
            four_part(
                what="`loss` is not callable",
                where="fusetrace.compile(..., loss=...)",
                why="the learning signal is the gradient of loss(output, target)",
                fix="pass a function loss(output, target) -> scalar",
            )
        )
    if kappa is not None and algorithm != "e_prop":
        raise CompileError(
            four_part(
                what=f"kappa is an e_prop option, not one of {algorithm}",
                where="fusetrace.compile(..., kappa=...)",
                why="only e_prop filters its trace",
                fix="drop kappa or use algorithm='e_prop'",
            )
        )
    if factorisation != "filtered" and algorithm != "es_d_rtrl":
        raise CompileError(
            four_part(
                what=f"factorisation is an es_d_rtrl option, not one of {algorithm}",
                where="fusetrace.compile(..., factorisation=...)",
                why="only es_d_rtrl factorises its trace",
                fix="drop factorisation or use algorithm='es_d_rtrl'",
            )
        )
    analysis = analyze(model, *example_inputs, batch_size=batch_size, regularizer=regularizer)
    captured = analysis.captured
    values = derive.forward(analysis, captured.strip_inputs(*example_inputs), captured.leaf_values())
    plan = make_plan(
        analysis,
        algorithm,
        values,
        decay=decay,
        factorisation=factorisation,
        kappa=kappa,
        feedback=feedback,
        feedback_seed=feedback_seed,
        depth=credit_depth,
        rank=rank,
        hops=loop_hops,
        own_hops=own_loop_hops,
        rank_metric=rank_metric,
    )
    analysis = _on_device(analysis, with_rows=algorithm == "es_d_rtrl")
    param_items = [(".".join(map(str, k)), s) for k, s in states_of(model, brainstate.ParamState).items()]
    params = {path: _strong(state.value) for path, state in param_items}
    model_states = {}
    for state, leaf in zip(captured.states, _first_leaf_per_state(captured), strict=True):
        if leaf.role != "weight":
            model_states[leaf.state_path] = _strong(state.value)
    target_given = example_target is not None
    if example_target is None:
        example_target = jax.tree.map(jnp.zeros_like, captured.wrap_outputs(values.outputs), is_leaf=u.math.is_quantity)
    checks.check_loss(loss, captured.wrap_outputs(values.outputs), example_target, target_given=target_given)
    return Learner(
        analysis=analysis,
        plan=plan,
        loss=loss,
        param_paths=tuple(params),
        snapshot=_Snapshot(params, model_states, tuple(example_inputs), example_target, target_given),
    )


def _on_device(analysis: Analysis, *, with_rows: bool) -> Analysis:
    """`analysis` with its large constants as device arrays (so that passing `Learner.constants` to a
    compiled step moves nothing) and, `with_rows`, the row index of every CSR matrix whose weight
    cotangent es_d_rtrl forms in one pass, computed once here rather than in every step."""
    consts = list(analysis.captured.jaxpr.consts)
    for i in analysis.large_constant_indices():
        consts[i] = jnp.asarray(consts[i])
    analysis = dataclasses.replace(analysis, captured=analysis.captured.with_consts(consts))
    if not with_rows:
        return analysis
    rows = tuple((operand, jnp.asarray(derive.csr_rows(value))) for operand, value in derive.twin_row_indptrs(analysis))
    return dataclasses.replace(analysis, csr_rows=rows)


def _strong(tree):
    """The same values without weak types, so the first step's output state has the input's types."""

    def strong(x):
        if u.math.is_quantity(x):
            return u.Quantity(strong(u.get_mantissa(x)), unit=u.get_unit(x))
        x = jnp.asarray(x)
        return jnp.asarray(x, dtype=x.dtype)

    return jax.tree.map(strong, tree, is_leaf=u.math.is_quantity)


def _first_leaf_per_state(captured):
    firsts = {}
    for index, leaf in enumerate(captured.leaves):
        firsts.setdefault(captured.leaf_state[index], leaf)
    return [firsts[i] for i in range(len(captured.states))]


def online(*, loss: Callable, algorithm: str = "es_d_rtrl", **options):
    """Class decorator: instances simulate as before and gain a `.learner(...)` method.

    `instance.learner(*example_inputs, batch_size=None, **more)` returns
    `fusetrace.compile(instance, *example_inputs, loss=loss, algorithm=algorithm, batch_size=batch_size,
    **options, **more)`.

    Arguments:
        loss: `loss(output, target) -> scalar` for one step, as in `compile`.
        algorithm: "d_rtrl", "es_d_rtrl" or "e_prop", as in `compile`.
        **options: further keyword arguments of `compile` (`decay`, `kappa`, `feedback`, ...).

    Returns:
        The decorator; it returns the class itself, with `learner` added.

    Raises:
        CompileError: the decorated object is not a `brainstate.nn.Module` subclass.

    Examples:
        ```python
        @fusetrace.online(algorithm="d_rtrl", loss=lambda out, y: jnp.sum((out - y) ** 2))
        class Net(brainstate.nn.Module): ...

        learner = Net().learner(x0, batch_size=16)
        ```
    """

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, brainstate.nn.Module)):
            raise CompileError(
                four_part(
                    what=f"@fusetrace.online decorates {cls!r}",
                    where="the decorator",
                    why="it needs a brainstate.nn.Module subclass",
                    fix="put it on the model class",
                )
            )

        def learner(self, *example_inputs, batch_size: int | None = None, **more):
            return compile(
                self, *example_inputs, loss=loss, algorithm=algorithm, batch_size=batch_size, **{**options, **more}
            )

        cls.learner = learner  # pyright: ignore[reportAttributeAccessIssue]
        return cls

    return decorate
