"""Atomic, exact checkpoints of training state (any pytree of arrays, Quantities and PRNG keys).

A checkpoint is a folder `<run>/checkpoints/step-<n>/` holding `arrays.npz` (every leaf, bit for bit)
and `meta.json`; `<run>/checkpoints/latest` names the newest complete one. Writing goes to a temporary
folder that is renamed into place, then `latest` is replaced by an atomic rename too, so a crash at any
point leaves the previous checkpoint complete and `latest` pointing at it. Rewriting a step that exists
moves the old copy aside first and puts it back if the new one fails; should a hard kill fall between
the two renames, `latest()` falls back to the newest complete `step-*` folder.

`save` refuses a state with a NaN or infinite value (a diverged run must never leave weights that a
resume would train on), and `check_writable` / `check_space` let a run fail in one line before it
trains rather than at its first checkpoint.

Restoring needs a template with the structure of what was saved (the trainer's fresh state): the
pytree structure, units and key types come from the template, the values from the file, and every
leaf's shape and dtype are checked against it. orbax-checkpoint was considered; it brings tensorstore
and async machinery, and still needs custom handling for brainunit Quantities and typed PRNG keys, so a
small exact format is kept here instead.
"""

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import FusetraceError, four_part


class CheckpointError(FusetraceError, ValueError):
    """A checkpoint is missing, incomplete or does not match the state it should restore."""


def _leaves(tree) -> list:
    return jax.tree.leaves(tree)


def _is_key(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _to_numpy(leaf) -> np.ndarray:
    if _is_key(leaf):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def save(run_dir: str | os.PathLike, step: int, state: Any, meta: dict | None = None, keep: int = 2) -> pathlib.Path:
    """Write `state` as checkpoint `step` of `run_dir` atomically and keep the newest `keep` complete
    checkpoints.

    Arguments:
        run_dir: the run folder (`checkpoints/` is made inside it).
        step: the checkpoint's number (the training iterations done).
        state: any pytree of arrays, Quantities and PRNG keys.
        meta: JSON-serialisable extras stored in meta.json.
        keep: how many of the newest checkpoints to keep.

    Returns:
        The checkpoint's folder.

    Raises:
        CheckpointError: a floating-point leaf of `state` holds NaN or an infinity (nothing is written).
        OSError: the folder cannot be written (the previous checkpoint stays complete and `latest`).
    """
    arrays: dict[str, Any] = {f"leaf_{i:05d}": _to_numpy(leaf) for i, leaf in enumerate(_leaves(state))}
    _refuse_nonfinite(state, arrays, step)
    root = pathlib.Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".step-{step:08d}-", dir=root))
    try:
        with open(scratch / "arrays.npz", "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        (scratch / "meta.json").write_text(json.dumps({"step": step, "n_leaves": len(arrays), **(meta or {})}))
        _move_into_place(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _move_into_place(scratch: pathlib.Path, final: pathlib.Path) -> None:
    """Rename the complete `scratch` folder to `final`; an existing `final` is moved aside first and put
    back when the rename fails."""
    if not final.exists():
        os.replace(scratch, final)
        return
    aside = pathlib.Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
    os.replace(final, aside / final.name)
    try:
        os.replace(scratch, final)
    except BaseException:
        os.replace(aside / final.name, final)  # should this fail too, the old copy stays in `aside`
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _refuse_nonfinite(state: Any, arrays: dict[str, np.ndarray], step: int) -> None:
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    for path, value in zip(paths, arrays.values(), strict=True):
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            kind = "NaN" if np.any(np.isnan(value)) else "an infinity"
            raise CheckpointError(
                four_part(
                    what=f"checkpoint {step} not written: `state{path}` holds {kind}",
                    where="fusetrace.checkpoint.save",
                    why="a diverged state must never be saved: a resumed run would continue from it",
                    fix="keep the last finite state (fusetrace.Trainer stops or skips non-finite updates: "
                    "on_nonfinite='stop' / 'skip'), or lower the learning rate / clip the gradient",
                )
            )


def latest(run_dir: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint folder of `run_dir` (the one `latest` names, or, when that one is
    gone, the newest complete `step-*` folder), or None."""
    root = pathlib.Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if (folder / "meta.json").exists():
            return folder
    complete = sorted(p for p in root.glob("step-*") if (p / "meta.json").exists()) if root.is_dir() else []
    return complete[-1] if complete else None


def check_writable(run_dir: str | os.PathLike) -> None:
    """Make `run_dir/checkpoints` and write (then remove) a file in it and in `run_dir`, so that a run
    folder that cannot hold a run fails before training rather than at its first checkpoint.

    Raises:
        CheckpointError: a folder cannot be made or written (its first line names it and why).
    """
    for folder in (pathlib.Path(run_dir), pathlib.Path(run_dir) / "checkpoints"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-") as probe:
                probe.write(b"fusetrace")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as error:
            raise CheckpointError(
                four_part(
                    what=f"cannot write checkpoints in {folder} ({error.strerror or error})",
                    where="the run folder, checked before training",
                    why="a run writes its configuration, checkpoints and metrics there; it would fail after "
                    "training for nothing",
                    fix="choose another --run-dir, or make that folder writable (and a folder, not a file)",
                )
            ) from error


def check_space(run_dir: str | os.PathLike, state: Any, keep: int = 2) -> None:
    """Check that the disk of `run_dir` has room for `keep` + 1 checkpoints of `state` (the newest
    `keep` and the one being written).

    Raises:
        CheckpointError: it has not.
    """
    nbytes = sum(_to_numpy(leaf).nbytes for leaf in _leaves(state))
    needed, free = (keep + 1) * nbytes, shutil.disk_usage(pathlib.Path(run_dir) / "checkpoints").free
    if free < needed:
        raise CheckpointError(
            four_part(
                what=f"only {_mb(free)} free for checkpoints in {run_dir}, which need {_mb(needed)} "
                f"({keep + 1} of {_mb(nbytes)})",
                where="the run folder, checked before training",
                why="a run keeps its newest checkpoints and writes the next beside them",
                fix="free some space or choose another --run-dir",
            )
        )


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3g} MB"


def restore(folder: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """`(state, meta)` from a checkpoint folder, shaped like `template`."""
    folder = pathlib.Path(folder)
    if not (folder / "meta.json").exists():
        raise CheckpointError(
            four_part(
                what=f"no complete checkpoint in {folder}",
                where="fusetrace.checkpoint.restore",
                why="a checkpoint folder holds arrays.npz and meta.json once it is complete",
                fix="resume from a run folder whose checkpoints/latest exists, or start a new run",
            )
        )
    meta = json.loads((folder / "meta.json").read_text())
    template_leaves, treedef = jax.tree.flatten(template)
    with np.load(folder / "arrays.npz") as data:
        stored = [data[f"leaf_{i:05d}"] for i in range(meta["n_leaves"])]
    if len(stored) != len(template_leaves):
        raise CheckpointError(
            four_part(
                what=f"the checkpoint has {len(stored)} arrays, the state to restore has {len(template_leaves)}",
                where=str(folder),
                why="it was written by a different model, optimizer or algorithm",
                fix="resume with the same task, model and options as the run that wrote it",
            )
        )
    leaves = [_restore_leaf(value, like, folder) for value, like in zip(stored, template_leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves), meta


def _restore_leaf(value: np.ndarray, like, folder):
    if _is_key(like):
        return jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(like))
    like_array = np.asarray(like)
    if value.shape != like_array.shape or value.dtype != like_array.dtype:
        raise CheckpointError(
            four_part(
                what=f"a stored array is {value.dtype}{list(value.shape)}, the state expects "
                f"{like_array.dtype}{list(like_array.shape)}",
                where=str(folder),
                why="the checkpoint was written with other sizes or precision",
                fix="resume with the same configuration (sizes, batch, float64 setting) as the original run",
            )
        )
    return jnp.asarray(value)
