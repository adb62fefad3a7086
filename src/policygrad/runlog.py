"""A run's per-step record, the same for ``policygrad train`` and ``policygrad control``: ``metrics.jsonl`` (one JSON
object per step, ``{"step": N, ...}``), TensorBoard scalars of the same numbers, and named side logs
(``completions.jsonl``, ``faults.jsonl``, ...) of rows tagged with their step.

A run resumed from the checkpoint of step S opens its log with ``append_after=S``: every log first drops what it holds
beyond S (steps the stopped run did after its checkpoint, and a line cut off by a kill) and TensorBoard hides the
events after S, so the continued logs read as one run's. A fresh run starts every log empty.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

from policygrad.runs import truncate_jsonl

__all__ = ["RunLog"]


class RunLog:
    """``metrics.jsonl`` + TensorBoard + side logs of one run folder; a context manager that closes them.

    Args:
        output_dir:   the run folder.
        append_after: the step of the checkpoint a resumed run starts from; None for a fresh run.
        side_logs:    names of the side logs (``"completions"`` writes ``completions.jsonl``), each opened on its
                      first row.
        tensorboard:  also write TensorBoard event files under ``tensorboard/`` (when tensorboard is installed).
        command:      how warnings name the program (``policygrad train``).
        write:        False: a log that writes nothing (the processes of a data-parallel run but rank 0).
    """

    def __init__(
        self,
        output_dir: Path,
        append_after: int | None = None,
        side_logs: tuple[str, ...] = (),
        tensorboard: bool = True,
        command: str = "policygrad",
        write: bool = True,
    ):
        self.output_dir = Path(output_dir)
        self.side_logs = side_logs
        self._files: dict[str, IO[str]] = {}
        self.writer = None
        self.enabled = write
        if not write:
            return
        for name in ("metrics", *side_logs):
            path = self.output_dir / f"{name}.jsonl"
            if append_after is None:
                path.unlink(missing_ok=True)
            else:
                truncate_jsonl(path, append_after)
        self._files["metrics"] = (self.output_dir / "metrics.jsonl").open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events the stopped run wrote after the checkpoint
                purge = None if append_after is None else append_after + 1
                self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                print(f"{command}: tensorboard is not installed; no event files are written", file=sys.stderr)

    def write(self, step: int, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl, and every number of ``record`` as a TensorBoard scalar at ``step``."""
        if not self.enabled:
            return
        self._append("metrics", {"step": step, **record})
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def rows(self, name: str, step: int, rows: list[dict[str, Any]]) -> None:
        """Rows of the side log ``name`` (one of ``side_logs``), each tagged with ``step``."""
        if name not in self.side_logs:
            raise ValueError(f"no side log {name!r}; this RunLog has {', '.join(self.side_logs) or 'none'}")
        if not self.enabled:
            return
        for row in rows:
            self._append(name, {"step": step, **row})

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if name not in self._files:
            self._files[name] = (self.output_dir / f"{name}.jsonl").open("a")
        handle = self._files[name]
        handle.write(json.dumps(record, allow_nan=True) + "\n")
        handle.flush()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
