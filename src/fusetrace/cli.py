"""The `fusetrace` command: `demo`, `train` and `inspect`.

Bad arguments and failures print one line (`fusetrace: error: ...`) and exit non-zero; `--debug`
shows the traceback instead. Exit statuses: 0 done, 2 an error (a non-finite stop included), 143 / 130
stopped by SIGTERM / SIGINT after a final checkpoint that `--resume` continues bit for bit (`runguard`).
"""

import argparse
import dataclasses
import importlib
import json
import pathlib
import shutil
import sys
import time
from typing import Any

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checkpoint, plots, runguard
from .api import analyze, compile
from .capture import states_of
from .errors import FusetraceError, NonFiniteError
from .inspection import FILES, write_report
from .passes.components import RANK_METRICS
from .passes.factorised import DEFAULT_RANK
from .passes.fuse import DEFAULT_CREDIT_DEPTH, DEFAULT_LOOP_HOPS, DEFAULT_OWN_LOOP_HOPS, FACTORISATIONS
from .regularize import firing_rate_regularizer, neurons_of
from .trainer import BPTTTrainer, Trainer

ALGORITHMS = ("d_rtrl", "es_d_rtrl", "e_prop")
BASELINES = ("bptt",)  # whole-sequence BPTT through the same captured step, for comparison


class CliError(FusetraceError, ValueError):
    """A user error on the command line (printed as one line)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run (saved as config.json; `--resume` reads it back)."""

    task: str
    algorithm: str
    iterations: int
    batch: int
    learning_rate: float
    update_every: int
    seed: int
    checkpoint_every: int
    clip_norm: float | None = None
    decay: float = 0.9
    factorisation: str = "filtered"
    rank: int | None = None  # es_d_rtrl's "low_rank" factorisation: the trace's rank per batch entry
    rate_reg: float = 0.0  # firing-rate regularisation strength (0: none)
    target_rate_hz: float = 10.0
    schedule: str = "constant"  # learning rate: "constant", or "cosine" decay to 0 over the run
    task_options: dict = dataclasses.field(default_factory=dict)
    validate_every: int = 0  # evaluate on the validation set every k iterations (0: never)
    validation_batches: int = 8  # its size, in batches of `batch` trials
    test_batches: int = 0  # after training, evaluate final and best-validation params on this many (0: no test)
    network: str | None = None  # "MODULE:FACTORY" of a network to train instead of the task's reference one
    freeze: tuple[str, ...] = ()  # parameter paths kept at their initial values (e.g. a first layer)
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: "stop" the run, or "skip" that update
    loop_hops: int = DEFAULT_LOOP_HOPS  # rounds of credit through a downstream group's own recurrence
    own_loop_hops: int = DEFAULT_OWN_LOOP_HOPS  # ... and through the weight's own group's
    credit_depth: int = DEFAULT_CREDIT_DEPTH  # downstream groups a credit chain may cross (each round counts)
    rank_metric: str | None = None  # es_d_rtrl's "low_rank": the truncation's norm, "plain" (None), "balanced", "spike"


# Held-out trials come from seeds far from the training seeds (seed + iteration): the validation set
# from seed + VALIDATION_SEEDS + j, the test set from seed + TEST_SEEDS + j, j counting its batches.
VALIDATION_SEEDS, TEST_SEEDS = 1_000_000_000, 2_000_000_000


def _task_registry() -> dict[str, Any]:
    from . import tasks

    return tasks.REGISTRY


def _spec(name: str):
    registry = _task_registry()
    if name not in registry:
        raise CliError(f"unknown task {name!r}; choose one of {', '.join(sorted(registry))}")
    return registry[name]


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _task_option(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"fusetrace: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fusetrace", description="Online learning for brainpy.state networks.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="train the reference network on evidence accumulation (a few minutes)")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--iterations", type=_positive(int), default=None)
    demo.add_argument("--algorithm", choices=ALGORITHMS, default="es_d_rtrl")
    demo.add_argument("--seed", type=int, default=0)

    train = commands.add_parser("train", help="train a reference network online on a generated task")
    train.add_argument("--task", default=None)
    train.add_argument("--algorithm", choices=ALGORITHMS + BASELINES, default="es_d_rtrl")
    train.add_argument("--iterations", type=_positive(int), default=100)
    train.add_argument("--batch", type=_positive(int), default=16)
    train.add_argument("--lr", type=_positive(float), default=5e-3)
    train.add_argument(
        "--update-every",
        type=_nonnegative_int,
        default=0,
        help="optimizer step every k time steps; 0: at the end of each sequence",
    )
    train.add_argument("--decay", type=float, default=0.9, help="es_d_rtrl's smoothing factor")
    train.add_argument("--factorisation", choices=FACTORISATIONS, default="filtered", help="es_d_rtrl's trace factors")
    train.add_argument(
        "--rank",
        type=_positive(int),
        default=None,
        help=f"the trace's rank under --factorisation low_rank (default {DEFAULT_RANK})",
    )
    train.add_argument(
        "--rank-metric",
        choices=RANK_METRICS,
        default=None,
        help="the norm of the low_rank truncation: plain (default), balanced (every hidden state's block "
        "of the trace at unit norm) or spike (the states weighed by how the spikes read them)",
    )
    train.add_argument(
        "--loop-hops",
        type=_nonnegative_int,
        default=DEFAULT_LOOP_HOPS,
        help="rounds of credit through a downstream group's own recurrent weights",
    )
    train.add_argument(
        "--credit-depth",
        type=_nonnegative_int,
        default=DEFAULT_CREDIT_DEPTH,
        help="downstream groups a weight's credit chain may cross (0: its own group only; fewer: faster)",
    )
    train.add_argument(
        "--own-loop-hops",
        type=_nonnegative_int,
        default=DEFAULT_OWN_LOOP_HOPS,
        help="rounds of credit through the weight's own group's recurrent weights (0: the algorithm as defined)",
    )
    train.add_argument("--rate-reg", type=float, default=0.0, help="firing-rate regularisation strength (0: none)")
    train.add_argument("--target-rate", type=float, default=10.0, help="the regularised firing rate in Hz")
    train.add_argument(
        "--schedule", choices=("constant", "cosine"), default="constant", help="learning-rate schedule over the run"
    )
    train.add_argument("--clip", type=_positive(float), default=None, help="global-norm gradient clipping")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--option",
        action="append",
        default=[],
        type=_task_option,
        metavar="KEY=VALUE",
        help="a task generator option, e.g. --option shorten=0.2 (repeatable)",
    )
    train.add_argument(
        "--validate-every",
        type=_nonnegative_int,
        default=0,
        help="evaluate on held-out validation trials every k iterations and keep the best params (0: never)",
    )
    train.add_argument(
        "--validation-batches", type=_positive(int), default=8, help="validation set size, in batches of --batch"
    )
    train.add_argument(
        "--test-batches",
        type=_nonnegative_int,
        default=0,
        help="after training, test the final (and best-validation) params on this many fresh batches (0: no test)",
    )
    train.add_argument(
        "--network",
        default=None,
        metavar="MODULE:FACTORY",
        help="train this network (a function returning a brainstate module) instead of the task's reference one",
    )
    train.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="PATH",
        help="keep this parameter (a path of learner.params, or a prefix of paths) at its initial value "
        "(repeatable), e.g. to measure what a layer's learning adds",
    )
    train.add_argument(
        "--on-nonfinite",
        choices=("stop", "skip"),
        default=None,
        help="on a non-finite loss, gradient or weight: stop (default; the last finite state is checkpointed, "
        "exit status 2) or skip that update (counted as skipped_updates); with --resume, changes the run's setting",
    )
    train.add_argument("--checkpoint-every", type=_positive(int), default=10)
    train.add_argument("--run-dir", default=None, help="where to write the run (default runs/<task>-<algorithm>)")
    train.add_argument("--resume", default=None, metavar="DIR", help="continue the run saved in DIR")

    inspect = commands.add_parser(
        "inspect", help="print the analysis of a model, draw it, and optionally write a report folder"
    )
    inspect.add_argument(
        "target",
        metavar="MODULE:FACTORY",
        help="a function returning (model, example_input), or (model, example_input, loss) to include what the "
        "online learner does with each weight",
    )
    inspect.add_argument("--batch-size", type=_positive(int), default=None)
    inspect.add_argument(
        "--out", default=None, help="file for the drawing, .png or .svg (default graph.png, unless --report)"
    )
    inspect.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="write summary.txt, report.md, report.json, graph.svg and graph.png into DIR",
    )
    inspect.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default=None,
        help="compile a learner with this algorithm and report what it does with each weight (default: "
        "compile's, when the factory returns a loss; without one, the loss is 0.5 * sum of squared outputs)",
    )
    inspect.add_argument(
        "--engine",
        choices=("auto", "dot", "matplotlib"),
        default="auto",
        help="draw with Graphviz's dot, or the layered matplotlib fallback (auto: dot when it is on PATH)",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "demo":
            return _demo(args)
        return _train(args)
    except runguard.Interrupted as stop:
        print(f"fusetrace: {stop}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("fusetrace: interrupted (nothing written since the last checkpoint)", file=sys.stderr)
        return 130
    except (FusetraceError, OSError, ImportError, AttributeError, ValueError, TypeError, KeyError) as error:
        if args.debug:
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"fusetrace: error: {first}", file=sys.stderr)
        return 2


def _factory(target: str):
    """The function named by "MODULE:FACTORY" (the current directory is importable)."""
    module_name, _, factory_name = target.partition(":")
    if not module_name or not factory_name:
        raise CliError(f"expected MODULE:FACTORY, got {target!r}")
    if str(pathlib.Path.cwd()) not in sys.path:
        sys.path.insert(0, str(pathlib.Path.cwd()))
    return getattr(importlib.import_module(module_name), factory_name)


def _inspect(args) -> int:
    made = _factory(args.target)()
    parts: tuple[Any, ...] = made if isinstance(made, tuple) else (made,)
    if len(parts) not in (2, 3):
        raise CliError(
            f"{args.target} must return (model, example_input) or (model, example_input, loss) so one step can be "
            "traced"
        )
    model, example, loss = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    learner = None
    if loss is not None or args.algorithm is not None:
        options = {} if args.algorithm is None else {"algorithm": args.algorithm}
        learner = compile(model, example, loss=loss or squared_outputs, batch_size=args.batch_size, **options)
        analysis = learner.analysis
    else:
        analysis = analyze(model, example, batch_size=args.batch_size)
    subject = learner if learner is not None else analysis
    print(subject.summary())
    if args.out is not None or args.report is None:
        out = args.out or "graph.png"
        plots.draw(subject.drawing(title=args.target), out, engine=args.engine)
        print(f"graph drawing: {out}")
    if args.report is not None:
        write_report(analysis, args.report, learner=learner, title=args.target, engine=args.engine)
        print(f"report: {args.report} ({', '.join(FILES)})")
    return 0


def squared_outputs(output, target) -> jax.Array:
    """`fusetrace inspect`'s loss when the factory gives none: 0.5 * the sum of every squared output
    (the target is ignored). Which weights get credit, and how exactly, depends on which outputs the
    loss reads, not on its values."""
    del target
    total = jnp.zeros(())
    for x in jax.tree.leaves(output, is_leaf=u.math.is_quantity):
        total = total + 0.5 * jnp.sum(jnp.square(u.get_mantissa(x)))
    return total


def demo_config(algorithm: str = "es_d_rtrl", seed: int = 0, iterations: int | None = None) -> RunConfig:
    """The run `fusetrace demo` makes: the evidence task's demo settings (`TaskSpec.demo`)."""
    spec = _spec("evidence")
    return RunConfig(
        task="evidence",
        algorithm=algorithm,
        iterations=iterations or spec.demo["iterations"],
        batch=spec.demo["batch"],
        learning_rate=spec.demo["learning_rate"],
        update_every=0,
        seed=seed,
        checkpoint_every=10,
        clip_norm=spec.demo.get("clip_norm"),
        task_options=dict(spec.demo.get("task_options", {})),
        credit_depth=spec.demo.get("credit_depth", DEFAULT_CREDIT_DEPTH),
        network=spec.demo.get("network"),
    )


def _demo(args) -> int:
    config = demo_config(args.algorithm, args.seed, args.iterations)
    summary = run(config, pathlib.Path(args.run_dir))
    print(
        f"final accuracy {summary['final_accuracy']:.3f} (mean of the last {summary['accuracy_window']} "
        f"iterations); run folder: {args.run_dir}"
    )
    return 0


def _train(args) -> int:
    if args.resume:
        run_dir = pathlib.Path(args.resume)
        config_file = run_dir / "config.json"
        if not config_file.exists():
            raise CliError(f"--resume {run_dir}: no config.json there (not a fusetrace run folder)")
        saved = json.loads(config_file.read_text())
        config = RunConfig(**{"loop_hops": 0, **saved})  # a run saved before the option followed no loop
        if args.on_nonfinite not in (None, config.on_nonfinite):
            config = dataclasses.replace(config, on_nonfinite=args.on_nonfinite)
        text = json.dumps(dataclasses.asdict(config), indent=1)
        if json.loads(text) != saved:  # a changed option, or fields the saved file predates
            config_file.write_text(text)
        run(config, run_dir, resume=True)
        return 0
    if args.task is None:
        raise CliError("--task is required (or --resume DIR)")
    _spec(args.task)
    if not 0 <= args.decay < 1:
        raise CliError(f"--decay {args.decay} is outside [0, 1)")
    if args.rate_reg < 0 or args.target_rate < 0:
        raise CliError("--rate-reg and --target-rate must be non-negative")
    config = RunConfig(
        task=args.task,
        algorithm=args.algorithm,
        iterations=args.iterations,
        batch=args.batch,
        learning_rate=args.lr,
        update_every=args.update_every,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        clip_norm=args.clip,
        decay=args.decay,
        factorisation=args.factorisation,
        rank=args.rank,
        rate_reg=args.rate_reg,
        target_rate_hz=args.target_rate,
        schedule=args.schedule,
        task_options=dict(args.option),
        validate_every=args.validate_every,
        validation_batches=args.validation_batches,
        test_batches=args.test_batches,
        network=args.network,
        freeze=tuple(args.freeze),
        on_nonfinite=args.on_nonfinite or "stop",
        loop_hops=args.loop_hops,
        own_loop_hops=args.own_loop_hops,
        credit_depth=args.credit_depth,
        rank_metric=args.rank_metric,
    )
    summary = run(config, pathlib.Path(args.run_dir or f"runs/{args.task}-{args.algorithm}"))
    for which, metrics in summary.get("test", {}).items():
        if which != "trials":
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            print(f"test ({summary['test']['trials']} trials), {which} params: {shown}")
    return 0


def build(config: RunConfig):
    """`(model, learner, trainer, spec)` for a run configuration (deterministic in config.seed)."""
    spec = _spec(config.task)
    brainstate.environ.set(dt=spec.dt_ms * u.ms)
    brainstate.random.seed(config.seed)
    model = _factory(config.network)() if config.network else spec.network()
    if not isinstance(model, brainstate.nn.Module):
        raise CliError(f"--network {config.network}: returned {type(model).__name__}, not a brainstate module")
    first = spec.sample(batch=config.batch, seed=config.seed, **config.task_options)
    baseline = config.algorithm in BASELINES
    learner = compile(
        model,
        first.inputs[0],
        loss=spec.loss,
        algorithm="d_rtrl" if baseline else config.algorithm,  # BPTT only uses the captured step
        batch_size=config.batch,
        example_target=jax.tree.map(lambda a: a[0], first.targets),
        decay=config.decay,
        factorisation=config.factorisation if config.algorithm == "es_d_rtrl" else "filtered",
        rank=config.rank if config.algorithm == "es_d_rtrl" else None,
        rank_metric=config.rank_metric if config.algorithm == "es_d_rtrl" else None,
        regularizer=(firing_rate_regularizer(config.target_rate_hz, config.rate_reg) if config.rate_reg > 0 else None),
        loop_hops=config.loop_hops,
        own_loop_hops=config.own_loop_hops,
        credit_depth=config.credit_depth,
    )
    if baseline and config.update_every != 0:
        raise CliError("--algorithm bptt updates once per sequence: use --update-every 0")
    optimizer = optax.adam(_learning_rate(config, steps=jax.tree.leaves(first.inputs)[0].shape[0]))
    trainer = (BPTTTrainer if baseline else Trainer)(
        learner,
        lambda seed: spec.sample(batch=config.batch, seed=seed, **config.task_options),
        _frozen(optimizer, learner.params, config.freeze),
        update_every=config.update_every,
        clip_norm=config.clip_norm,
        seed=config.seed,
        metric=spec.metric,
        on_nonfinite=config.on_nonfinite,
        step_mask=None if config.rate_reg > 0 else loss_steps,  # a rate penalty is a loss at every step
    )
    return model, learner, trainer, spec


def loss_steps(batch) -> np.ndarray:
    """The steps of a task batch whose loss can be non-zero: those where some trial's mask is set."""
    return np.asarray(batch.task.mask).any(axis=1)


def _frozen(optimizer: optax.GradientTransformation, params: dict, freeze) -> optax.GradientTransformation:
    """`optimizer` with the parameters under the paths in `freeze` held at their values (zero updates)."""
    if not freeze:
        return optimizer
    unknown = [p for p in freeze if not any(path == p or path.startswith(p + ".") for path in params)]
    if unknown:
        raise CliError(f"--freeze {', '.join(unknown)}: no such parameter; the parameters are {', '.join(params)}")
    labels = {
        path: jax.tree.map(
            lambda _, path=path: "frozen" if any(path == p or path.startswith(p + ".") for p in freeze) else "trained",
            value,
            is_leaf=u.math.is_quantity,
        )
        for path, value in params.items()
    }
    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def _learning_rate(config: RunConfig, steps: int):
    """The learning rate, or its schedule over every optimizer update of the run (a sequence of `steps`
    time steps gives one update, or one per `update_every` steps)."""
    if config.schedule == "constant":
        return config.learning_rate
    per_sequence = 1 if config.update_every == 0 else max(1, steps // config.update_every)
    return optax.cosine_decay_schedule(config.learning_rate, decay_steps=config.iterations * per_sequence)


def run(config: RunConfig, run_dir: pathlib.Path, resume: bool = False, progress: bool = True) -> dict:
    """Train, checkpointing every `config.checkpoint_every` iterations; write metrics and pictures.

    Raises:
        CheckpointError: the run folder cannot hold checkpoints (checked before training starts).
        runguard.Interrupted: SIGTERM or SIGINT arrived; the last completed iteration is checkpointed.
        runguard.TrainingStopped: a non-finite loss, gradient or weight stopped training (the last finite
            state is checkpointed), or a checkpoint could not be written (the previous one is intact).
    """
    checkpoint.check_writable(run_dir)
    model, learner, trainer, spec = build(config)
    state, history = _start(config, run_dir, trainer, resume)
    checkpoint.check_space(run_dir, state)
    start = time.perf_counter()
    checkpoints = runguard.RunCheckpoints(run_dir, saved=int(state["iteration"]) if resume else None)
    with runguard.StopRequest() as stop:
        state = _loop(config, run_dir, trainer, state, history, stop, checkpoints, progress)
    return _finish(config, run_dir, model, learner, trainer, spec, state, history, time.perf_counter() - start)


def _start(config: RunConfig, run_dir: pathlib.Path, trainer: Trainer, resume: bool) -> tuple[dict, list[dict]]:
    """The training state and history to start from: the latest checkpoint's, or fresh ones."""
    state, history = trainer.init(), []
    if resume:
        folder = checkpoint.latest(run_dir)
        if folder is None:
            raise CliError(f"--resume {run_dir}: no checkpoint to resume from")
        state, meta = checkpoint.restore(folder, state)
        history = meta.get("history", [])
    else:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
        shutil.rmtree(run_dir / "best", ignore_errors=True)  # an earlier run's best weights
    return state, history


def _loop(config, run_dir, trainer, state, history, stop, checkpoints, progress: bool) -> dict:
    """Iterate until `config.iterations` or a stop request (`runguard.StopRequest`), checkpointing through
    `checkpoints` (`runguard.RunCheckpoints`). Returns the final state."""
    from tqdm import tqdm

    validation = _held_out_seeds(config, VALIDATION_SEEDS, config.validation_batches) if config.validate_every else None
    bar = tqdm(
        total=config.iterations, initial=int(state["iteration"]), disable=not progress, unit="it", dynamic_ncols=True
    )
    try:
        while int(state["iteration"]) < config.iterations and stop.signal is None:
            try:
                state, result = trainer.iteration(state)
            except NonFiniteError as error:
                raise checkpoints.nonfinite(error, state, history) from error
            history.append({k: float(v) for k, v in result.metrics.items()})
            iteration = int(state["iteration"])
            if validation is not None and iteration % config.validate_every == 0:
                _validate(trainer, validation, state, history, run_dir)
            bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items()})
            bar.update(1)
            if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
                checkpoints.save(state, history)
    finally:
        bar.close()
    if stop.signal is not None:
        raise checkpoints.interrupted(stop.signal, state, history, config.iterations)
    return state


def _held_out_seeds(config: RunConfig, offset: int, count: int) -> range:
    """The seeds of `count` batches of held-out trials, never used for training (those are config.seed + i)."""
    return range(config.seed + offset, config.seed + offset + count)


def _batches(trainer: Trainer, seeds: range):
    """The batches of `seeds`, generated one at a time."""
    return (trainer.sample(seed) for seed in seeds)


def _validate(trainer: Trainer, seeds: range, state: dict, history: list[dict], run_dir: pathlib.Path) -> None:
    """Record the validation metrics in the last history entry (prefixed `validation_`); when the
    accuracy (or, without one, the loss) is the best so far, keep these params in `run_dir/best`."""
    metrics = trainer.evaluate(state["params"], _batches(trainer, seeds))
    score = _score(metrics)
    earlier = [_score(h, "validation_") for h in history[:-1] if "validation_loss" in h]
    history[-1].update({f"validation_{k}": v for k, v in metrics.items()})
    if not earlier or score > max(earlier):
        checkpoint.save(run_dir / "best", int(state["iteration"]), state, {"validation": metrics}, keep=1)


def _score(metrics: dict, prefix: str = "") -> float:
    """Higher is better: the accuracy where the task has one, else minus the loss."""
    return metrics[f"{prefix}accuracy"] if f"{prefix}accuracy" in metrics else -metrics[f"{prefix}loss"]


def _test(trainer: Trainer, config: RunConfig, run_dir: pathlib.Path, state: dict) -> dict:
    """Metrics on the test set of the final params and, when validated, of the best-validation params."""
    seeds = _held_out_seeds(config, TEST_SEEDS, config.test_batches)
    final = trainer.evaluate(state["params"], _batches(trainer, seeds))
    report = {"trials": config.test_batches * config.batch, "final": final}
    best = checkpoint.latest(run_dir / "best")  # only this run's: a new run removes an earlier one's
    if best is not None:
        best_state, meta = checkpoint.restore(best, state)
        report["best"] = {
            "iteration": meta["step"],
            "validation": meta["validation"],
            **trainer.evaluate(best_state["params"], _batches(trainer, seeds)),
        }
    return report


def _finish(config, run_dir, model, learner, trainer, spec, state, history, seconds) -> dict:
    window = min(10, len(history))
    accuracies = [h["accuracy"] for h in history[-window:] if "accuracy" in h]
    summary = {
        "config": dataclasses.asdict(config),
        "iterations": len(history),
        "seconds": seconds,
        "final_loss": float(np.mean([h["loss"] for h in history[-window:]])) if history else None,
        "final_accuracy": float(np.mean(accuracies)) if accuracies else float("nan"),
        "accuracy_window": window,
        "history": history,
        "trace_bytes": None if config.algorithm in BASELINES else learner.trace_bytes(),  # with its options
    }
    if config.test_batches:
        summary["test"] = _test(trainer, config, run_dir, state)
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    plots.curves(history, run_dir / "curves.png")
    plots.graph(learner, run_dir / "graph.png", title=f"{config.task}: {config.algorithm}")
    spikes = record_spikes(model, state["params"], trainer.batch(int(state["iteration"])).inputs, config.batch)
    plots.raster(spikes, run_dir / "raster.png", dt_ms=spec.dt_ms, title="spikes, first sequence of a batch")
    return summary


def record_spikes(model, params: dict, inputs, batch: int) -> np.ndarray:
    """Spikes (T, neurons) of every neuron population of `model` on the first sequence of `inputs`,
    simulated with the given params."""
    brainstate.nn.init_all_states(model, batch_size=batch)
    weights = {".".join(map(str, k)): s for k, s in states_of(model, brainstate.ParamState).items()}
    for path, value in params.items():
        weights[path].value = value
    populations = neurons_of(model)

    def step(x):
        model.update(x)
        return jnp.concatenate([jnp.reshape(u.get_mantissa(p.get_spike()), (batch, -1)) for p in populations], -1)

    spikes = brainstate.transform.for_loop(step, inputs)
    return np.asarray(spikes[:, 0])


if __name__ == "__main__":
    sys.exit(main())
