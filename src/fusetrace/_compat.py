"""Every `jax._src` import and every version switch lives here, and nothing else does."""

import functools
import importlib.util
import os
from typing import TypeAlias

import jax.extend.core as _extend_core
from jax._src import source_info_util as _source_info_util
from jax._src.ad_util import add_jaxvals_p as add_any_p
from jax._src.custom_derivatives import custom_jvp_call_p, custom_vjp_call_p
from jax._src.interpreters import partial_eval as _pe
from jax._src.lax.lax import stack_p, unstack_p  # jnp.stack / unstack (jax >= 0.10)
from jax._src.pjit import jit_p
from jax.extend.core import (  # pyright: ignore[reportPrivateImportUsage]
    DropVar,
    Jaxpr,
    JaxprEqn,
    Literal,
    Primitive,
    Var,
)

# a runtime alias (constructed by new_closed_jaxpr), so not a `type` statement
ClosedJaxpr: TypeAlias = _extend_core.ClosedJaxpr  # noqa: UP040  # pyright: ignore[reportPrivateImportUsage]

__all__ = [
    "ClosedJaxpr",
    "DropVar",
    "Jaxpr",
    "JaxprEqn",
    "Literal",
    "Primitive",
    "Var",
    "add_any_p",
    "aval_dtype",
    "aval_shape",
    "custom_jvp_call_p",
    "custom_vjp_call_p",
    "dce",
    "jit_p",
    "new_closed_jaxpr",
    "source_line",
    "stack_p",
    "unstack_p",
]


def aval_shape(atom) -> tuple[int, ...]:
    """The static shape of a jaxpr atom (var or literal)."""
    return tuple(atom.aval.shape)  # pyright: ignore[reportAttributeAccessIssue]


def aval_dtype(atom):
    return atom.aval.dtype  # pyright: ignore[reportAttributeAccessIssue]


def dce(jaxpr: Jaxpr) -> Jaxpr:
    """Dead-code elimination keeping every output (inputs are kept too, unused or not)."""
    new, _ = _pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
    return new


def new_closed_jaxpr(jaxpr: Jaxpr, consts) -> ClosedJaxpr:
    return ClosedJaxpr(jaxpr, list(consts))


# frames inside these packages are the modelling libraries' own code, not the user's model
_LIBRARIES = ("brainstate", "brainpy", "brainunit", "saiunit", "brainevent", "braintools", "fusetrace")


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    dirs = []
    for name in _LIBRARIES:
        spec = importlib.util.find_spec(name)
        locations = (spec.submodule_search_locations if spec is not None else None) or []
        dirs.extend(os.path.realpath(d) + os.sep for d in locations)
    return tuple(dirs)


def _is_library(file_name: str) -> bool:
    return os.path.realpath(file_name).startswith(_library_dirs())


def source_line(eqn: JaxprEqn) -> str:
    """`file:line (function)` of the user frame that emitted `eqn` (the first outside jax and the
    modelling libraries; the first outside jax when all are library frames), or '<unknown>'."""
    frames = list(_source_info_util.user_frames(eqn.source_info.traceback))
    if not frames:
        return "<unknown>"
    frame = next((f for f in frames if not _is_library(f.file_name)), frames[0])
    return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"


def bind_eqn(eqn: JaxprEqn, invals, **overrides):
    """Bind `eqn`'s primitive on `invals` as `jax.core.eval_jaxpr` does, keeping its source line
    (`overrides` replace some of its params)."""
    bind_params = eqn.primitive.get_bind_params({**eqn.params, **overrides} if overrides else eqn.params)
    name_stack = _source_info_util.current_name_stack() + eqn.source_info.name_stack
    with _source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **bind_params)
    return out if eqn.primitive.multiple_results else [out]
