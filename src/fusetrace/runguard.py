"""Guards of a `fusetrace train` run: stop requests and the checkpoint left behind when it stops early.

Consumes: the signals delivered to the process while a `StopRequest` is entered (in the main thread),
and the training state of each iteration. Produces: `StopRequest.signal`, the first signal's number
(None until one arrives); `RunCheckpoints`, which writes a run's checkpoints and, when the loop stops
early (a signal, a non-finite value), a final one of the last good iteration, then returns the one-line
exception to raise: `Interrupted` (exit status 128 + the signal) or `TrainingStopped`.

Sharp edges: the flag is read between iterations, so the iteration under way finishes first (a step of
XLA work cannot be interrupted half-way anyway). The first signal puts the previous handlers back, so a
second Ctrl-C raises `KeyboardInterrupt` and a second SIGTERM terminates at once, as usual; checkpoints
are atomic, so even that leaves the previous one complete. Outside the main thread nothing is installed
(Python only delivers signals there).
"""

import os
import pathlib
import signal
import threading
from types import FrameType

from . import checkpoint
from .errors import FusetraceError, NonFiniteError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(FusetraceError):
    """Training stopped on SIGTERM or SIGINT after writing a final checkpoint; `exit_status` is the
    conventional 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class TrainingStopped(FusetraceError, RuntimeError):
    """Training stopped on a fault (a non-finite value, a checkpoint that could not be written), the last
    good state checkpointed; the message is one line."""


class StopRequest:
    """A context manager that turns SIGTERM and SIGINT into `self.signal` instead of ending the process.

    Example:
        ```python
        with StopRequest() as stop:
            while not done and stop.signal is None:
                state = train_one_iteration(state)
        ```
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.signal = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # pyright: ignore[reportArgumentType]
        self._previous = {}


class RunCheckpoints:
    """The checkpoints of one run folder as the training loop writes them: every so often, and a final
    one when the loop stops early, unless that iteration is saved already.

    Arguments:
        run_dir: the run folder.
        saved: the iteration of this run's newest checkpoint (a resumed run's), or None.
    """

    def __init__(self, run_dir: str | os.PathLike, saved: int | None = None):
        self.run_dir, self.saved = pathlib.Path(run_dir), saved

    def save(self, state: dict, history: list[dict]) -> None:
        """Checkpoint `state` (its `history` in the metadata).

        Raises:
            TrainingStopped: the write failed; the message names the checkpoint left intact.
        """
        iteration = int(state["iteration"])
        try:
            checkpoint.save(self.run_dir, iteration, state, {"history": history})
        except OSError as error:
            last = checkpoint.latest(self.run_dir)
            kept = f"the last complete checkpoint is {last}" if last else "no checkpoint was completed"
            raise TrainingStopped(
                f"could not write checkpoint {iteration} in {self.run_dir} ({error.strerror or error}); training "
                f"stopped and {kept}; free space or fix the folder, then: fusetrace train --resume {self.run_dir}"
            ) from error
        self.saved = iteration

    def final(self, state: dict, history: list[dict]) -> pathlib.Path | None:
        """Checkpoint `state` unless it is saved already; the newest complete checkpoint."""
        if self.saved != int(state["iteration"]):
            self.save(state, history)
        return checkpoint.latest(self.run_dir)

    def interrupted(self, signum: int, state: dict, history: list[dict], iterations: int) -> Interrupted:
        """The final checkpoint after a stop request, and the exception that reports it."""
        folder = self.final(state, history)
        return Interrupted(
            f"stopped by {signal.Signals(signum).name} after iteration {int(state['iteration'])} of {iterations}; "
            f"final checkpoint {folder}; continue with: fusetrace train --resume {self.run_dir}",
            signum,
        )

    def nonfinite(self, error: NonFiniteError, state: dict, history: list[dict]) -> TrainingStopped:
        """The last finite `state` checkpointed after `error`, and the one-line exception that says so."""
        folder = self.final(state, history)
        return TrainingStopped(
            f"{str(error).splitlines()[0]}; training stopped and the last finite state is checkpoint {folder}; "
            f"to skip such updates: fusetrace train --resume {self.run_dir} --on-nonfinite skip (or start again "
            "with a lower --lr or with --clip)"
        )
