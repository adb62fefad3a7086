"""Stopping a long run cleanly: SIGINT (Ctrl-C) and SIGTERM (``kill``, Slurm, Kubernetes) finish the current step,
save a checkpoint and exit with a message that says how to resume.

A handler that raised in the middle of a step (Python's default for SIGINT) could interrupt an optimiser step half
way or a checkpoint half written; this one only sets a flag that the training loop reads between steps. A second
signal of the same kind gets the default behaviour back (Ctrl-C twice stops at once, the last checkpoint is still
intact because checkpoints are written atomically, see :mod:`policygrad.checkpointing`).

The exit status is ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), the shell convention, so a scheduler
or script can tell a run stopped on request from one that finished (0) or was given bad input (2).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

__all__ = ["EXIT_DIVERGED", "Stopped", "StopSignals"]

EXIT_DIVERGED = 3
"""Exit status of a run stopped after several non-finite updates in a row (``--max-bad-steps`` of ``policygrad
train`` and ``policygrad control``). The others: 0 finished, 2 bad input (or a reward fault
under ``reward_fault: error``), 130/143 stopped by SIGINT/SIGTERM; all but 0 and bad input after a checkpoint."""


class Stopped(Exception):
    """The run stopped before its end, after saving a checkpoint. ``str(err)`` is the one-line message for the user
    (what happened, where the checkpoint is, the command that resumes); ``exit_code`` the process's exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Context manager: while active, SIGINT and SIGTERM set :attr:`signum` instead of stopping the process.

    Outside the main thread (where Python cannot install handlers) it does nothing and the defaults stay. With
    ``announce`` False the signal is noted without a word (the processes of a data-parallel run other than rank 0);
    so are the signals in ``quiet`` (SIGTERM under torchrun, which also sends it to the survivors of a process that
    died: there the run ends with one line naming the dead process, not with a promise to save).

    >>> with StopSignals("train") as stop:
    ...     stop.requested
    False
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, program: str, announce: bool = True, quiet: tuple[int, ...] = ()):
        self.program, self.announce, self.quiet = program, announce, quiet
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        # the next signal of this kind acts as it would without us: a second Ctrl-C stops at once
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if not self.announce or signum in self.quiet:  # another process says it, or the stop itself will
            return
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"{self.program}: got {signal.Signals(signum).name}; finishing this step, then saving a checkpoint "
            f"({again} again stops at once, without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)  # None: installed outside Python; the default is the honest guess
                self._previous[signum] = signal.SIG_DFL if previous is None else previous
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
