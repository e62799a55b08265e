"""Training loop and checkpoints: exact save/restore, atomic writes, bit-exact resume, CLI errors."""

import dataclasses
import json
import pathlib
import signal
import subprocess
import sys
import time

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fusetrace
from fusetrace import checkpoint, tasks
from fusetrace.cli import main as cli_main
from fusetrace.errors import CompileError
from fusetrace.passes.fuse import DEFAULT_CREDIT_DEPTH
from fusetrace.trainer import Trainer
from test_compile_exact import BATCH, N_IN, N_OUT, STEPS, _build, _loss


@dataclasses.dataclass(frozen=True)
class Batch:
    inputs: jax.Array
    targets: jax.Array


def _sample(seed):
    key = jax.random.PRNGKey(seed)
    xs = (jax.random.uniform(key, (STEPS, BATCH, N_IN)) < 0.6).astype(jnp.float64)
    return Batch(xs, jax.random.normal(jax.random.fold_in(key, 1), (STEPS, BATCH, N_OUT)))


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _trainer(update_every=1):
    learner = fusetrace.compile(
        _build("cuba", "leaky", BATCH), _sample(0).inputs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH
    )
    return Trainer(learner, _sample, optax.adam(1e-2), update_every=update_every, clip_norm=1.0, seed=5)


def _equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("update_every", [0, 1, 3])
def test_training_changes_params_and_update_schedule_matters(update_every):
    trainer = _trainer(update_every)
    state = trainer.init()
    new, result = trainer.iteration(state)
    assert np.isfinite(result.loss) and int(new["iteration"]) == 1
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(new["params"]), strict=True)
    ]
    assert all(moved)


def test_update_every_zero_equals_one_step_on_the_summed_online_gradient():
    trainer = _trainer(0)
    state = trainer.init()
    new, _ = trainer.iteration(state)
    learner, batch = trainer.learner, _sample(5)
    s, total = learner.init(), None
    for x, y in zip(batch.inputs, batch.targets, strict=True):
        s, res = learner.step(state["params"], s, x, y)
        total = res.grads if total is None else jax.tree.map(jnp.add, total, res.grads)
    expected, _ = trainer._apply(state["params"], state["opt_state"], total)
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)


def test_checkpoint_round_trip_is_exact_with_units_and_keys(tmp_path):
    state = {
        "w": u.Quantity(jnp.arange(6.0).reshape(2, 3), unit=u.mA),
        "key": jax.random.key(3),
        "n": jnp.asarray(7, jnp.int32),
    }
    checkpoint.save(tmp_path, 7, state, {"note": "x"})
    restored, meta = checkpoint.restore(checkpoint.latest(tmp_path), state)
    _equal(state, restored)
    assert u.get_unit(restored["w"]) == u.mA and meta["note"] == "x" and meta["step"] == 7


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    state = {"w": jnp.ones(3)}
    checkpoint.save(tmp_path, 1, state)

    def crash(handle, **arrays):
        handle.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {"w": 2 * jnp.ones(3)})
    monkeypatch.undo()
    folder = checkpoint.latest(tmp_path)
    assert folder.name == "step-00000001"
    restored, _ = checkpoint.restore(folder, state)
    _equal(restored, state)
    assert not any(p.name.startswith(".step-") for p in (tmp_path / "checkpoints").iterdir())


def test_restore_rejects_a_mismatched_state(tmp_path):
    checkpoint.save(tmp_path, 1, {"w": jnp.ones(3)})
    with pytest.raises(checkpoint.CheckpointError, match="expects"):
        checkpoint.restore(checkpoint.latest(tmp_path), {"w": jnp.ones(4)})
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.restore(tmp_path / "nowhere", {"w": jnp.ones(3)})


def test_resume_continues_bit_for_bit(tmp_path):
    uninterrupted = _trainer()
    state = uninterrupted.init()
    for _ in range(4):
        state, _ = uninterrupted.iteration(state)
    first = _trainer()
    partial = first.init()
    for _ in range(2):
        partial, _ = first.iteration(partial)
    checkpoint.save(tmp_path, 2, partial)
    second = _trainer()  # a fresh process would rebuild everything like this
    resumed, _ = checkpoint.restore(checkpoint.latest(tmp_path), second.init())
    for _ in range(2):
        resumed, _ = second.iteration(resumed)
    _equal(state, resumed)


def test_trainer_rejects_bad_schedule():
    with pytest.raises(fusetrace.errors.CompileError, match="update_every"):
        Trainer(_trainer().learner, _sample, optax.sgd(0.1), update_every=-1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--task", "no-such-task"], "unknown task"),
        (["train"], "--task is required"),
        (["train", "--resume", "/nonexistent/run"], "no config.json"),
        (["inspect", "nocolon"], "MODULE:FACTORY"),
        (["inspect", "no_such_module_xyz:f"], "No module named"),
        (["train", "--task", "copy", "--rate-reg", "-1"], "non-negative"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusetrace: error:") and message in err[0], err


def test_cli_argument_errors_exit_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "fusetrace.cli", "train", "--batch", "0"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["fusetrace: error: argument --batch: '0' must be positive"]


def test_cli_inspect_prints_the_summary_and_draws(tmp_path, capsys, monkeypatch):
    module = tmp_path / "my_models.py"
    module.write_text(
        "import jax.numpy as jnp\n"
        "from test_compile_exact import _build\n"
        "def make():\n"
        "    return _build('cuba', 'leaky', None), jnp.zeros(3)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    assert cli_main(["inspect", "my_models:make", "--out", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "hidden groups:" in out and "proj.comm.weight.weight: traced" in out
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_bptt_baseline_equals_d_rtrl_in_the_exact_regime():
    """The BPTT trainer (whole-sequence gradient through the captured step) and the online d_rtrl
    trainer with one update per sequence take the same step on a feed-forward layer."""
    from fusetrace.trainer import BPTTTrainer

    learner = _trainer().learner
    bptt = BPTTTrainer(learner, _sample, optax.sgd(1.0), seed=5)
    online = Trainer(learner, _sample, optax.sgd(1.0), update_every=0, seed=5)
    start = bptt.init()
    (a, _), (b, _) = bptt.iteration(start), online.iteration(start)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10)
    with pytest.raises(fusetrace.errors.CompileError, match="BPTT"):
        BPTTTrainer(learner, _sample, optax.sgd(1.0), update_every=1)


def test_cli_train_with_factorisation_and_rate_regularisation(tmp_path, capsys):
    """The es_d_rtrl factorisation, the credit rounds and the firing-rate regulariser reach the learner from
    the command line, are saved in config.json, and the regularised run differs from the plain one."""
    from fusetrace.cli import RunConfig, build

    args = ["train", "--task", "copy", "--algorithm", "es_d_rtrl", "--iterations", "2", "--batch", "2"]
    args += ["--factorisation", "averaged", "--option", "lag=5", "--checkpoint-every", "2"]
    assert cli_main([*args, "--run-dir", str(tmp_path / "plain")]) == 0
    reg = ["--rate-reg", "5", "--target-rate", "0", "--schedule", "cosine", "--loop-hops", "2", "--own-loop-hops", "1"]
    reg += ["--credit-depth", "3"]
    assert cli_main([*args, *reg, "--run-dir", str(tmp_path / "reg")]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "reg" / "config.json").read_text())
    assert config["factorisation"] == "averaged" and config["rate_reg"] == 5.0 and config["target_rate_hz"] == 0.0
    assert config["schedule"] == "cosine" and (config["loop_hops"], config["own_loop_hops"]) == (2, 1)
    assert config["credit_depth"] == 3
    learner = build(RunConfig(**config))[1]
    assert (learner.plan.hops, learner.plan.own_hops, learner.plan.factorisation) == (2, 1, "averaged")
    assert learner.plan.depth == 3
    plain, reg = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("plain", "reg"))
    assert reg["history"][0]["loss"] > plain["history"][0]["loss"]  # the penalty of the first batch is added


def test_cli_train_with_the_balanced_low_rank_trace(tmp_path, capsys):
    """`--rank-metric` reaches the learner and is saved in config.json; a config saved before the option
    (without the field) builds the plain truncation, as it ran."""
    from fusetrace.cli import RunConfig, build

    args = ["train", "--task", "copy", "--algorithm", "es_d_rtrl", "--iterations", "1", "--batch", "2"]
    args += ["--factorisation", "low_rank", "--rank", "2", "--rank-metric", "balanced", "--option", "lag=5"]
    assert cli_main([*args, "--run-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rank_metric"] == "balanced"
    assert build(RunConfig(**config))[1].plan.rank_metric == "balanced"
    del config["rank_metric"]
    assert build(RunConfig(**config))[1].plan.rank_metric == "plain"


def test_cli_demo_runs_the_recipe_the_readme_describes(tmp_path, capsys):
    """`fusetrace demo` trains es_d_rtrl with the evidence task's demo settings (README: shortened task,
    batch 64, Adam 2e-3 clipped to 1, `credit_depth=1`), and they reach the learner."""
    from fusetrace.cli import RunConfig, build

    assert cli_main(["demo", "--iterations", "1", "--run-dir", str(tmp_path)]) == 0
    assert "final accuracy" in capsys.readouterr().out
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["task"], config["algorithm"], config["batch"]) == ("evidence", "es_d_rtrl", 64)
    assert (config["learning_rate"], config["clip_norm"], config["task_options"]) == (2e-3, 1.0, {"shorten": 0.2})
    assert config["credit_depth"] == 1
    assert config["network"] == "fusetrace.tasks:ei_evidence_network"  # e-prop's LIF/ALIF network, as the README says
    model, learner = build(RunConfig(**config))[:2]
    assert isinstance(model, tasks.EvidenceNetwork) and learner.plan.depth == 1
    assert len(json.loads((tmp_path / "metrics.json").read_text())["history"]) == 1


def test_a_run_saved_before_the_loop_options_resumes_as_it_ran(tmp_path, capsys):
    """A config.json written before `loop_hops` existed followed no loop: `--resume` keeps it at 0 (its
    traces are the checkpoint's), not the new default."""
    args = ["train", "--task", "copy", "--algorithm", "es_d_rtrl", "--iterations", "1", "--batch", "2"]
    assert cli_main([*args, "--checkpoint-every", "1", "--run-dir", str(tmp_path)]) == 0
    config_file = tmp_path / "config.json"
    old = json.loads(config_file.read_text())
    del old["loop_hops"], old["own_loop_hops"], old["credit_depth"]
    config_file.write_text(json.dumps({**old, "iterations": 2}))
    assert cli_main(["train", "--resume", str(tmp_path)]) == 0
    capsys.readouterr()
    resumed = json.loads(config_file.read_text())
    assert (resumed["loop_hops"], resumed["own_loop_hops"], resumed["iterations"]) == (0, 0, 2)
    assert resumed["credit_depth"] == DEFAULT_CREDIT_DEPTH  # what every run had before the option (compile's default)


def test_cosine_schedule_spans_every_update_of_the_run():
    from fusetrace.cli import RunConfig, _learning_rate

    base = {"task": "copy", "algorithm": "es_d_rtrl", "iterations": 10, "batch": 2, "learning_rate": 0.1}
    base |= {"seed": 0, "checkpoint_every": 5, "schedule": "cosine"}
    once = _learning_rate(RunConfig(**base, update_every=0), steps=50)  # one update per sequence
    every = _learning_rate(RunConfig(**base, update_every=5), steps=50)  # ten per sequence
    assert float(once(0)) == pytest.approx(0.1) and float(once(10)) == pytest.approx(0.0)
    assert float(every(50)) == pytest.approx(0.05) and float(every(100)) == pytest.approx(0.0)
    assert _learning_rate(RunConfig(**{**base, "schedule": "constant"}, update_every=0), steps=50) == 0.1


def test_old_checkpoints_are_pruned(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, {"w": jnp.full(2, float(step))}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000004", "step-00000005"]
    restored, _ = checkpoint.restore(checkpoint.latest(tmp_path), {"w": jnp.zeros(2)})
    np.testing.assert_array_equal(np.asarray(restored["w"]), [5.0, 5.0])


STOPPED_RUN = ["train", "--task", "copy", "--algorithm", "e_prop", "--iterations", "12", "--batch", "4"]
STOPPED_RUN += ["--option", "lag=150", "--checkpoint-every", "1", "--seed", "3"]
COMMAND = [sys.executable, "-m", "fusetrace.cli"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The run folder of STOPPED_RUN, trained to the end in a process of its own."""
    whole = tmp_path_factory.mktemp("whole")
    subprocess.run([*COMMAND, *STOPPED_RUN, "--run-dir", str(whole)], check=True, capture_output=True)
    return whole


def _signal_after_first_checkpoint(run_dir, signum) -> subprocess.Popen:
    """Start STOPPED_RUN in `run_dir` and send it `signum` once its first checkpoint is complete."""
    process = subprocess.Popen(
        [*COMMAND, *STOPPED_RUN, "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while checkpoint.latest(run_dir) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    return process


def _assert_same_final_checkpoint(a_dir, b_dir):
    with np.load(checkpoint.latest(a_dir) / "arrays.npz") as a, np.load(checkpoint.latest(b_dir) / "arrays.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.slow
def test_cli_train_killed_mid_run_resumes_exactly(tmp_path, uninterrupted_run):
    """SIGKILL a real `fusetrace train` process after its first checkpoint, resume it, and compare
    with an uninterrupted run: the final checkpoints are identical array for array."""
    killed = tmp_path / "killed"
    process = _signal_after_first_checkpoint(killed, signal.SIGKILL)
    process.communicate()
    stopped_at = int(checkpoint.latest(killed).name.split("-")[1])
    assert stopped_at < 12, "the run finished before it could be killed; the test proves nothing"
    subprocess.run([*COMMAND, "train", "--resume", str(killed)], check=True, capture_output=True)
    _assert_same_final_checkpoint(uninterrupted_run, killed)


@pytest.mark.slow
def test_cli_train_terminated_checkpoints_its_last_iteration_and_resumes_exactly(tmp_path, uninterrupted_run):
    """SIGTERM a real `fusetrace train` process: it finishes the iteration under way, writes it as a
    final checkpoint, says so in one line and exits with 143 (128 + SIGTERM); `--resume` then ends on
    the uninterrupted run's weights bit for bit."""
    stopped = tmp_path / "stopped"
    process = _signal_after_first_checkpoint(stopped, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.decode().splitlines() if line.startswith("fusetrace:")]
    assert process.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    stopped_at = int(checkpoint.latest(stopped).name.split("-")[1])
    assert stopped_at < 12, "the run finished before the signal; the test proves nothing"
    assert len(lines) == 1 and f"SIGTERM after iteration {stopped_at} of 12" in lines[0], lines
    assert f"--resume {stopped}" in lines[0]
    subprocess.run([*COMMAND, "train", "--resume", str(stopped)], check=True, capture_output=True)
    _assert_same_final_checkpoint(uninterrupted_run, stopped)


def _masked_trainer(gradient_every, update_every, read_every=5, algorithm="es_d_rtrl"):
    """STEPS = 10 steps whose loss is read at steps 4 and 9 only (mask in the target)."""

    def sample(seed):
        batch = _sample(seed)
        mask = (jnp.arange(STEPS) % read_every == read_every - 1).astype(jnp.float64)
        return Batch(batch.inputs, (batch.targets, jnp.broadcast_to(mask[:, None], (STEPS, BATCH))))

    def loss(output, target):
        y, mask = target
        return jnp.sum(mask * jnp.sum((output - y) ** 2, axis=-1))

    first = sample(0)
    learner = fusetrace.compile(
        _build("alif", "leaky", BATCH),
        first.inputs[0],
        loss=loss,
        algorithm=algorithm,
        batch_size=BATCH,
        example_target=jax.tree.map(lambda a: a[0], first.targets),
    )
    return Trainer(learner, sample, optax.adam(1e-2), update_every=update_every, gradient_every=gradient_every, seed=3)


@pytest.mark.parametrize("algorithm", ["d_rtrl", "es_d_rtrl"])
@pytest.mark.parametrize("update_every", [0, 5])
def test_gradient_every_k_equals_every_step_when_the_loss_is_read_every_k(update_every, algorithm):
    sparse, dense = (
        _masked_trainer(5, update_every, algorithm=algorithm),
        _masked_trainer(1, update_every, algorithm=algorithm),
    )
    state_s, state_d = sparse.init(), dense.init()
    for _ in range(2):
        state_s, result_s = sparse.iteration(state_s)
        state_d, result_d = dense.iteration(state_d)
        np.testing.assert_allclose(result_s.loss, result_d.loss, rtol=1e-12)
        assert result_s.outputs.shape == result_d.outputs.shape
    assert not np.array_equal(
        np.asarray(jax.tree.leaves(state_d["params"])[0]), np.asarray(jax.tree.leaves(dense.init()["params"])[0])
    )
    for a, b in zip(jax.tree.leaves(state_s["params"]), jax.tree.leaves(state_d["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-13)


def test_gradient_every_refuses_a_loss_it_would_drop():
    trainer = _masked_trainer(5, 5, read_every=2)  # read at odd steps too: skipped steps carry loss
    with pytest.raises(CompileError, match="non-zero loss"):
        trainer.iteration(trainer.init())
    with pytest.raises(CompileError, match="gradient_every=3 with update_every=5"):
        Trainer(trainer.learner, trainer.sample, optax.adam(1e-2), update_every=5, gradient_every=3)
    with pytest.raises(CompileError, match="multiple of gradient_every"):
        Trainer(trainer.learner, trainer.sample, optax.adam(1e-2), update_every=0, gradient_every=3).iteration(
            trainer.init()
        )
