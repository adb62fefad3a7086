"""What ``policygrad train`` shows a person: the progress bar during the run and, at the end, the held-out numbers
before and after training as a table (the task's summary rows, then :data:`COMMON_ROWS`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policygrad.threads import SlowSteps

__all__ = ["Progress", "print_before_after", "step0_evaluation"]

COMMON_ROWS = {
    "mean_reward": "mean reward",
    "mean_length": "mean length (characters)",
    "truncated_rate": "cut off at max_new_tokens",
}
"""The rows every task shows after its own (keys of :func:`policygrad.lm.evaluate.evaluate`'s results)."""


@dataclass
class Progress:
    """A rich progress bar of the steps (or of the prompts of an evaluation, ``label="eval"``), or nothing."""

    enabled: bool
    total: int
    done: int
    label: str = "train"

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            columns = (TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.bar = Bar(*columns, TextColumn("{task.description}"))
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.total, completed=self.done)
            self.slow = SlowSteps()
        return self

    def advance(self, description: str, seconds: float | None = None) -> None:
        """One more step done; ``seconds``, the step's time, adds a warning when steps run far slower than this
        run's fastest while the CPU is shared (:class:`policygrad.threads.SlowSteps`)."""
        if not self.enabled:
            return
        if seconds is not None:
            warning = self.slow.note(seconds)
            description = f"{description}  [yellow]{warning}[/]" if warning else description
        self.bar.update(self.task, advance=1, description=description)

    def advance_by(self, done: int) -> None:
        """Count ``done`` more (the evaluation's batches)."""
        if self.enabled:
            self.bar.update(self.task, advance=done)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


def step0_evaluation(output_dir: Path) -> dict[str, dict[str, float]]:
    """The step-0 evaluation in metrics.jsonl as ``{decoding: {metric: value}}`` (empty if there was none)."""
    before: dict[str, dict[str, float]] = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") != 0:
            continue
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval":
                before.setdefault(parts[1], {})[parts[2]] = value
    return before


def print_before_after(before: dict, after: dict, prompts: int, rows: Mapping[str, str], by_part: bool = False) -> None:
    """One table per decoding: each summary row (``{result key: label}``, the task's) before (when evaluated at step
    0) and after training; with ``by_part``, then the rates of each part of the prompts (length_digits: each
    digit-sum target S) after."""
    from rich.console import Console
    from rich.table import Table

    for decoding, values in after.items():
        table = Table(title=f"held-out prompts ({prompts}, {decoding} decoding)", title_justify="left")
        table.add_column("")
        if decoding in before:
            table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for key, label in {**rows, **COMMON_ROWS}.items():
            if key not in values:
                continue
            cells = [before[decoding].get(key)] if decoding in before else []
            table.add_row(label, *[f"{v:.3g}" if isinstance(v, float) else str(v) for v in [*cells, values[key]]])
        Console().print(table)
        if by_part and values.get("by_part"):
            Console().print(_by_part_table(values["by_part"], rows))


def _by_part_table(parts: Mapping[str, Mapping[str, Any]], rows: Mapping[str, str]) -> Any:
    """One row per part (``S=5``, ...): its prompts and the task's rates."""
    from rich.table import Table

    keys = [key for key in rows if any(key in values for values in parts.values())]
    table = Table(title="by target", title_justify="left")
    for name in ("", "prompts", *(rows[key] for key in keys)):
        table.add_column(name, justify="left" if not name else "right")
    for part, values in parts.items():
        cells = [str(values.get("prompts", ""))] + [f"{values[key]:.2f}" if key in values else "" for key in keys]
        table.add_row(part, *cells)
    return table
