"""Exception classes. Every message has four parts: what failed (in the user's terms, a state path),
where (primitive and source line), why, and what to do. `four_part` builds that layout."""


class FusetraceError(Exception):
    """Base class of every error fusetrace raises on purpose."""


class UnsupportedPrimitiveError(FusetraceError, NotImplementedError):
    """A primitive with no rule sits on a path that touches a hidden state or a weight."""


class NotNeuronAlignedError(FusetraceError, ValueError):
    """A hidden state's update mixes neurons through something other than a weight."""


class CaptureError(FusetraceError, ValueError):
    """The model step could not be traced into a jaxpr with known state roles."""


class CompileError(FusetraceError, ValueError):
    """The options given to `fusetrace.compile` cannot produce a learner."""


class InputError(FusetraceError, ValueError):
    """A step's input or target does not match the example the learner was compiled with."""


class NonFiniteError(FusetraceError, FloatingPointError):
    """Training met a non-finite loss, gradient or weight."""


def four_part(what: str, where: str, why: str, fix: str) -> str:
    """The standard message layout shared by every fusetrace error."""
    return f"{what}\n  where: {where}\n  why:   {why}\n  fix:   {fix}"
