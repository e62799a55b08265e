"""`fusetrace train --freeze PATH`: the named parameters keep their initial values, the others learn; the
option is saved for `--resume`, and an unknown path is a one-line error."""

import json

import jax
import numpy as np

from fusetrace import checkpoint
from fusetrace.cli import RunConfig, build, main

ARGS = [
    "train",
    "--task",
    "xor",
    "--algorithm",
    "d_rtrl",
    "--iterations",
    "2",
    "--batch",
    "2",
    "--checkpoint-every",
    "2",
]


def _params(run_dir, config):
    _, learner, trainer, _ = build(config)
    state, _ = checkpoint.restore(checkpoint.latest(run_dir), trainer.init())
    return learner.params, state["params"]


def _flat(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_frozen_parameters_keep_their_initial_values(tmp_path, capsys):
    assert main([*ARGS, "--freeze", "in1", "--run-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["freeze"] == ["in1"]
    initial, trained = _params(tmp_path, RunConfig(**saved))
    for path in initial:
        unchanged = all(np.array_equal(a, b) for a, b in zip(_flat(initial[path]), _flat(trained[path]), strict=True))
        assert unchanged == path.startswith("in1."), path


def test_an_unknown_frozen_path_is_a_one_line_error(tmp_path, capsys):
    assert main([*ARGS, "--freeze", "nothing", "--run-dir", str(tmp_path)]) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("fusetrace: error: --freeze nothing") and "in1.comm.weight" in error, error
