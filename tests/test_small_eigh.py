"""The Jacobi eigendecomposition of many small symmetric matrices (passes/small_eigh.py), against its
definition: `A v = λ v` with orthonormal `v`, the eigenvalues ascending and equal to LAPACK's
(`numpy.linalg.eigvalsh`, float64), on the kinds of Gram matrices the low-rank truncation meets: random,
graded over 12 decades (a trace whose directions differ in size by orders), nearly degenerate, of low
rank, zero and diagonal; each size up to `LARGEST`, in float64 and float32.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusetrace.passes import small_eigh

# float64: observed ~2e-15 relative to the largest eigenvalue; float32: ~1e-6
TOLERANCE = {np.float64: 1e-13, np.float32: 2e-5}
SIZES = range(1, small_eigh.LARGEST + 1)


def _matrices(kind: str, n: int, rng, batch: int = 200) -> np.ndarray:
    q = np.linalg.qr(rng.normal(size=(batch, n, n)))[0]
    if kind == "random":
        m = rng.normal(size=(batch, n, n))
        return m @ np.swapaxes(m, 1, 2)
    if kind == "graded":
        w = 10.0 ** rng.uniform(-12, 0, size=(batch, n))
    elif kind == "degenerate":
        w = np.ones((batch, n))
        w[:, 0], w[:, -1] = 1 + 1e-9, 1e-3
    elif kind == "low rank":
        w = np.where(np.arange(n) < n // 2, 0.0, rng.uniform(0.5, 2, size=(batch, n)))
    elif kind == "diagonal":
        return np.eye(n) * rng.normal(size=(batch, 1, n))
    else:
        return np.zeros((batch, n, n))
    return q @ (w[:, :, None] * np.swapaxes(q, 1, 2))


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["random", "graded", "degenerate", "low rank", "diagonal", "zero"])
def test_eigenpairs_against_the_definition(kind, dtype):
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    eigh = jax.jit(small_eigh.eigh)
    for n in SIZES:
        a = _matrices(kind, n, rng).astype(dtype)
        w, v = (np.asarray(x, np.float64) for x in eigh(jnp.asarray(a)))
        a64 = a.astype(np.float64)
        scale = np.maximum(np.abs(np.linalg.eigvalsh(a64)).max(-1), np.finfo(np.float64).tiny)[:, None]
        tol = TOLERANCE[dtype]
        assert np.all(np.diff(w, axis=-1) >= 0), (kind, n, "not ascending")
        np.testing.assert_array_less(np.abs(w - np.linalg.eigvalsh(a64)) / scale, tol)
        residual = np.linalg.norm(a64 @ v - v * w[:, None, :], axis=1) / scale  # per eigenpair
        np.testing.assert_array_less(residual, tol)
        np.testing.assert_allclose(np.swapaxes(v, 1, 2) @ v, np.broadcast_to(np.eye(n), v.shape), atol=tol, rtol=0)


def test_batch_axes_and_the_lapack_fallback():
    rng = np.random.default_rng(0)
    a = jnp.asarray(_matrices("random", 4, rng, batch=6).reshape(2, 3, 4, 4))
    w, v = small_eigh.eigh(a)
    assert w.shape == (2, 3, 4) and v.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(np.asarray(a)), rtol=1e-13, atol=1e-13)
    big = jnp.asarray(_matrices("random", small_eigh.LARGEST + 1, rng, batch=3))
    for ours, lapack in zip(small_eigh.eigh(big), jnp.linalg.eigh(big), strict=True):
        np.testing.assert_array_equal(ours, lapack)  # above LARGEST: LAPACK's own answer


def test_the_upper_triangle_is_read():
    rng = np.random.default_rng(1)
    a = _matrices("random", 5, rng, batch=4)
    skewed = np.triu(a) + np.tril(rng.normal(size=a.shape), -1)  # the lower triangle is noise
    w, _ = small_eigh.eigh(jnp.asarray(skewed))
    np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=1e-12, atol=1e-12)
