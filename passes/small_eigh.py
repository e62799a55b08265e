"""The eigendecomposition of many small symmetric matrices, by cyclic Jacobi rotations written as
element-wise operations over the batch: `jnp.linalg.eigh`'s drop-in for the low-rank truncation's
(r+1) × (r+1) Gram matrices (`passes.components`).

Consumes: symmetric matrices `(..., n, n)` (only the upper triangle is read). Produces `(w, v)` as
`jnp.linalg.eigh` does: the eigenvalues `(..., n)` in ascending order and the eigenvectors in the columns
of `v` `(..., n, n)`.

Why: on the CPU, `jnp.linalg.eigh` of a batch is one LAPACK call per matrix. For the rank-4 truncation of
a batch of 64 that is about 200 µs per step and group (measured: 196 µs for 64 matrices of 5 × 5, about
40% of a rank-4 `es_d_rtrl` training step on the evidence network), where the arithmetic is a few
thousand operations per matrix. Here every matrix entry is one array over the batch, and each rotation
updates two rows and columns of all the matrices at once: 8.6 µs for the same 64 matrices (six sweeps).

How: cyclic Jacobi (rotation `(p, q)` zeroes `a_pq`: `t = tan φ` from `θ = (a_qq − a_pp) / 2a_pq`,
`t = sign(θ) / (|θ| + √(θ² + 1))`), a fixed number of sweeps per size and dtype (`SWEEPS`: each a margin
of one or two over the sweeps that took random, graded (eigenvalues over 12 decades) and nearly
degenerate matrices to the dtype's rounding, measured). The eigenvalues are then put in ascending order
by their ranks (element-wise too). Jacobi finds the small eigenvalues of a graded positive matrix to
high relative accuracy, which the truncation needs: it drops the smallest.

Sharp edges: the cost grows as n³ per sweep, one fused kernel per `ROTATIONS_PER_KERNEL` rotations;
above `LARGEST` the matrices go to `jnp.linalg.eigh` (measured crossover). Only the CPU takes the
rotations (`lax.platform_dependent`): on a GPU each kernel is a launch, and the rotations were not
measured there, so other platforms keep their own `eigh`. A matrix that is not symmetric is read as its
upper triangle.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# sweeps by the largest size they serve, per dtype (module docstring: measured + a margin)
SWEEPS = {
    np.dtype(np.float32): ((3, 4), (5, 6)),
    np.dtype(np.float64): ((3, 5), (5, 7)),
}
# above it, jnp.linalg.eigh (measured, 64 matrices in a scanned loop, float32: n = 5: 11 µs against 245,
# compiled in 2 s; n = 9: 181 µs against 619, compiled in 34 s; n = 13: 403 against 840, 198 s)
LARGEST = 5
# rotations per fused kernel: an optimisation barrier after every few rotations keeps XLA from fusing the
# whole sweep into kernels that recompute the earlier rotations (measured, 64 matrices 5 × 5, six sweeps:
# 1: 19 µs, 2: 8.6, 5: 14, 10: 30, none: 105)
ROTATIONS_PER_KERNEL = 2


def eigh(matrices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(w, v)` of the symmetric `(..., n, n)` matrices, as `jnp.linalg.eigh` (module docstring). The
    rotations on the CPU, where they were measured; on other platforms their own `eigh`."""
    n = matrices.shape[-1]
    dtype = np.dtype(matrices.dtype)
    if n > LARGEST or dtype not in SWEEPS:
        return _library(matrices)
    sweeps = next(count for size, count in SWEEPS[dtype] if n <= size)
    return lax.platform_dependent(matrices, cpu=functools.partial(_jacobi, sweeps=sweeps), default=_library)


def _library(matrices: jax.Array) -> tuple[jax.Array, jax.Array]:
    w, v = jnp.linalg.eigh(matrices)
    return w, v


def _jacobi(matrices: jax.Array, sweeps: int) -> tuple[jax.Array, jax.Array]:
    """Cyclic Jacobi, `sweeps` sweeps over the upper triangle's pairs, then the pairs in ascending order."""
    n = matrices.shape[-1]
    a = {(i, j): matrices[..., i, j] for i in range(n) for j in range(i, n)}
    one, zero = jnp.ones_like(a[0, 0]), jnp.zeros_like(a[0, 0])
    v = {(i, j): one if i == j else zero for i in range(n) for j in range(n)}

    def sweep(_, carry):
        a, v = carry
        for count, (p, q) in enumerate(itertools.combinations(range(n), 2), start=1):
            a, v = _rotate(a, v, p, q, n)
            if count % ROTATIONS_PER_KERNEL == 0:
                a, v = lax.optimization_barrier((a, v))
        return a, v

    # a loop over the sweeps, not an unrolled program: XLA's compile time grows faster than the program
    a, v = lax.fori_loop(0, sweeps, sweep, (a, v))
    return _ascending([a[i, i] for i in range(n)], v, n)


def _rotate(a: dict, v: dict, p: int, q: int, n: int) -> tuple[dict, dict]:
    """`a ← Jᵀ a J`, `v ← v J` for the rotation `J` in the plane `(p, q)` that zeroes `a_pq` (`a`: the
    upper triangle, `{(i, j): (...,)}` with `i ≤ j`)."""
    app, aqq, apq = a[p, p], a[q, q], a[p, q]
    zero = apq == 0
    theta = (aqq - app) / (2 * jnp.where(zero, 1.0, apq))
    t = jnp.where(theta == 0, 1.0, jnp.sign(theta) / (jnp.abs(theta) + jnp.sqrt(theta * theta + 1)))
    t = jnp.where(zero, 0.0, t)  # θ² overflowing gives t = 0: a rotation below rounding
    c = lax.rsqrt(t * t + 1)
    s = t * c
    a = dict(a)
    for r in range(n):
        if r in (p, q):
            continue
        arp, arq = a[min(r, p), max(r, p)], a[min(r, q), max(r, q)]
        a[min(r, p), max(r, p)] = c * arp - s * arq
        a[min(r, q), max(r, q)] = s * arp + c * arq
    a[p, p], a[q, q], a[p, q] = app - t * apq, aqq + t * apq, jnp.zeros_like(apq)
    v = dict(v)
    for r in range(n):
        vrp, vrq = v[r, p], v[r, q]
        v[r, p], v[r, q] = c * vrp - s * vrq, s * vrp + c * vrq
    return a, v


def _ascending(w: list, v: dict, n: int) -> tuple[jax.Array, jax.Array]:
    """The eigenpairs in ascending order of `w`: each one's rank is the count of smaller eigenvalues (ties
    by index), and slot `m` takes the pair of rank `m` (selections, no sort)."""

    def before(j: int, i: int) -> jax.Array:
        return ((w[j] < w[i]) | ((w[j] == w[i]) & (j < i))).astype(jnp.int32)

    none = jnp.zeros(jnp.shape(w[0]), jnp.int32)
    rank = [functools.reduce(jnp.add, [before(j, i) for j in range(n) if j != i], none) for i in range(n)]

    def pick(values: list, m: int) -> jax.Array:
        return functools.reduce(jnp.add, [jnp.where(rank[i] == m, values[i], 0) for i in range(n)])

    rows = [jnp.stack([pick([v[r, i] for i in range(n)], m) for m in range(n)], axis=-1) for r in range(n)]
    return jnp.stack([pick(w, m) for m in range(n)], axis=-1), jnp.stack(rows, axis=-2)
