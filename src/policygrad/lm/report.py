"""What ``policygrad train`` shows a person: the progress bar during the run and, at the end, the held-out numbers
before and after training as a table (the task's summary rows, then :data:`COMMON_ROWS`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Progress", "print_before_after", "step0_evaluation"]

COMMON_ROWS = {
    "mean_reward": "mean reward",
    "mean_length": "mean length (characters)",
    "truncated_rate": "cut off at max_new_tokens",
}
"""The rows every task shows after its own (keys of :func:`policygrad.lm.evaluate.evaluate`'s results)."""


@dataclass
class Progress:
    """A rich progress bar of the steps, or nothing."""

    enabled: bool
    total: int
    done: int

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self.bar = Bar(*columns, TextColumn("{task.description}"))
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.total, completed=self.done)
        return self

    def advance(self, description: str) -> None:
        if self.enabled:
            self.bar.update(self.task, advance=1, description=description)

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


def print_before_after(before: dict, after: dict, prompts: int, rows: Mapping[str, str]) -> None:
    """One table per decoding: each summary row (``{result key: label}``, the task's) before (when evaluated at step
    0) and after training."""
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
