"""Event-driven forward product: a dense `x @ W` whose input is mostly zeros (spikes), from its non-zeros.

Consumes: a contraction of the captured step that is a plain `x @ W` (`plain_matmul`: a vector or a
batch of rows contracted on its last axis with a 2-D weight on its first). Produces, for the fused
step's forward evaluation (`derive.forward`), a function with the op's value that on the CPU reads only
the weight rows of the presynaptic neurons that are non-zero at this step, when few are:

    y[b, j] = Σ_{i: x[b, i] ≠ 0} x[b, i] · W[i, j]

— the same sum without its zero terms, so the value is the op's own up to the order of the additions
(float rounding). A spiking layer's input is a spike train: at 5% activity, B = 16, N = 2048 this reads
the 56% of W's rows that some batch entry spikes on, once each, instead of multiplying all of W
(0.61 against 1.34 ms per product on this project's 2-core CPU; docs/benchmarks.md, Sequences).

Invariants and sharp edges:
* The choice is made at run time, per step: the non-zero share of `x` at most `DENSITY`, else the op
  itself (XLA's GEMM). Off the CPU (`lax.platform_dependent`) always the op itself.
* Derivatives are the op's own (`jax.custom_jvp` with the op's linear tangent), so a VJP or JVP through
  the rewritten forward is unchanged.
* The kernel is serial Numba (`brainevent.numba_kernel`): reading the weight rows is the bound, and two
  threads did not read them faster (measured, 0.626 against 0.629 ms). Under `vmap` it runs once per
  vmapped entry (`vmap_method="sequential"`).
* A row of `W` whose input is zero is not read, so a non-finite weight there does not spread as in the
  dense product (`0 · inf` is NaN).
* Not used on a device mesh (`fusetrace.shard_step`, `derive.on_mesh`): the partitioner would gather
  the operands of a custom call, the weight among them.
"""

import functools

import brainevent
import jax
import jax.numpy as jnp
from jax import lax

from fusetrace._compat import bind_eqn

# Where reading the non-zeros pays, measured on this project's 2-core CPU (float32, 5% non-zeros, ms per
# product, op / event by event): B = 16, 2048 × 2048: 1.34 / 0.61; 1024 × 1024: 0.34 / 0.20; B = 1,
# 2048 × 2048: 0.59 / 0.07; B = 64, 1024 × 1024: 0.69 / 0.67. It does not pay for small weights (a
# call costs ~25 µs: B = 32, 200 × 200: 0.026 / 0.044), narrow outputs (B = 16, 2048 × 10: 0.027 / 0.10;
# 2048 × 128: 0.10 / 0.12) or large batches (B = 256, 512 × 512: 0.58 / 0.71), nor above 10% non-zeros
# (B = 16, 2048 × 2048, 10%: 1.30 / 1.20; 20%: 1.30 / 1.13 with two threads, slower with one).
MIN_WEIGHTS = 1 << 20  # n_pre · n_post
MIN_POST = 256
MAX_ROWS = 64  # batch entries
DENSITY = 0.1  # the largest non-zero share of `x` read event by event, checked at every step


def plain_matmul(c) -> bool:
    """Whether contraction `c`'s op is `x @ W`: a `dot_general` of the presynaptic input (a vector or a
    batch of rows, contracted on its last axis) with a 2-D weight (on its first), no batch dimensions."""
    eqn = c.eqn
    if eqn.primitive.name != "dot_general" or (c.pre_operand, c.weight_operand) != (0, 1):
        return False
    (lhs, rhs), batch = eqn.params["dimension_numbers"]
    ndim = eqn.invars[0].aval.ndim
    return (
        ndim in (1, 2)
        and eqn.invars[1].aval.ndim == 2
        and tuple(lhs) == (ndim - 1,)
        and tuple(rhs) == (0,)
        and not any(batch)
    )


def eligible(c) -> bool:
    """Whether contraction `c`'s forward value may be formed event by event on the CPU: a plain `x @ W` of
    floating operands of one dtype whose output has that dtype, of a size where it pays (`MIN_WEIGHTS`,
    `MIN_POST`, `MAX_ROWS`)."""
    if not plain_matmul(c):
        return False
    x, w = (v.aval for v in c.eqn.invars)
    out = c.eqn.outvars[0].aval
    rows = x.shape[0] if x.ndim == 2 else 1
    return (
        jnp.issubdtype(w.dtype, jnp.floating)
        and x.dtype == w.dtype == out.dtype
        and w.shape[0] * w.shape[1] >= MIN_WEIGHTS
        and w.shape[1] >= MIN_POST
        and rows <= MAX_ROWS
    )


def rewrites(contractions) -> dict:
    """`{eqn: evaluate(invals) -> outvals}` for the eligible contractions, for `interpret.environment`."""
    return {c.eqn: functools.partial(_bind, c.eqn) for c in contractions if eligible(c)}


def _bind(eqn, invals):
    return [_product(eqn)(*invals)]


def _product(eqn):
    """The op of `eqn` with an event-driven primal on the CPU and the op's own derivatives."""

    def dense(x, w):
        (out,) = bind_eqn(eqn, [x, w])
        return out

    def sparse(x, w):
        rows = jnp.reshape(x, (-1, x.shape[-1]))
        call = brainevent.numba_kernel(
            _kernel(), outs=jax.ShapeDtypeStruct((rows.shape[0], w.shape[1]), w.dtype), vmap_method="sequential"
        )
        return jnp.reshape(call(rows.T, w), (*x.shape[:-1], w.shape[1]))

    def on_cpu(x, w):
        few = jnp.count_nonzero(x) <= DENSITY * x.size
        return lax.cond(few, sparse, dense, x, w)

    @jax.custom_jvp
    def product(x, w):
        return lax.platform_dependent(x, w, cpu=on_cpu, default=dense)

    # one linear term per operand; a zero tangent's term is not formed
    product.defjvps(lambda dx, _, x, w: dense(dx, w), lambda dw, _, x, w: dense(x, dw))

    return product


@functools.cache
def _kernel():
    """The Numba kernel (compiled on first use, per dtype): `out[b, :] = Σ_{i: x[b, i] ≠ 0} x[b, i] W[i, :]`,
    the presynaptic index outermost so that each weight row needed is read once for the whole batch.
    `xt` is `x` transposed: (n_pre, batch)."""
    import numba

    @numba.njit(fastmath=False, boundscheck=False)
    def kernel(xt, weight, out):
        out[:] = 0
        n_post = weight.shape[1]
        for i in range(xt.shape[0]):
            column = xt[i]
            row = weight[i]
            for b in range(xt.shape[1]):
                value = column[b]
                if value != 0:
                    target = out[b]
                    for j in range(n_post):
                        target[j] += value * row[j]

    return kernel
