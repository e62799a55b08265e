"""Held-out evaluation: `Trainer.evaluate` against a direct brainstate simulation, and the CLI's
validation set, best-validation checkpoint and test report."""

import json
import shutil

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fusetrace
from fusetrace import checkpoint
from fusetrace.cli import TEST_SEEDS, VALIDATION_SEEDS, RunConfig, build
from fusetrace.cli import main as cli_main
from fusetrace.errors import CompileError
from fusetrace.trainer import BPTTTrainer, Trainer
from test_compile_exact import BATCH, _build, _loss
from test_trainer_checkpoint import Batch, _sample


@pytest.fixture(autouse=True)
def _dt():
    brainstate.environ.set(dt=1.0 * u.ms)


def _peak(outputs, batch):
    return {"peak": float(jnp.max(jnp.abs(outputs))), "first": float(batch.targets[0, 0, 0])}


def _simulated_losses(model, params: dict, batch: Batch) -> np.ndarray:
    """Per-step losses of `model` run directly in brainstate from its current (initial) states with
    `params`."""
    weights = {".".join(map(str, k)): s for k, s in model.states(brainstate.ParamState).items()}
    assert set(weights) == set(params)
    for path, value in params.items():
        weights[path].value = value
    losses = brainstate.transform.for_loop(lambda x, y: _loss(model.update(x), y), batch.inputs, batch.targets)
    return np.asarray(losses)


@pytest.mark.parametrize("trainer_class", [Trainer, BPTTTrainer])
def test_evaluate_equals_a_direct_simulation_with_the_given_params(trainer_class):
    """The mean loss and metrics over held-out batches, with params that are not the compiled ones,
    equal those of running the brainstate model itself; evaluating changes nothing."""
    model = _build("alif", "leaky", BATCH)
    learner = fusetrace.compile(model, _sample(0).inputs[0], loss=_loss, algorithm="d_rtrl", batch_size=BATCH)
    trainer = trainer_class(learner, _sample, optax.adam(1e-2), update_every=0, metric=_peak)
    params = jax.tree.map(lambda w: 1.3 * w + 0.05, learner.params)
    batches = [_sample(100 + j) for j in range(3)]
    got = trainer.evaluate(params, (batch for batch in batches))  # read one at a time
    losses = [_simulated_losses(_build("alif", "leaky", BATCH), params, batch) for batch in batches]
    assert got["loss"] == pytest.approx(np.mean([np.mean(loss) for loss in losses]), rel=1e-10)
    assert got["loss"] != pytest.approx(trainer.evaluate(learner.params, batches)["loss"], rel=1e-3)
    assert got["first"] == pytest.approx(np.mean([float(b.targets[0, 0, 0]) for b in batches]))
    assert got["peak"] > 0
    with pytest.raises(CompileError, match="without batches"):
        trainer.evaluate(params, [])


def _dms_run(tmp_path, *extra):
    args = ["train", "--task", "dms", "--algorithm", "es_d_rtrl", "--iterations", "4", "--batch", "2"]
    args += ["--option", "fixation_ms=[10,20]", "--option", "delay_ms=30", "--lr", "0.05"]
    args += ["--validate-every", "2", "--validation-batches", "2", "--test-batches", "3"]
    assert cli_main([*args, *extra, "--run-dir", str(tmp_path)]) == 0
    return json.loads((tmp_path / "metrics.json").read_text())


def test_cli_validates_keeps_the_best_params_and_tests_them(tmp_path, capsys):
    """Validation every 2 iterations on held-out trials; the best-validation params are kept and, with
    the final params, tested on fresh trials; every reported number is reproduced by `evaluate`."""
    metrics = _dms_run(tmp_path)
    printed = capsys.readouterr().out
    history = metrics["history"]
    validated = [i for i, h in enumerate(history) if "validation_accuracy" in h]
    assert validated == [1, 3]
    config = RunConfig(**json.loads((tmp_path / "config.json").read_text()))
    _, _, trainer, _ = build(config)
    validation = [trainer.sample(config.seed + VALIDATION_SEEDS + j) for j in range(2)]
    test = [trainer.sample(config.seed + TEST_SEEDS + j) for j in range(3)]
    training_seeds = {config.seed + i for i in range(config.iterations)}
    assert training_seeds.isdisjoint({config.seed + VALIDATION_SEEDS + j for j in range(2)})
    scores = [history[i]["validation_accuracy"] for i in validated]
    best_iteration = validated[int(np.argmax(scores))] + 1
    best = checkpoint.latest(tmp_path / "best")
    assert best is not None and int(best.name.split("-")[1]) == best_iteration
    best_state, meta = checkpoint.restore(best, trainer.init())
    assert meta["validation"]["accuracy"] == pytest.approx(max(scores), abs=0)
    assert trainer.evaluate(best_state["params"], validation)["loss"] == pytest.approx(
        history[best_iteration - 1]["validation_loss"], rel=1e-6
    )
    final, _ = checkpoint.restore(checkpoint.latest(tmp_path), trainer.init())
    report = metrics["test"]
    assert report["trials"] == 3 * 2 and report["best"]["iteration"] == best_iteration
    for which, state in (("final", final), ("best", best_state)):
        again = trainer.evaluate(state["params"], test)
        assert report[which]["accuracy"] == pytest.approx(again["accuracy"], abs=1e-12)
        assert report[which]["loss"] == pytest.approx(again["loss"], rel=1e-6)
        assert f"{which} params" in printed


def test_cli_resume_with_validation_equals_an_uninterrupted_run(tmp_path):
    """A validated run stopped after 2 iterations and resumed has the history, best checkpoint and
    test report of one that ran straight through."""
    whole = _dms_run(tmp_path / "whole", "--checkpoint-every", "2")
    _dms_run(tmp_path / "cut", "--checkpoint-every", "2")
    cut = tmp_path / "cut"
    config = json.loads((cut / "config.json").read_text())
    # rewind: keep checkpoint 2 only, as if the process had died after writing it
    for folder in (cut / "checkpoints").glob("step-*"):
        if folder.name != "step-00000002":
            shutil.rmtree(folder)
    (cut / "checkpoints" / "latest").write_text("step-00000002")
    assert cli_main(["train", "--resume", str(cut)]) == 0
    resumed = json.loads((cut / "metrics.json").read_text())
    assert config["validate_every"] == 2
    assert resumed["history"] == whole["history"] and resumed["test"] == whole["test"]


def test_a_new_run_in_an_old_folder_drops_its_best_weights(tmp_path, capsys):
    """Best weights belong to the run that validated them: a new run in the same folder, without
    validation, neither tests nor keeps them."""
    _dms_run(tmp_path)
    assert checkpoint.latest(tmp_path / "best") is not None
    capsys.readouterr()
    args = ["train", "--task", "dms", "--algorithm", "es_d_rtrl", "--iterations", "1", "--batch", "2"]
    args += ["--option", "fixation_ms=[10,20]", "--option", "delay_ms=30", "--test-batches", "1"]
    assert cli_main([*args, "--run-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert set(report) == {"trials", "final"} and checkpoint.latest(tmp_path / "best") is None
    assert "best params" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--validate-every", "-1"], "must be >= 0"),
        (["--validation-batches", "0"], "must be positive"),
        (["--test-batches", "x"], "is not an integer"),
    ],
)
def test_cli_rejects_bad_validation_options(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["train", "--task", "dms", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def small_dms_network():
    """A 7-neuron DMS network, for `--network test_validation:small_dms_network`."""
    from fusetrace.tasks import dms_network

    return dms_network(n_rec=7)


def test_cli_trains_a_network_given_as_module_factory(tmp_path, capsys):
    """`--network MODULE:FACTORY` replaces the task's reference network, is saved in config.json and
    used again on resume; a factory that does not return a module is one clear error line."""
    args = ["train", "--task", "dms", "--algorithm", "d_rtrl", "--iterations", "2", "--batch", "2"]
    args += ["--option", "fixation_ms=[10,20]", "--option", "delay_ms=10", "--checkpoint-every", "1"]
    assert cli_main([*args, "--network", "test_validation:small_dms_network", "--run-dir", str(tmp_path)]) == 0
    config = RunConfig(**json.loads((tmp_path / "config.json").read_text()))
    assert config.network == "test_validation:small_dms_network"
    model, _, trainer, _ = build(config)
    assert model.neurons.varshape == (7,)
    state, _ = checkpoint.restore(checkpoint.latest(tmp_path), trainer.init())
    assert np.shape(u.get_mantissa(state["params"]["rec.comm.weight"]["weight"])) == (7, 7)
    capsys.readouterr()
    assert cli_main([*args, "--network", "builtins:dict", "--run-dir", str(tmp_path / "bad")]) == 2
    assert "not a brainstate module" in capsys.readouterr().err
    assert cli_main([*args, "--network", "no_colon", "--run-dir", str(tmp_path / "bad")]) == 2
    assert "MODULE:FACTORY" in capsys.readouterr().err
