"""Live terminal view of the bandit: one bar per arm, the policy's probability migrating to the rewarded arms."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 40


def render(step: int, steps: int, probs: Sequence[float], means: Sequence[float], expected: float, title: str) -> Group:
    """One frame: a header line and a table of arms (mean reward, probability bar, probability)."""
    best = max(means)
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("arm", justify="right")
    table.add_column("mean reward", justify="right")
    table.add_column("policy probability", justify="left")
    table.add_column("", justify="right")
    for k, (p, mu) in enumerate(zip(probs, means)):
        filled = round(p * BAR_WIDTH)
        style = "green" if mu == best else "cyan"
        bar = Text("█" * filled, style=style) + Text("·" * (BAR_WIDTH - filled), style="grey50")
        table.add_row(str(k), f"{mu:g}", bar, f"{p:6.3f}")
    header = Text.assemble(
        (title, "bold"), f"   step {step}/{steps}   expected reward J = {expected:.4f}   (best arm pays {best:g})"
    )
    return Group(header, table)


class LiveView:
    """Draws frames in place on a terminal (at most every ``delay`` seconds); elsewhere prints only the last one."""

    def __init__(self, means: Sequence[float], steps: int, title: str, delay: float, console: Console | None = None):
        self.means, self.steps, self.title, self.delay = list(means), steps, title, delay
        self.console = console or Console()
        self.live = (
            Live(console=self.console, auto_refresh=False, transient=False) if self.console.is_terminal else None
        )

    def __enter__(self) -> LiveView:
        if self.live is not None:
            self.live.__enter__()
        return self

    def update(self, step: int, probs: Sequence[float]) -> None:
        if self.live is None:
            return
        expected = sum(p * m for p, m in zip(probs, self.means))
        self.live.update(render(step, self.steps, probs, self.means, expected, self.title), refresh=True)
        if self.delay:
            time.sleep(self.delay)

    def finish(self, probs: Sequence[float]) -> None:
        """Show the final state (in place on a terminal, printed otherwise)."""
        expected = sum(p * m for p, m in zip(probs, self.means))
        frame = render(self.steps, self.steps, probs, self.means, expected, self.title)
        if self.live is not None:
            self.live.update(frame, refresh=True)
        else:
            self.console.print(frame)

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
