"""Training faults: a non-finite loss, gradient or weight stops the run (or skips the update, by
option) and never reaches a checkpoint; Ctrl-C writes a final checkpoint that `--resume` continues
exactly; an unwritable, full or failing run folder is a one-line error before training or a clean stop
with the last checkpoint intact. The real-subprocess SIGTERM test is in test_trainer_checkpoint.py,
beside the SIGKILL one (they share the uninterrupted reference run)."""

import dataclasses
import errno
import json
import os
import signal

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fusetrace
from fusetrace import checkpoint, cli
from fusetrace.errors import CompileError, NonFiniteError
from fusetrace.trainer import BPTTTrainer, Trainer
from test_compile_exact import BATCH, _build
from test_trainer_checkpoint import Batch, _equal, _sample, _trainer

BAD_ITERATION, BAD_STEP = 1, 4  # where the poisoned batches put their NaN (0-based iteration index)


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _masked(seed, poison):
    """`_sample(seed)` with per-step masks; `poison` puts a NaN target at BAD_STEP, the clean twin masks
    that step out instead (the update it would make is zero)."""
    batch = _sample(seed)
    mask = jnp.ones(batch.targets.shape[:2])
    if poison == "nan":
        return Batch(batch.inputs, (batch.targets.at[BAD_STEP, 0, 0].set(jnp.nan), mask))
    return Batch(batch.inputs, (batch.targets, mask.at[BAD_STEP].set(0.0) if poison == "masked" else mask))


def _masked_loss(output, target):
    y, mask = target
    return jnp.sum(mask[:, None] * (output - y) ** 2)


def _masked_trainer(poison, on_nonfinite="stop", update_every=1, optimizer=None):
    first = _masked(0, None)
    learner = fusetrace.compile(
        _build("cuba", "leaky", BATCH),
        first.inputs[0],
        loss=_masked_loss,
        algorithm="d_rtrl",
        batch_size=BATCH,
        example_target=jax.tree.map(lambda a: a[0], first.targets),
    )

    def sample(seed):
        return _masked(seed, poison if seed == BAD_ITERATION else None)

    return Trainer(learner, sample, optimizer or optax.sgd(0.1), update_every=update_every, on_nonfinite=on_nonfinite)


def _four_parts(message: str) -> bool:
    return all(f"\n  {part}:" in message for part in ("where", "why", "fix"))


def _finite(tree) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(u.get_mantissa(x)))) for x in jax.tree.leaves(tree, is_leaf=u.math.is_quantity)
    )


def test_a_nonfinite_loss_stops_training_naming_the_iteration_and_step():
    trainer = _masked_trainer("nan")
    state, _ = trainer.iteration(trainer.init())
    with pytest.raises(NonFiniteError) as caught:
        trainer.iteration(state)
    message = str(caught.value)
    assert isinstance(caught.value, FloatingPointError) and _four_parts(message)
    first = message.splitlines()[0]
    assert f"iteration {BAD_ITERATION + 1}" in first and f"time step {BAD_STEP}" in first and "loss" in first, first
    assert "on_nonfinite='skip'" in message


def test_a_nonfinite_gradient_under_a_finite_loss_names_the_weights():
    @jax.custom_jvp
    def poisoned(x):
        return x

    poisoned.defjvp(lambda primals, tangents: (primals[0], tangents[0] * jnp.nan))
    clean = _trainer()
    learner = dataclasses.replace(clean.learner, loss=lambda out, y: jnp.sum(poisoned((out - y) ** 2)))
    trainer = Trainer(learner, _sample, optax.sgd(0.1))
    with pytest.raises(NonFiniteError, match=r"iteration 1: non-finite gradient of `out.weight`, `proj.*time step 0"):
        trainer.iteration(trainer.init())


@pytest.mark.parametrize("update_every", [1, 0])
def test_skip_mode_skips_exactly_the_poisoned_update_and_counts_it(update_every):
    """A NaN target at one step: with update_every=1 only that step's update is dropped (the result equals
    a run whose loss is masked out there); with update_every=0 the sequence's single update is dropped."""
    skip = _masked_trainer("nan", "skip", update_every)
    reference = _masked_trainer("masked", "skip", update_every)
    state, ref = skip.init(), reference.init()
    for iteration in range(3):
        before = state["params"]
        state, result = skip.iteration(state)
        ref, ref_result = reference.iteration(ref)
        assert result.metrics["skipped_updates"] == (iteration == BAD_ITERATION)
        assert ref_result.metrics["skipped_updates"] == 0
        assert _finite(state)
        if iteration == BAD_ITERATION:
            assert np.isnan(result.loss)
            if update_every == 0:
                _equal(state["params"], before)
        if update_every == 1:
            _equal(state["params"], ref["params"])


@pytest.mark.parametrize("trainer_class", [Trainer, BPTTTrainer])
def test_an_update_that_overflows_the_weights_is_refused(trainer_class):
    """Finite loss and gradients, but a step size that sends the weights to infinity."""
    learner = _trainer().learner
    overflow = optax.chain(optax.scale(1e308), optax.scale(1e308))
    stop = trainer_class(learner, _sample, overflow, update_every=0)
    with pytest.raises(NonFiniteError, match="made the weights non-finite"):
        stop.iteration(stop.init())
    skip = trainer_class(learner, _sample, overflow, update_every=0, on_nonfinite="skip")
    state, result = skip.iteration(skip.init())
    assert result.metrics["skipped_updates"] == 1
    _equal(state["params"], learner.params)
    with pytest.raises(CompileError, match="on_nonfinite"):
        Trainer(learner, _sample, optax.sgd(0.1), on_nonfinite="ignore")


def test_checkpoint_save_refuses_nonfinite_values(tmp_path):
    checkpoint.save(tmp_path, 1, {"params": {"w": jnp.ones(3)}})
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(checkpoint.CheckpointError, match=r"\['params'\]\['w'\]") as caught:
            checkpoint.save(tmp_path, 2, {"params": {"w": jnp.ones(3).at[1].set(bad)}})
        assert _four_parts(str(caught.value))
    assert checkpoint.latest(tmp_path).name == "step-00000001"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step-00000001"]


def test_rewriting_a_step_that_fails_midway_keeps_the_checkpoint(tmp_path, monkeypatch):
    """Saving a step that already exists replaces it without a moment where `latest` names nothing."""
    checkpoint.save(tmp_path, 1, {"w": jnp.ones(3)})
    real_replace = os.replace

    def crash(source, target):
        if str(source).rsplit(os.sep, 1)[-1].startswith(".step-"):  # the new copy moving into place
            raise OSError(errno.EIO, "simulated failure")
        real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(tmp_path, 1, {"w": 2 * jnp.ones(3)})
    monkeypatch.undo()
    restored, _ = checkpoint.restore(checkpoint.latest(tmp_path), {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(3))
    checkpoint.save(tmp_path, 1, {"w": 2 * jnp.ones(3)})
    restored, _ = checkpoint.restore(checkpoint.latest(tmp_path), {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(np.asarray(restored["w"]), 2 * np.ones(3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]


# --- the command line --------------------------------------------------------------------------------

TRAIN = ["train", "--task", "copy", "--algorithm", "e_prop", "--iterations", "4", "--batch", "2"]
TRAIN += ["--option", "lag=5", "--seed", "0"]


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fusetrace:")]
    assert len(err) == 1, err
    return err[0]


def _poison_the_task(monkeypatch, iteration: int):
    """The copy task with a NaN target in the batch of `iteration` (seed 0 + iteration)."""
    spec = cli._spec("copy")

    def generate(batch, seed, **options):
        task = spec.generate(batch, seed, **options)
        return dataclasses.replace(task, targets=task.targets.at[3].set(jnp.nan)) if seed == iteration else task

    monkeypatch.setattr(cli, "_spec", lambda name: dataclasses.replace(spec, generate=generate))


def _step_of(run_dir) -> int:
    return int(checkpoint.latest(run_dir).name.split("-")[1])


def _stored_finite(run_dir) -> bool:
    with np.load(checkpoint.latest(run_dir) / "arrays.npz") as data:
        return all(np.all(np.isfinite(data[name])) for name in data.files if data[name].dtype.kind == "f")


def test_cli_stops_on_nonfinite_keeps_the_last_finite_checkpoint_and_resumes_skipping(tmp_path, monkeypatch, capsys):
    _poison_the_task(monkeypatch, iteration=2)
    run = tmp_path / "run"
    assert cli.main([*TRAIN, "--checkpoint-every", "3", "--run-dir", str(run)]) == 2
    line = _one_line(capsys)
    assert "iteration 3" in line and "non-finite loss" in line and "step-00000002" in line, line
    assert "--on-nonfinite skip" in line
    assert _step_of(run) == 2 and _stored_finite(run)
    assert cli.main(["train", "--resume", str(run), "--on-nonfinite", "skip"]) == 0
    assert _step_of(run) == 4 and _stored_finite(run)
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h.get("skipped_updates", 0) for h in history] == [0, 0, 1, 0]
    assert json.loads((run / "config.json").read_text())["on_nonfinite"] == "skip"


def test_cli_refuses_an_unwritable_run_folder_before_training(tmp_path, monkeypatch, capsys):
    """`checkpoints` is a file (a folder it cannot write into, whoever runs the test); the same for
    `--resume`. Neither run builds the network."""

    def no_build(config):
        raise AssertionError("the run started although it could not write its checkpoints")

    monkeypatch.setattr(cli, "build", no_build)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "checkpoints").write_text("not a folder")
    assert cli.main([*TRAIN, "--run-dir", str(run)]) == 2
    line = _one_line(capsys)
    assert "cannot write checkpoints" in line and str(run) in line, line
    config = {"task": "copy", "algorithm": "e_prop", "iterations": 4, "batch": 2, "learning_rate": 0.1}
    (run / "config.json").write_text(json.dumps(config | {"update_every": 0, "seed": 0, "checkpoint_every": 1}))
    assert cli.main(["train", "--resume", str(run)]) == 2
    assert "cannot write checkpoints" in _one_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_refuses_a_read_only_run_folder_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "build", lambda config: pytest.fail("built although the folder is read-only"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").chmod(0o555)
    try:
        assert cli.main([*TRAIN, "--run-dir", str(run)]) == 2
    finally:
        (run / "checkpoints").chmod(0o755)
    assert "cannot write checkpoints" in _one_line(capsys)


def test_cli_refuses_a_full_run_folder_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "iteration", lambda self, state: pytest.fail("trained on a full disk"))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    assert cli.main([*TRAIN, "--run-dir", str(tmp_path / "run")]) == 2
    line = _one_line(capsys)
    assert "free" in line and "checkpoint" in line, line


def test_cli_write_failure_mid_run_stops_with_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    real_savez, calls = np.savez, []

    def disk_full(handle, **arrays):
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(handle, **arrays)

    monkeypatch.setattr(checkpoint.np, "savez", disk_full)
    run = tmp_path / "run"
    assert cli.main([*TRAIN, "--checkpoint-every", "1", "--run-dir", str(run)]) == 2
    line = _one_line(capsys)
    assert "No space left on device" in line and "step-00000001" in line and "--resume" in line, line
    assert _step_of(run) == 1 and _stored_finite(run)
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())


def test_ctrl_c_writes_a_final_checkpoint_of_the_last_iteration(tmp_path, monkeypatch, capsys):
    """SIGINT (Ctrl-C) delivered to this process during iteration 3 of 4: the iteration finishes, exit
    status 130, a one-line message, checkpoint 2 although --checkpoint-every is 10, holding the state
    after iteration 2, and the previous SIGINT handler is back. (That `--resume` from such a checkpoint
    ends bit for bit on the uninterrupted run's weights is the SIGTERM subprocess test's job: both
    signals take the same path.)"""
    iteration, states = Trainer.iteration, []

    def interrupt_in_third(self, state):
        if int(state["iteration"]) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled between bytecodes: during this iteration
        state, result = iteration(self, state)
        states.append(state)
        return state, result

    monkeypatch.setattr(Trainer, "iteration", interrupt_in_third)
    handler = signal.getsignal(signal.SIGINT)
    run = tmp_path / "run"
    assert cli.main([*TRAIN, "--checkpoint-every", "10", "--run-dir", str(run)]) == 130
    line = _one_line(capsys)
    assert "SIGINT" in line and "after iteration 3 of 4" in line and f"--resume {run}" in line, line
    assert signal.getsignal(signal.SIGINT) is handler
    assert _step_of(run) == 3 and len(states) == 3
    restored, meta = checkpoint.restore(checkpoint.latest(run), states[-1])
    _equal(restored, states[-1])
    assert len(meta["history"]) == 3
