"""Atomic, exact checkpoints of training state (any pytree of arrays, Quantities and PRNG keys).

A checkpoint is a folder `<run>/checkpoints/step-<n>/` holding `arrays.npz` (every leaf, bit for bit)
and `meta.json`; `<run>/checkpoints/latest` names the newest complete one. Writing goes to a temporary
folder that is renamed into place, then `latest` is replaced by an atomic rename too, so a crash at any
point leaves the previous checkpoint complete and `latest` pointing at it.

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
    checkpoints; returns its folder."""
    root = pathlib.Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".step-{step:08d}-", dir=root))
    try:
        arrays: dict[str, Any] = {f"leaf_{i:05d}": _to_numpy(leaf) for i, leaf in enumerate(_leaves(state))}
        with open(scratch / "arrays.npz", "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        (scratch / "meta.json").write_text(json.dumps({"step": step, "n_leaves": len(arrays), **(meta or {})}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
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


def latest(run_dir: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint folder of `run_dir`, or None."""
    pointer = pathlib.Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "meta.json").exists() else None


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
