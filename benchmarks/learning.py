"""Learning side by side: braintrace's pp_prop against fusetrace (es_d_rtrl, d_rtrl, BPTT) on the same
network, initial weights and batches (issue 16, item 3).

    python benchmarks/learning.py peer --task dms --seed 0 [--iterations 300 ...]   # one pp_prop run
    python benchmarks/learning.py figure                                            # curves and table
    python benchmarks/learning.py time --task evidence [--rounds 5]                 # time per iteration
    python benchmarks/learning.py compare --task dms --at 0 100 200 300            # gradients on pp_prop's path

`compare` trains pp_prop and, at the given iterations, holds its weights and forms on one fresh batch (never
trained on) the whole-trial gradient of pp_prop, of fusetrace's es_d_rtrl (the same decay) and d_rtrl, and of
BPTT; per weight it records each one's cosine with BPTT's and with pp_prop's, its norm relative to BPTT's,
and the fraction of weight entries whose sign agrees (all entries, and the half smaller than pp_prop's
median magnitude): Adam steps every entry by about the same amount, so the small entries' signs count as
much as the large ones' (`benchmarks/results/learning_compare_<task>[_<FACTORY>].json`; `--network
MODULE:FACTORY` for another network than the task's, `--without d_rtrl` to leave the slow one out).

`time` builds pp_prop and fusetrace's learners (es_d_rtrl's factorisations, d_rtrl) on the same network
and alternates their training iterations on the same batches, so that a varying load on a shared
machine falls on all alike; it writes the median seconds per iteration and each one's ratio to pp_prop
(`benchmarks/results/learning_time_<task>.json`; with `--only NAME ...`, a subset of fusetrace's learners
beside pp_prop, `learning_time_<task>_only.json`; with `--network MODULE:FACTORY`, that network's
`learning_time_<task>_<FACTORY>[_only].json`).

fusetrace's runs are ordinary `fusetrace train` runs (the commands are in benchmarks/learning_runs.sh);
this script trains the peer the same way: the task's reference network is built twice from the same
seed, once with brainstate's layers (fusetrace compiles it unchanged) and once with braintrace's
(`braintrace.nn.Linear`, `braintrace.nn.LeakyRateReadout`, put in place of brainstate's while the
network is built, so every other part is the same object type), the peer's weights set to the first's.
Each iteration draws the batch `config.seed + iteration` (`fusetrace.cli.build`'s sampler), resets the
model's states and traces, accumulates pp_prop's online gradient over the trial (`etrace_grad`,
summed), and takes one Adam step after global-norm clipping, the learning rate schedule as fusetrace's.
The held-out evaluation is fusetrace's own (`Trainer.evaluate`, forward only, on the same validation
and test seeds), run on the plain twin with the peer's weights: both sides are scored by one program.

Every run writes `metrics.json` in the format of `fusetrace train` (history, test, seconds), so the
figure reads both kinds alike.
"""

import argparse
import contextlib
import dataclasses
import json
import pathlib
import sys
import time

import brainpy.state as bps
import brainstate
import common
import jax.numpy as jnp
import numpy as np
import optax

from fusetrace.cli import TEST_SEEDS, VALIDATION_SEEDS, RunConfig, build

RUNS = common.ROOT / "runs" / "learning"
sys.path.insert(0, str(common.ROOT))  # `--network benchmarks.peer_networks:...` as `fusetrace train` reads it


@contextlib.contextmanager
def peer_layers():
    """brainstate's `Linear` and brainpy.state's `LeakyRateReadout` replaced by braintrace's while a
    network is built (the task networks name them at construction time)."""
    braintrace = common.peer()
    if braintrace is None:
        raise SystemExit("braintrace is not installed: pip install -e '.[bench]'")
    saved = brainstate.nn.Linear, bps.LeakyRateReadout
    brainstate.nn.Linear, bps.LeakyRateReadout = braintrace.nn.Linear, braintrace.nn.LeakyRateReadout
    try:
        yield braintrace
    finally:
        brainstate.nn.Linear, bps.LeakyRateReadout = saved


def _peer_path(path: tuple) -> tuple:
    """braintrace's LeakyRateReadout names its weight `W`; every other path is the same."""
    return (*path[:-1], "W") if path[-1] == "weight" and path[-2:-1] == ("out",) else path


@dataclasses.dataclass
class PeerRun:
    """pp_prop's learner on the twin of a fusetrace run's network, with fusetrace's trainer beside it
    (its sampler, schedule and held-out evaluation)."""

    config: RunConfig
    decay: float

    def __post_init__(self):
        self.model, self.learner_plain, self.trainer, self.spec = build(self.config)
        first = self.trainer.batch(0)
        network = self.config.network
        with peer_layers() as braintrace:
            brainstate.random.seed(self.config.seed)
            self.twin = self._factory(network)()  # the same seed: the same draws
            x0 = first.inputs[0]
            self.learner = braintrace.compile(
                self.twin, "pp_prop", x0, batch_size=self.config.batch, decay_or_rank=self.decay
            )
        self.weights = self.twin.states(brainstate.ParamState)
        plain = self.model.states(brainstate.ParamState)
        for path, state in self.weights.items():  # identical initial weights, whatever the draws did
            state.value = plain[_reverse_path(path)].value
        self.optimizer = optax.chain(
            optax.clip_by_global_norm(self.config.clip_norm or np.inf),
            optax.adam(_learning_rate(self.config, first.inputs.shape[0])),
        )
        self.opt_state = self.optimizer.init(self.values())
        self._train = brainstate.transform.jit(self._train_step)

    def _factory(self, network: str | None):
        if network is None:
            return self.spec.network
        from fusetrace.cli import _factory

        return _factory(network)

    def values(self) -> dict:
        return {path: state.value for path, state in self.weights.items()}

    def _train_step(self, inputs, targets):
        batch = self.config.batch
        brainstate.nn.reset_all_states(self.twin, batch_size=batch)
        self.learner.reset_state(batch_size=batch)

        def step_loss(x, target):
            output = self.learner(x)
            return self.spec.loss(output, target), output

        return self.learner.etrace_grad(
            inputs, targets, step_fn=step_loss, reduction="sum", has_aux=True, return_value=True
        )

    def iteration(self, iteration: int) -> dict:
        batch = self.trainer.batch(iteration)
        grads, losses, outputs = self._train(batch.inputs, batch.targets)
        updates, self.opt_state = self.optimizer.update(grads, self.opt_state, self.values())
        for path, value in optax.apply_updates(self.values(), updates).items():
            self.weights[path].value = value
        metrics = {"loss": float(jnp.mean(losses))}
        metrics.update(self.spec.metric(outputs, batch))
        return metrics

    def plain_params(self) -> dict:
        """The peer's weights in the structure of fusetrace's `Learner.params` (the plain twin's)."""
        params = dict(self.learner_plain.params)
        for path, state in self.weights.items():
            plain = _reverse_path(path)
            params[".".join(map(str, plain))] = state.value
        return params


def _reverse_path(path: tuple) -> tuple:
    return (*path[:-1], "weight") if path[-1] == "W" else path


def _learning_rate(config: RunConfig, steps: int):
    if config.schedule == "constant":
        return config.learning_rate
    return optax.cosine_decay_schedule(config.learning_rate, decay_steps=config.iterations)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    peer = sub.add_parser("peer")
    peer.add_argument("--task", required=True)
    peer.add_argument("--network", default=None)
    peer.add_argument("--seed", type=int, default=0)
    peer.add_argument("--iterations", type=int, default=300)
    peer.add_argument("--batch", type=int, default=32)
    peer.add_argument("--lr", type=float, default=2e-3)
    peer.add_argument("--schedule", default="cosine")
    peer.add_argument("--clip", type=float, default=1.0)
    peer.add_argument("--decay", type=float, default=0.99)
    peer.add_argument("--validate-every", type=int, default=10)
    peer.add_argument("--validation-batches", type=int, default=8)
    peer.add_argument("--test-batches", type=int, default=32)
    peer.add_argument("--option", action="append", default=[])
    peer.add_argument("--run-dir", default=None)
    peer.add_argument("--time-only", type=int, default=0, help="time this many iterations and stop")
    timing = sub.add_parser("time")
    timing.add_argument("--task", required=True)
    timing.add_argument("--batch", type=int, default=None, help="default: the learning runs' (DMS 32, evidence 64)")
    timing.add_argument("--network", default=None, help="MODULE:FACTORY (default: the task's reference network)")
    timing.add_argument("--rounds", type=int, default=5)
    timing.add_argument("--decay", type=float, default=None, help="pp_prop's (default: DMS 0.99, evidence 0.9)")
    timing.add_argument(
        "--only", nargs="+", default=None, metavar="NAME", help="time these of fusetrace's learners (and pp_prop)"
    )
    timing.add_argument("--suffix", default="", help="appended to the results file's name (keeps an earlier one)")
    compare = sub.add_parser("compare")
    compare.add_argument("--task", required=True)
    compare.add_argument("--at", type=int, nargs="+", default=[0, 100, 200, 300], help="pp_prop's iterations")
    compare.add_argument("--batch", type=int, default=32)
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--decay", type=float, default=None, help="both sides' (default: DMS 0.99, evidence 0.9)")
    compare.add_argument("--network", default=None, help="MODULE:FACTORY (default: the task's reference network)")
    compare.add_argument("--without", nargs="+", default=[], choices=["es_d_rtrl", "d_rtrl"], help="leave these out")
    figure = sub.add_parser("figure")
    figure.add_argument("--runs", default=str(RUNS), help="the folder of the runs (one sub-folder per run)")
    figure.add_argument("--out", default=None, help="where the figures go (default docs/images)")
    args = parser.parse_args(argv)
    if getattr(args, "network", "") is None and args.task in PEER_FORM:
        args.network = PEER_FORM[args.task]  # braintrace cannot compile the reference network's `Gif`
    if args.what == "peer":
        return _peer(args)
    if args.what == "time":
        return _time(args)
    if args.what == "compare":
        return _compare(args)
    return _figure(pathlib.Path(args.runs), pathlib.Path(args.out) if args.out else common.IMAGES)


def _figure(runs: pathlib.Path, out: pathlib.Path) -> int:
    """One figure per task (validation accuracy against iteration, every run) and a table of the held-out
    test accuracy (final weights) per algorithm and seed. Run folders are named `<task>-<name>-s<seed>`
    (`<task>-gif-<name>-s<seed>` on the peer's GIF network: figure `learning-<task>-gif.png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(runs.glob("*/metrics.json")):
        task, rest = path.parent.name.split("-", 1)
        name, seed = rest.rsplit("-s", 1)
        if name.startswith("gif-"):  # the peer's own DMS network (learning_runs.sh): a figure of its own
            task, name = f"{task}-gif", name.removeprefix("gif-")
        found.setdefault(task, {}).setdefault(name, {})[int(seed)] = json.loads(path.read_text())
    for task, names in found.items():
        fig, ax = plt.subplots(figsize=(6.5, 4))
        print(f"\n{task}: held-out test accuracy, final weights\n| run | iterations | seeds | mean | s/iteration |")
        print("|---|---|---|---|---|")
        for colour, (name, seeds) in zip(plt.get_cmap("tab10").colors, sorted(names.items()), strict=False):
            for seed, metrics in sorted(seeds.items()):
                points = [
                    (i + 1, h["validation_accuracy"])
                    for i, h in enumerate(metrics["history"])
                    if "validation_accuracy" in h
                ]
                if points:
                    ax.plot(
                        *zip(*points, strict=True), color=colour, alpha=0.8, label=name if seed == min(seeds) else None
                    )
            tests = {seed: m.get("test", {}).get("final", {}).get("accuracy") for seed, m in sorted(seeds.items())}
            scored = [v for v in tests.values() if v is not None]
            per_iteration = np.mean([m["seconds"] / max(m["iterations"], 1) for m in seeds.values()])
            iterations = sorted({m["iterations"] for m in seeds.values()})
            row = ", ".join(f"{v:.3f}" if v is not None else "-" for v in tests.values())
            mean = f"{np.mean(scored):.3f}" if scored else "-"
            print(f"| {name} | {iterations} | {row} | {mean} | {per_iteration:.2f} |")
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation accuracy (held out)")
        ax.set_title(f"{task}: learning side by side")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / f"learning-{task}.png", dpi=110)
        plt.close(fig)
    return 0


# the learning runs' sizes and pp_prop's decay per task (benchmarks/learning_runs.sh)
RUN_SIZES = {"dms": (32, 0.99), "evidence": (64, 0.9)}
# the network both sides run when `--network` is not given, where braintrace cannot compile the task's
# reference network: evidence's `Gif` network in the form with its two moving states (the same draws,
# trajectory and gradients: tests/test_peer_networks.py)
PEER_FORM = {"evidence": "benchmarks.peer_networks:two_state_gif_evidence_network"}
# fusetrace's side of the timing: name -> `RunConfig` fields
_LOW_RANK = {"algorithm": "es_d_rtrl", "factorisation": "low_rank"}
TIMED = {
    "es_d_rtrl": {"algorithm": "es_d_rtrl"},
    "es_d_rtrl(0.99)": {"algorithm": "es_d_rtrl", "decay": 0.99},
    "es_d_rtrl(credit_depth 1)": {"algorithm": "es_d_rtrl", "credit_depth": 1},
    "es_d_rtrl(low_rank 1)": {**_LOW_RANK, "rank": 1},
    "es_d_rtrl(low_rank 2)": {**_LOW_RANK, "rank": 2},
    "es_d_rtrl(low_rank 3)": {**_LOW_RANK, "rank": 3},
    "es_d_rtrl(low_rank 4)": {**_LOW_RANK, "rank": 4},
    "es_d_rtrl(low_rank 8)": {**_LOW_RANK, "rank": 8},
    "es_d_rtrl(low_rank 2, balanced)": {**_LOW_RANK, "rank": 2, "rank_metric": "balanced"},
    "es_d_rtrl(low_rank 4, balanced)": {**_LOW_RANK, "rank": 4, "rank_metric": "balanced"},
    "es_d_rtrl(low_rank 2, spike)": {**_LOW_RANK, "rank": 2, "rank_metric": "spike"},
    "es_d_rtrl(low_rank 4, spike)": {**_LOW_RANK, "rank": 4, "rank_metric": "spike"},
    "es_d_rtrl(low_rank 4, balanced, credit_depth 1)": {
        **_LOW_RANK,
        "rank": 4,
        "rank_metric": "balanced",
        "credit_depth": 1,
    },
    "es_d_rtrl(low_rank 4, spike, credit_depth 1)": {**_LOW_RANK, "rank": 4, "rank_metric": "spike", "credit_depth": 1},
    "d_rtrl": {"algorithm": "d_rtrl"},
    "bptt": {"algorithm": "bptt"},
}


def _run_fields(task: str, batch: int, iterations: int, seed: int) -> dict:
    """`RunConfig` fields of the learning runs' recipe (lr 2e-3 with a cosine decay, clipping 1, one update
    per trial, no checkpoint)."""
    return {
        "task": task,
        "iterations": iterations,
        "batch": batch,
        "learning_rate": 2e-3,
        "update_every": 0,
        "seed": seed,
        "checkpoint_every": iterations + 1,
        "clip_norm": 1.0,
        "schedule": "cosine",
    }


def _time(args) -> int:
    """Seconds per training iteration, pp_prop and fusetrace alternating on the same batches."""
    batch, decay = RUN_SIZES.get(args.task, (32, 0.9))
    batch, decay = args.batch or batch, args.decay if args.decay is not None else decay
    fields = {**_run_fields(args.task, batch, iterations=100, seed=0), "network": args.network}
    peer = PeerRun(RunConfig(**fields, algorithm="d_rtrl"), decay)
    only = set(TIMED) if args.only is None else set(args.only)
    if only - set(TIMED):
        raise SystemExit(f"--only: unknown learners {sorted(only - set(TIMED))}; known: {sorted(TIMED)}")
    trainers = {}
    for name, options in TIMED.items():
        if name not in only:
            continue
        _, _, trainer, _ = build(RunConfig(**{**fields, **options}))
        trainers[name] = (trainer, trainer.init())

    def run(name: str, iteration: int) -> float:
        begin = time.perf_counter()
        if name == "pp_prop":
            peer.iteration(iteration)
        else:
            trainer, state = trainers[name]
            trainers[name] = (trainer, trainer.iteration({**state, "iteration": jnp.asarray(iteration)})[0])
        return time.perf_counter() - begin

    names = ["pp_prop", *trainers]
    for name in names:  # compile
        run(name, 0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            times[name].append(run(name, round_ + 1))
            print(f"round {round_ + 1} {name}: {times[name][-1]:.3f} s", flush=True)
    median = {name: float(np.median(t)) for name, t in times.items()}
    ratio = {name: median[name] / median["pp_prop"] for name in names}
    for name in names:
        print(f"{name}: {median[name]:.3f} s per iteration, {ratio[name]:.2f} x pp_prop")
    only = "" if args.only is None else "_only"
    common.write_json(
        common.RESULTS / f"learning_time_{args.task}{common.network_tag(args.network)}{only}{args.suffix}.json",
        {
            "task": args.task,
            "network": args.network,
            "batch": batch,
            "pp_prop_decay": decay,
            "seconds": times,
            "median": median,
            "ratio": ratio,
        },
    )
    return 0


def _compare(args) -> int:
    """Gradients of pp_prop, es_d_rtrl, d_rtrl and BPTT at pp_prop's weights along its own training run."""
    import jax

    decay = args.decay if args.decay is not None else RUN_SIZES.get(args.task, (32, 0.9))[1]
    fields = {
        **_run_fields(args.task, args.batch, iterations=max(max(args.at), 1), seed=args.seed),
        "network": args.network,
    }
    peer = PeerRun(RunConfig(**fields, algorithm="d_rtrl"), decay)
    learners = {
        "es_d_rtrl": build(RunConfig(**fields, algorithm="es_d_rtrl", decay=decay))[1],
        "d_rtrl": build(RunConfig(**fields, algorithm="d_rtrl"))[1],
    }
    for name in args.without:
        learners.pop(name)
    _, plain, bptt_trainer, _ = build(RunConfig(**fields, algorithm="bptt"))

    def online(learner, params, batch):
        mask = jnp.ones(batch.inputs.shape[0], bool)
        run = jax.jit(lambda p, s: learner.scan(p, s, batch.inputs, batch.targets, loss_mask=mask)[1].grads)
        return run(params, learner.init())

    def bptt(params, batch):
        def total(params):
            return jnp.sum(bptt_trainer._forward(params, batch.inputs, batch.targets, plain.constants)[0])

        return jax.jit(jax.grad(total))(params)

    def flat(tree) -> np.ndarray:
        return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)])

    def cosine(a, b) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))

    points, done = [], 0
    for at in sorted(args.at):
        while done < at:
            peer.iteration(done)
            done += 1
        batch = peer.trainer.batch(10_000 + at)  # a batch no run trains on
        params = peer.plain_params()
        found = {name: online(learner, params, batch) for name, learner in learners.items()}
        raw, _, _ = peer._train(batch.inputs, batch.targets)
        found["pp_prop"] = {".".join(map(str, _reverse_path(path))): value for path, value in raw.items()}
        reference = bptt(params, batch)
        weights = {}
        for path in reference:
            ref, pp = flat(reference[path]), flat(found["pp_prop"][path])
            small = np.abs(pp) <= np.median(np.abs(pp))
            row = {}
            for name, grads in found.items():
                g = flat(grads[path])
                row[name] = {
                    "cos_bptt": cosine(g, ref),
                    "cos_pp_prop": cosine(g, pp),
                    "norm_ratio_bptt": float(np.linalg.norm(g) / np.linalg.norm(ref)),
                    "sign_agrees_bptt": float(np.mean(np.sign(g) == np.sign(ref))),
                    "sign_agrees_bptt_small_half": float(np.mean((np.sign(g) == np.sign(ref))[small])),
                    "sign_agrees_pp_prop": float(np.mean(np.sign(g) == np.sign(pp))),
                }
                print(f"iteration {at} {path} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row[name].items()))
            weights[path] = row
        points.append({"iteration": at, "weights": weights})
    common.write_json(
        common.RESULTS / f"learning_compare_{args.task}{common.network_tag(args.network)}.json",
        {
            "task": args.task,
            "network": args.network,
            "batch": args.batch,
            "seed": args.seed,
            "decay": decay,
            "points": points,
        },
    )
    return 0


def _peer(args) -> int:
    options = dict(item.split("=", 1) for item in args.option)
    options = {k: float(v) for k, v in options.items()}
    config = RunConfig(
        task=args.task,
        algorithm="d_rtrl",  # the plain learner only serves the evaluation
        iterations=args.iterations,
        batch=args.batch,
        learning_rate=args.lr,
        update_every=0,
        seed=args.seed,
        checkpoint_every=args.iterations,
        clip_norm=args.clip,
        schedule=args.schedule,
        task_options=options,
        network=args.network,
    )
    run = PeerRun(config, args.decay)
    history, start = [], time.perf_counter()
    for iteration in range(args.time_only or args.iterations):
        begin = time.perf_counter()
        metrics = run.iteration(iteration)
        metrics["seconds"] = time.perf_counter() - begin
        history.append(metrics)
        print(f"iteration {iteration + 1}: {metrics}", flush=True)
        if args.validate_every and (iteration + 1) % args.validate_every == 0 and not args.time_only:
            seeds = range(args.seed + VALIDATION_SEEDS, args.seed + VALIDATION_SEEDS + args.validation_batches)
            found = run.trainer.evaluate(run.plain_params(), (run.trainer.sample(s) for s in seeds))
            history[-1].update({f"validation_{k}": v for k, v in found.items()})
    if args.time_only:
        print(json.dumps({"seconds_per_iteration": [h["seconds"] for h in history]}))
        return 0
    seeds = range(args.seed + TEST_SEEDS, args.seed + TEST_SEEDS + args.test_batches)
    test = run.trainer.evaluate(run.plain_params(), (run.trainer.sample(s) for s in seeds))
    summary = {
        "config": {**dataclasses.asdict(config), "algorithm": "pp_prop", "decay": args.decay},
        "iterations": len(history),
        "seconds": time.perf_counter() - start,
        "history": history,
        "test": {"trials": args.test_batches * args.batch, "final": test},
    }
    folder = pathlib.Path(args.run_dir or RUNS / f"{args.task}-pp_prop-s{args.seed}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(summary, indent=1))
    print(f"test ({args.test_batches * args.batch} trials): {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
