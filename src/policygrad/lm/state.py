"""The trainer's state, saved beside each checkpoint's weights and validated in one place: what ``--resume`` needs to
continue a run bit for bit.

A checkpoint folder holds ``save_pretrained`` weights (safetensors) and tokenizer, which
``AutoModelForCausalLM.from_pretrained`` loads as they are, and ``trainer_state.pt``: the steps done, the advantage
estimator's state, every random generator, the curriculum, the config the run was trained with, and AdamW's moments
(twice the weights' size, hence ``save_optimizer``; without them a resume is not exact). The file is read with
``torch.load(weights_only=True)``: tensors and plain values only, so even a tampered file cannot run code, and its
contents are checked before anything of the run is touched.

A run launched by torchrun (:mod:`policygrad.distributed`) also saves its number of processes (``"world_size"``)
and every rank's generators (``"rank_rng"``, in rank order; ``"rng"`` is rank 0's), so that the same launch resumes
bit for bit; a checkpoint without ``"world_size"`` was written by a plain, single process.

Checkpoints written before issue 13 hold ``"baseline"`` (the REINFORCE moving average, a float) instead of
``"advantage"``; they load as the same state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from policygrad import checkpointing
from policygrad.errors import UsageError, first_line

__all__ = ["TRAINER_STATE", "Snapshot", "TrainerState", "load_trainer_state", "save_checkpoint"]

TRAINER_STATE = "trainer_state.pt"
"""Saved beside each checkpoint's weights."""


@dataclass
class Snapshot:
    """The small part of the trainer's state, taken before a step (what a stop inside the step saves): everything
    but the weights and the optimiser, which a skipped or unfinished step leaves as they were."""

    step: int
    advantage: dict[str, Any] = field(default_factory=dict)  # the advantage estimator's state()
    rng: dict[str, Any] = field(default_factory=dict)  # policygrad.rng.rng_state()
    curriculum: dict[str, Any] | None = None  # the ToleranceCurriculum's state(), when the run has one


@dataclass
class TrainerState(Snapshot):
    """A checkpoint's trainer state: a :class:`Snapshot`, the config it was trained with and AdamW's state."""

    config: dict[str, Any] | None = None  # the settings a resume must not change (see policygrad.lm.setup)
    optimizer: dict[str, Any] | None = None  # None when saved with save_optimizer: false
    world_size: int | None = None  # processes of a torchrun launch; None: a plain process
    rank_rng: list[dict[str, Any]] | None = None  # every rank's rng_state() under torchrun, in rank order

    def to_file(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "advantage": self.advantage, "rng": self.rng}
        if self.world_size is not None:
            state["world_size"] = self.world_size
            state["rank_rng"] = self.rank_rng
        if self.config is not None:
            state["config"] = json.dumps(self.config)
        if self.curriculum is not None:
            state["curriculum"] = self.curriculum
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer
        return state

    @classmethod
    def from_file(cls, state: dict[str, Any]) -> TrainerState:
        """From a validated file's dict (:func:`problem` found nothing), old layouts included."""
        advantage = state.get("advantage")
        if advantage is None:  # written before issue 13: the moving-average baseline as a float
            advantage = {"mean": torch.tensor(float(state.get("baseline", 0.0)))}
        return cls(
            step=state["step"],
            advantage=advantage,
            rng=state.get("rng", {}),
            curriculum=state.get("curriculum"),
            config=json.loads(state["config"]) if "config" in state else None,
            optimizer=state.get("optimizer"),
            world_size=state.get("world_size"),
            rank_rng=state.get("rank_rng"),
        )


def problem(state: Any) -> str | None:
    """What makes a loaded ``trainer_state.pt`` unusable for a resume, in a few words, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f'"step" must be a whole number >= 0, got {step!r:.40}' if "step" in state else 'no "step"'
    if "advantage" not in state:
        baseline = state.get("baseline")
        if isinstance(baseline, bool) or not isinstance(baseline, (int, float)) or not math.isfinite(baseline):
            return (
                f'"baseline" must be a finite number, got {baseline!r:.40}' if "baseline" in state else 'no "advantage"'
            )
    if "config" in state:
        try:
            saved = json.loads(state["config"])
        except (TypeError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            return '"config" must be a JSON object'
    for key in ("advantage", "rng", "optimizer", "curriculum"):
        if key in state and not isinstance(state[key], dict):
            return f'"{key}" must be a dict, got {type(state[key]).__name__}'
    if "world_size" in state:
        size, ranks = state["world_size"], state.get("rank_rng")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            return f'"world_size" must be a whole number >= 1, got {size!r:.40}'
        if not isinstance(ranks, list) or len(ranks) != size or not all(isinstance(r, dict) for r in ranks):
            return f'"rank_rng" must be a list of {size} dicts, one per rank'
    return None


def save_checkpoint(
    folder: Path,
    model: Any,
    tokenizer: Any,
    state: TrainerState,
    also: Callable[[Path], None] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Weights (a PEFT model saves its adapter alone; ``weights``, when given, in place of the model's own: a sharded
    model's gathered ones), tokenizer and trainer state, and whatever ``also`` writes into the folder, written
    atomically with a manifest of checksums (:func:`policygrad.checkpointing.save_atomic`): a crash during the save
    leaves the previous checkpoint as it was."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, **({} if weights is None else {"state_dict": weights}))
        tokenizer.save_pretrained(tmp)
        torch.save(state.to_file(), tmp / TRAINER_STATE)
        if also is not None:
            also(tmp)

    return checkpointing.save_atomic(folder, write, state.step)


def load_trainer_state(folder: Path, device: torch.device | str = "cpu") -> TrainerState:
    """A checkpoint's trainer state; a file that cannot be read safely, or lacks what a resume needs, is a one-line
    ``--resume`` error naming it. (A manifest only proves the file is the one that was written: a checkpoint written
    by a buggy or foreign program passes it, so the contents are checked here.)"""
    path = Path(folder) / TRAINER_STATE
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as exc:  # UnpicklingError for foreign objects, RuntimeError for a damaged zip, ...
        raise UsageError("--resume", f"{path} cannot be read safely: {first_line(exc)}") from None
    found = problem(state)
    if found:
        raise UsageError("--resume", f"{path} is not a policygrad trainer state: {found}")
    return TrainerState.from_file(state)
