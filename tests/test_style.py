"""The code base stays lint-clean, formatted and type-checked (ruff and pyright, configured in
pyproject.toml)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tool(name: str) -> str | None:
    """The tool installed beside this interpreter (the project's venv), else on PATH."""
    beside = pathlib.Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


TREES = ["src", "passes", "tests", "examples", "benchmarks"]


@pytest.mark.skipif(_tool("ruff") is None, reason="ruff is a test extra")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run([_tool("ruff"), *command, *TREES], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.long  # 28 s of the default run's budget (2-core AMD EPYC); ruff stays in it
@pytest.mark.skipif(_tool("pyright") is None, reason="pyright is a test extra")
def test_pyright_on_src_and_passes():
    command = [_tool("pyright"), "--pythonpath", sys.executable]  # resolve imports in this environment
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
