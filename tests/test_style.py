"""The code base stays lint-clean, formatted and type-checked (ruff and pyright, configured in
pyproject.toml)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TREES = ["src", "passes", "tests", "examples", "benchmarks"]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is a test extra")
@pytest.mark.parametrize("command", [["ruff", "check"], ["ruff", "format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run([*command, *TREES], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("pyright") is None, reason="pyright is a test extra")
def test_pyright_on_src_and_passes():
    result = subprocess.run(["pyright"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
