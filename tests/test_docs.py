"""The documentation site builds with `mkdocs build --strict` (mkdocs.yml): every nav page exists, every
link resolves, and mkdocstrings renders the API reference from the docstrings without a warning."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 120  # a build takes about a second; the margin is for a cold, loaded machine


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None,
    reason="mkdocs and mkdocstrings[python] are test extras; install them with `pip install -e '.[test]'`",
)
def test_docs_build_strict_with_api_reference(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # mkdocstrings gives every rendered object an anchor named by its path.
    for name in ("fusetrace.compile", "fusetrace.analyze", "fusetrace.Learner", "fusetrace.errors"):
        assert f'id="{name}"' in api, f"{name} is missing from the API reference"
    assert "Compile <code>model</code> into a fused online learner." in api  # compile's docstring summary
