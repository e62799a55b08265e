"""`passes/` is installed as `fusetrace.passes`, from an editable install and from a built wheel."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

import fusetrace
import fusetrace.passes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_editable_install_maps_passes_into_the_package():
    assert pathlib.Path(fusetrace.passes.__file__).resolve().parent == ROOT / "passes"
    from fusetrace.passes import derive, fuse, hidden, relations, simplify  # noqa: F401


@pytest.mark.slow
def test_wheel_contains_and_imports_passes(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)], check=True
    )
    (wheel,) = tmp_path.glob("fusetrace-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("simplify", "hidden", "relations", "derive", "fuse"):
        assert f"fusetrace/passes/{module}.py" in names
    extracted = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(extracted)
    root = repr(str(extracted))
    code = (
        "import pathlib, fusetrace.passes.fuse as f; "
        f"assert pathlib.Path(f.__file__).resolve().is_relative_to(pathlib.Path({root}).resolve()), f.__file__"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(extracted), "PATH": "/usr/bin:/bin"},
    )
