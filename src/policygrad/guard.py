"""What a training loop does between its steps to survive its own failures, the same for ``policygrad train`` and
``policygrad control`` (docs/reliability.md): remember the state before each step, count steps whose update was
skipped for a non-finite loss or gradient, write the periodic checkpoint, and stop cleanly on SIGINT/SIGTERM.

The loop calls two methods and holds no reliability branch itself::

    with StepGuard(...) as guard:
        for step in range(start, total):
            guard.remember(step)            # the state a stop inside this step saves
            ...                             # sample, score, advantages, update, log
            guard.after(step + 1, skipped)  # streak of skipped updates / periodic checkpoint / stop signal

``max_bad_steps`` skipped steps in a row stop the run with :data:`~policygrad.stopping.EXIT_DIVERGED`, saving the
state from before the first of them; a signal finishes the step, saves and stops with 128 + the signal's number. No
periodic checkpoint is written while a streak is open (the run may be going wrong). Every stop raises
:class:`~policygrad.stopping.Stopped`, whose message says where the checkpoint is and the command that resumes.

In a data-parallel run (:mod:`policygrad.distributed`) every process runs the same guard: ``consensus`` (the largest
of a number over the processes) makes a signal that reached any of them stop all of them after the same step, and
only the process that ``speaks`` warns. Skipped updates need no vote: the loss and gradient they are judged on are
already the ones summed over the processes.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from policygrad.stopping import EXIT_DIVERGED, Stopped, StopSignals

__all__ = ["StepGuard"]

S = TypeVar("S")  # a snapshot: whatever the trainer needs to save the state after some number of steps


class StepGuard(Generic[S]):
    """Skipped-update streaks, periodic checkpoints and stop signals of one run.

    Args:
        command:       the program, for messages (``"policygrad train"``).
        total_steps:   the run's last step (no checkpoint or stop after it: the run is finishing).
        max_bad_steps: skipped steps in a row that stop the run.
        save_every:    a periodic checkpoint every this many steps (0: none).
        snapshot:      ``step -> S``, the state after ``step`` steps, taken now (``step`` is the steps done).
        save:          ``S -> folder``, writes a snapshot's checkpoint (with the trainer's current weights).
        resume_hint:   the command that resumes the run, quoted at the end of every stop message.
        advice:        what to check after a divergence (``"check the rewards"``).
        consensus:     ``n -> the largest n over the processes`` of a data-parallel run (one process: ``n``).
        speaks:        whether this process prints warnings (rank 0 of a data-parallel run).
    """

    def __init__(
        self,
        command: str,
        total_steps: int,
        max_bad_steps: int,
        save_every: int,
        snapshot: Callable[[int], S],
        save: Callable[[S], Path],
        resume_hint: str,
        advice: str = "check the rewards",
        consensus: Callable[[int], int] | None = None,
        speaks: bool = True,
        quiet_signals: tuple[int, ...] = (),
    ):
        self.command, self.total_steps = command, total_steps
        self.max_bad_steps, self.save_every = max_bad_steps, save_every
        self.snapshot, self.save, self.resume_hint, self.advice = snapshot, save, resume_hint, advice
        self.consensus, self.speaks = consensus or (lambda value: value), speaks
        self.before: tuple[int, S] | None = None  # (step, state) before the current step
        self.first_bad: tuple[int, S] | None = None  # the state before the first step of a streak of skipped ones
        self.bad_steps = 0
        self.signals = StopSignals(command, announce=speaks, quiet=quiet_signals)

    def __enter__(self) -> StepGuard[S]:
        self.signals.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.signals.__exit__(*exc)

    def remember(self, step: int) -> None:
        """Take the snapshot of the state before this step (what a stop inside it, or a streak from it, saves)."""
        self.before = (step, self.snapshot(step))

    def save_before(self) -> Path | None:
        """Save the state from before the current step (a fault inside the step), or the streak's first one; None,
        saving nothing, before the first step of a run (the untouched initial model is not worth a checkpoint)."""
        step, state = self.first_bad or self.before
        return self.save(state) if step > 0 else None

    def after(self, done: int, skipped: bool, detail: str = "") -> None:
        """Between steps: ``done`` steps are done; ``skipped`` says whether this one's update was skipped for a
        non-finite loss or gradient (``detail`` adds the numbers to the warning)."""
        if skipped:
            self.bad_steps += 1
            self.first_bad = self.first_bad or self.before
            self.warn(
                f"step {done}: non-finite loss or gradient norm{detail}; update skipped ({self.bad_steps} of "
                f"{self.max_bad_steps} in a row)"
            )
            if self.bad_steps >= self.max_bad_steps:
                step, state = self.first_bad
                raise Stopped(
                    f"stopped: {self.bad_steps} steps in a row had a non-finite loss or gradient norm; saved the "
                    f"state from before the first of them (step {step}) in {self.save(state)}; lower --lr or "
                    f"{self.advice}, then resume with: {self.resume_hint}",
                    EXIT_DIVERGED,
                )
        else:
            self.bad_steps, self.first_bad = 0, None
            if self.save_every and done % self.save_every == 0 and done < self.total_steps:
                self.save(self.snapshot(done))
        signum = self.consensus(self.signals.signum or 0)  # a signal that reached any process stops them all
        if signum and done < self.total_steps:
            state = self.first_bad[1] if self.first_bad else self.snapshot(done)
            raise Stopped(
                f"stopped by {signal.Signals(signum).name} after step {done} of {self.total_steps}; saved "
                f"{self.save(state)}; resume with: {self.resume_hint}",
                128 + signum,
            )

    def warn(self, message: str) -> None:
        if self.speaks:
            print(f"{self.command}: {message}", file=sys.stderr, flush=True)
