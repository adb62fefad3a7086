"""The run folder, the same for ``policygrad train`` and ``policygrad control``: creating it, the overwrite/resume
policy, the config snapshot and what a resume may change, checkpoint folder names, and atomic writes.

A run folder holds ``config.yaml`` (the run's resolved settings; its presence marks the folder as a run),
``metrics.jsonl`` and other logs (:mod:`policygrad.runlog`), ``checkpoints/step-N`` (written atomically with a
manifest, :mod:`policygrad.checkpointing`) and what the run leaves at its end. The policy, for either command:

- a folder that holds a run is refused unless ``--resume`` (continue it from its newest intact checkpoint) or
  ``--overwrite`` (delete it and start again);
- a non-empty folder that is not a run is never deleted;
- nothing is written before the run's inputs have loaded, so a run that fails to start leaves nothing behind;
- a resume takes the run's own ``config.yaml`` as its recipe; a setting that would change what a step does is refused
  (naming each one) unless ``--allow-config-change``.

Pure standard library plus YAML: no torch, so the checks run before anything heavy loads.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from policygrad import checkpointing
from policygrad.errors import UsageError

__all__ = [
    "CONFIG_FILE",
    "RunComplete",
    "budget_change",
    "check_output_dir",
    "checkpoint_dir",
    "checkpoint_candidates",
    "checkpoint_run",
    "config_changes",
    "latest_checkpoint",
    "model_folder",
    "prepare_output_dir",
    "program",
    "resume_command",
    "truncate_jsonl",
    "write_atomic",
]

CONFIG_FILE = "config.yaml"
"""The resolved config in every run folder; its presence is what marks a folder as a policygrad run."""

METRICS_FILE = "metrics.jsonl"
"""The per-step records of every run (:mod:`policygrad.runlog`)."""

CHECKPOINTS = "checkpoints"
"""Periodic (and stop-time) checkpoints of a run: ``checkpoints/step-N``, N the steps done, six digits."""

INVOCATION_FIELDS = ("overwrite", "resume", "allow_config_change")
"""Fields that say what one invocation does, not what the run is: cleared in the saved config.yaml, so that
``--recipe <run>/config.yaml --resume`` continues the run."""


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old file or the new one,
    never half of one (:func:`policygrad.checkpointing.recover` deletes a stray temporary file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse an output folder that cannot take this run, writing nothing; return whether it holds a run."""
    out = Path(output_dir)
    holds_run = (out / CONFIG_FILE).is_file()
    if out.is_file():
        raise UsageError("--output-dir", f"{out} is a file")
    if resume and not holds_run:
        raise UsageError("--resume", f"{out} holds no run to resume")
    if holds_run and not resume:
        if not overwrite:
            raise UsageError(
                "--output-dir", f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
    elif out.is_dir() and any(out.iterdir()) and not resume:
        raise UsageError("--output-dir", f"{out} is not empty and holds no policygrad run; choose another folder")
    return holds_run


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool, settings: dict[str, Any]) -> Path:
    """Create ``output_dir`` (deleting an old run there with ``overwrite``) and write ``settings`` (the config as
    plain values) into its ``config.yaml``. Call it once the run's inputs have loaded: it is the run's first write."""
    import yaml

    out = Path(output_dir)
    if check_output_dir(out, resume, overwrite) and overwrite:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError("--output-dir", f"cannot create {out}: {err.strerror}") from None
    values = {**settings, **{name: False for name in INVOCATION_FIELDS if name in settings}}
    write_atomic(out / CONFIG_FILE, yaml.safe_dump(values, sort_keys=False))
    return out


def config_changes(saved: dict[str, Any], now: dict[str, Any], may_change: Iterable[str]) -> list[str]:
    """``"field old -> new"`` for each field that ``now`` sets differently from ``saved``, leaving out the fields a
    resumed run may change and fields ``saved`` predates."""
    free = set(may_change) | set(INVOCATION_FIELDS)
    return [
        f"{name} {_short(saved[name])} -> {_short(value)}"
        for name, value in now.items()
        if name not in free and name in saved and saved[name] != value
    ]


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


class RunComplete(Exception):
    """``--resume`` of a run that has done every step asked for: nothing to do, which is not an error (exit 0)."""


def program() -> str:
    """How to run policygrad again, as this process was started: ``policygrad`` where that name on the PATH is this
    program, else the path it was started by (``.venv/bin/policygrad`` after ``make``, whose venv is not on the
    PATH), or ``python -m policygrad``."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if script.name == "__main__.py" and script.parent.name == "policygrad":
        return f"{shlex.quote(sys.executable)} -m policygrad"
    if script.name != "policygrad":
        return "policygrad"  # called in-process (a test, a notebook): the documented name
    found = shutil.which("policygrad")
    if found is not None and Path(found).resolve() == script.resolve():
        return "policygrad"
    return shlex.quote(str(script))


def resume_command(command: str, output_dir: Path, launcher: str | None = None) -> str:
    """The command that continues a run: its own config.yaml as the recipe (which names the output folder too);
    ``launcher`` replaces :func:`program` (``torchrun --nproc-per-node 2 -m policygrad`` for a data-parallel run)."""
    recipe = shlex.quote(str(Path(output_dir) / CONFIG_FILE))
    return f"{launcher or program()} {command} --recipe {recipe} --resume"


def budget_change(output_dir: Path, fields: dict[str, Any]) -> str:
    """``"max_steps 20 -> 40"`` for each budget field (how long to train) that a resume changes from the run's
    config.yaml, or ``""``: a resume may lengthen or shorten a run, and says so."""
    import yaml

    try:
        saved = yaml.safe_load((Path(output_dir) / CONFIG_FILE).read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return ""
    return ", ".join(
        f"{name} {_short(saved[name])} -> {_short(value)}"
        for name, value in fields.items()
        if isinstance(saved, dict) and name in saved and saved[name] != value
    )


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint after ``step`` steps goes: ``checkpoints/step-000042``."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def checkpoint_candidates(output_dir: Path) -> list[Path]:
    """Every folder of a run that may hold a checkpoint: ``final``, ``checkpoints/step-*`` and what a save killed
    between its two renames left under a hidden ``.old`` name (see :mod:`policygrad.checkpointing`)."""
    out = Path(output_dir)
    return [out / "final", *sorted(out.glob(".final.old-*")), *checkpointing.folders_in(out / CHECKPOINTS)]


def latest_checkpoint(output_dir: Path, warn: Callable[[str], None] | None = None, tidy: bool = False) -> Path | None:
    """The complete checkpoint with the highest step, or None. A damaged one is reported in one line through ``warn``
    and passed over for the next older one. With ``tidy`` (a resume: no other process writes this run) what a killed
    save left is tidied first (:func:`policygrad.checkpointing.recover`); a reader of a live run must not."""
    out = Path(output_dir)
    if tidy:
        checkpointing.recover(out)
        checkpointing.recover(out / CHECKPOINTS)
    return checkpointing.latest_good(checkpoint_candidates(out), warn)


def checkpoint_run(model: str | Path) -> Path | None:
    """The run folder that ``model`` was saved in, or None when it is not a run's checkpoint.

    A run (``policygrad train --output-dir RUN``) saves ``RUN/final`` and ``RUN/checkpoints/step-N``, and marks
    ``RUN`` with its resolved ``config.yaml``; ``model`` may also be ``RUN`` itself.

    >>> checkpoint_run("default") is None
    True
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    candidates = [path]
    if path.name == "final":
        candidates.append(path.parent)
    if path.parent.name == CHECKPOINTS:
        candidates.append(path.parent.parent)
    for folder in candidates:
        if (folder / CONFIG_FILE).is_file() and (folder / METRICS_FILE).is_file():
            return folder
    return None


def model_folder(model: str) -> str:
    """``model``, or for a run folder the newest model it saved (``final`` once the run has finished)."""
    run = checkpoint_run(model)
    if run is None or Path(model).expanduser().resolve() != run.resolve():
        return model
    saved = latest_checkpoint(run)
    if saved is None:
        raise UsageError("--model", f"{model} is a run that has saved no model yet (no final/ or checkpoints/)")
    return str(saved)


def truncate_jsonl(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep the JSONL records of steps <= ``last_step`` (what a checkpoint has seen) and return them; drop later
    ones and lines that do not parse (a write cut off by a kill). Rewritten atomically, so a kill here loses nothing."""
    path = Path(path)
    if not path.is_file():
        return []
    kept, lines = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(record)
            lines.append(line + "\n")  # as written, byte for byte
    write_atomic(path, "".join(lines))
    return kept
