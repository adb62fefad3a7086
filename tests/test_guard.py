"""policygrad.guard.StepGuard: what the loops of `train` and `control` do between steps (docs/reliability.md)."""

from __future__ import annotations

import os
import signal

import pytest

from policygrad.guard import StepGuard
from policygrad.stopping import EXIT_DIVERGED, Stopped

pytestmark = pytest.mark.exact


class Trainer:
    """A stand-in trainer: its state is a number, its snapshots copies of it, its checkpoints a list."""

    def __init__(self):
        self.state, self.saved = 0, []

    def guard(self, total=10, max_bad=3, save_every=0):
        return StepGuard("policygrad test", total, max_bad, save_every, self.snapshot, self.save, "resume-cmd")

    def snapshot(self, step):
        return (step, self.state)

    def save(self, snapshot):
        self.saved.append(snapshot)
        return f"ckpt-{snapshot[0]}"


def test_periodic_checkpoints_but_none_at_the_end_or_during_a_streak():
    trainer = Trainer()
    with trainer.guard(total=6, save_every=2) as guard:
        for step, skipped in enumerate([False, False, False, True, False, False]):
            guard.remember(step)
            trainer.state += 1
            guard.after(step + 1, skipped)
    # step 2 saved; step 4 is not (its update was skipped: no checkpoint while a run may be going wrong); step 6 is
    # the end, where the trainer writes `final` itself
    assert trainer.saved == [(2, 2)]


def test_a_streak_of_skipped_steps_stops_with_the_state_from_before_its_first_step(capsys):
    trainer = Trainer()
    with pytest.raises(Stopped) as info, trainer.guard(max_bad=3) as guard:
        for step, skipped in enumerate([False, True, True, True]):
            guard.remember(step)
            trainer.state += 10
            guard.after(step + 1, skipped, " (loss nan)")
    assert trainer.saved == [(1, 10)]  # before step 2, the first skipped one
    assert info.value.exit_code == EXIT_DIVERGED
    assert str(info.value) == (
        "stopped: 3 steps in a row had a non-finite loss or gradient norm; saved the state from before the first of "
        "them (step 1) in ckpt-1; lower --lr or check the rewards, then resume with: resume-cmd"
    )
    warnings = capsys.readouterr().err.splitlines()
    assert warnings[0] == (
        "policygrad test: step 2: non-finite loss or gradient norm (loss nan); update skipped (1 of 3 in a row)"
    )


def test_a_good_step_ends_a_streak():
    trainer = Trainer()
    with trainer.guard(max_bad=2) as guard:
        for step, skipped in enumerate([True, False, True, False]):
            guard.remember(step)
            guard.after(step + 1, skipped)
    assert guard.bad_steps == 0 and trainer.saved == []


def test_a_signal_finishes_the_step_then_saves_and_stops():
    trainer = Trainer()
    with pytest.raises(Stopped) as info, trainer.guard() as guard:
        for step in range(10):
            guard.remember(step)
            trainer.state += 1
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during the step
            guard.after(step + 1, False)
    assert trainer.saved == [(3, 3)]  # the state after the step that was running
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert str(info.value) == "stopped by SIGTERM after step 3 of 10; saved ckpt-3; resume with: resume-cmd"


def test_a_fault_inside_a_step_saves_the_state_from_before_it():
    trainer = Trainer()
    with trainer.guard() as guard:
        guard.remember(0)
        trainer.state = 5
        guard.after(1, False)
        guard.remember(1)
        trainer.state = 7
        assert guard.save_before() == "ckpt-1" and trainer.saved == [(1, 5)]
