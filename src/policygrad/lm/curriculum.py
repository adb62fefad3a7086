"""A curriculum over the length tolerance: train on a lenient length rule first, tighten it as the policy masters it.

A strict rule that the starting policy almost never meets gives GRPO almost nothing to learn from: a group whose
rewards are all equal has advantage exactly 0. With a tolerance of t characters the rule ``| n - L | <= t`` holds
far more often, so a binary (or partly binary) reward fires, groups disagree, and the policy learns what the lenient
rule wants; each time the training pass rate under the current tolerance reaches ``advance_at`` (averaged over the
last ``window`` steps) the tolerance halves, until it reaches the task's own tolerance (0 by default):

    t_0 = start;   t_{k+1} = max(final, floor(t_k / 2))   when   mean(last `window` pass rates) >= advance_at

The digit-sum rule is exact at every stage; held-out evaluation always uses the task's final tolerance, so the
curriculum changes what training pays for, never what a pass means. Curriculum learning in this sense (easy examples
first, the target task last) is Bengio et al. 2009, "Curriculum learning"; the adaptive trigger on the learner's own
success rate follows the "teacher" schedules of Graves et al. 2017 in their simplest form.

Pure Python and deterministic: its whole state is two numbers and a short list, saved in every checkpoint so that a
resumed run tightens at exactly the step the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToleranceCurriculum"]


@dataclass
class ToleranceCurriculum:
    """The current length tolerance of the training rewards, and when to tighten it.

    >>> c = ToleranceCurriculum(start=8, final=0, advance_at=0.5, window=2)
    >>> [c.observe(r) for r in (0.6, 0.2, 0.9, 0.9, 0.5, 0.5)]
    [8, 8, 4, 4, 2, 2]

    The first two steps average 0.4 (< 0.5): stay at 8; steps 2-3 average 0.55: tighten to 4 and start a new window,
    which fills at step 4 (0.9, 0.5 -> 0.7): tighten to 2; and so on down to ``final``.
    """

    start: int
    final: int = 0
    advance_at: float = 0.5
    window: int = 20
    tolerance: int = -1  # -1: not set yet, becomes ``start``
    recent: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            self.tolerance = max(self.start, self.final)

    @property
    def done(self) -> bool:
        """Whether the tolerance has reached the task's own."""
        return self.tolerance <= self.final

    def observe(self, pass_rate: float) -> int:
        """Record one training step's pass rate (under the current tolerance) and return the tolerance for the next
        step: halved (not below ``final``) when the last ``window`` steps at this tolerance averaged ``advance_at``."""
        if self.done:
            return self.tolerance
        self.recent.append(float(pass_rate))
        del self.recent[: -self.window]
        if len(self.recent) == self.window and sum(self.recent) / self.window >= self.advance_at:
            self.tolerance = max(self.final, self.tolerance // 2)
            self.recent.clear()
        return self.tolerance

    def state(self) -> dict[str, Any]:
        """What a checkpoint saves (plain values, loadable with ``torch.load(weights_only=True)``)."""
        return {"tolerance": self.tolerance, "recent": list(self.recent)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`'s output."""
        self.tolerance = int(state["tolerance"])
        self.recent = [float(x) for x in state["recent"]][-self.window :]
