"""The GRPO trainer of ``policygrad train``, in Spinning Up's order: sample, score, advantages, update, log.
The update itself (variants, loss, optimiser steps) is :mod:`policygrad.lm.update`.

For each step: take B prompts, sample G completions of each (N = B * G rows, see :mod:`policygrad.lm.rollout` for
the letters), score them with the reward functions, turn the N rewards into N advantages (GRPO, RLOO or a REINFORCE
moving-average baseline), and take ``updates_per_batch`` AdamW steps on

    loss = policy_loss(logprobs, advantages)  -  w_H * entropy  +  beta * KL(pi || pi_ref)

each aggregated over the completion tokens. With one update per batch the policy term is REINFORCE's; with several
it is the clipped importance-ratio surrogate against the sampling policy's log-probs (Schulman et al. 2017; the
GRPO objective of Shao et al. 2024, eq. 3, is this with group advantages and the k3 KL).

A long run must survive its own failures (docs/reliability.md): every random draw of a step is a function of
(seed, step) or restored from the checkpoint, so a resumed run is bit for bit the run that was stopped; checkpoints
are written atomically with checksums (:mod:`policygrad.checkpointing`); SIGINT/SIGTERM finish the step and save
(:mod:`policygrad.stopping`); a reward function's fault stops the run with a checkpoint or, with ``reward_fault:
skip``, costs only the samples concerned; a non-finite loss or gradient skips the update.

``train(config)`` returns the run directory; ``run_train(config)`` is the CLI entry point (exit code).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from policygrad import checkpointing
from policygrad.errors import UsageError
from policygrad.lm.config import CONFIG_FILE, GRPOConfig, config_to_dict
from policygrad.lm.curriculum import ToleranceCurriculum
from policygrad.lm.evaluate import evaluate, group_fields, task_rates
from policygrad.lm.rewards import RewardError
from policygrad.lm.rollout import Rollout, rollout_logprobs, sample
from policygrad.lm.update import ADVANTAGES, ENTROPY_WEIGHTS, update
from policygrad.stopping import EXIT_DIVERGED, Stopped, StopSignals

__all__ = [
    "EXIT_DIVERGED",
    "prepare_run_dir",
    "resolve_device",
    "run_train",
    "train",
]

TRAINER_STATE = "trainer_state.pt"
"""Saved beside each checkpoint's weights: optimiser state, step and baseline, for ``--resume``."""


# --------------------------------------------------------------------------------------------------------------
# Setup: device, run directory, prompt order, checkpoints
# --------------------------------------------------------------------------------------------------------------


def resolve_device(config: GRPOConfig) -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None for full float32) that ``config`` asks for and this machine has."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device", f"{config.device} was asked for but CUDA is not available here")
    if config.precision == "float32":
        return device, None
    if config.precision == "bfloat16":
        return device, torch.bfloat16
    # auto: bf16 autocast where the hardware has bfloat16 matrix products (CUDA GPUs that support it; CPUs with
    # AVX512-BF16 or AMX, where they run ~3x float32); elsewhere it would be emulated, slower and less precise
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_bf16_matmul()
    return device, torch.bfloat16 if fast else None


def _cpu_has_bf16_matmul() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def _fused_adamw_supported(device: torch.device) -> bool:
    """torch's fused AdamW runs on CPU and CUDA (float32 weights, as ours are)."""
    return device.type in ("cpu", "cuda")


def check_output_dir(config: GRPOConfig) -> bool:
    """Refuse an output folder that cannot take this run, writing nothing; return whether it holds a run.

    A folder that already holds a run (a ``config.yaml``) is refused unless ``resume`` (continue it) or
    ``overwrite`` (delete it) is set; a non-empty folder that is not a run is never deleted.
    """
    out = config.output_dir
    holds_run = (out / CONFIG_FILE).is_file()
    if out.is_file():
        raise UsageError("--output-dir", f"{out} is a file")
    if config.resume and not holds_run:
        raise UsageError("--resume", f"{out} holds no run to resume")
    if holds_run and not config.resume:
        if not config.overwrite:
            raise UsageError(
                "--output-dir", f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
    elif out.is_dir() and any(out.iterdir()) and not config.resume:
        raise UsageError("--output-dir", f"{out} is not empty and holds no policygrad run; choose another folder")
    return holds_run


def prepare_run_dir(config: GRPOConfig) -> Path:
    """Create ``config.output_dir`` (replacing an old run with ``overwrite``) and write the resolved config into it.
    Called once the model and prompts have loaded, so a run that fails to start leaves nothing behind."""
    import yaml

    out = config.output_dir
    if check_output_dir(config) and config.overwrite:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError("--output-dir", f"cannot create {out}: {err.strerror}") from None
    # the run's settings, not this invocation's actions, so `--recipe <run>/config.yaml --resume` continues it
    values = {**config_to_dict(config), "overwrite": False, "resume": False, "allow_config_change": False}
    tmp = out / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    os.replace(tmp, out / CONFIG_FILE)  # atomic: a run killed here still has a readable config
    return out


def prompt_order(num_prompts: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """The prompt indices of each step of one epoch: a seeded shuffle cut into batches, the incomplete last one
    dropped. A function of (seed, epoch) alone, so a resumed run sees the same prompts it would have seen."""
    generator = torch.Generator().manual_seed(seed * 1009 + epoch)
    order = torch.randperm(num_prompts, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_prompts - batch_size + 1, batch_size)]


def save_checkpoint(
    folder: Path,
    model,
    tokenizer,
    optimizer,
    step: int,
    baseline: float,
    with_optimizer: bool = True,
    config: GRPOConfig | None = None,
    rng: dict[str, Any] | None = None,
    curriculum: dict[str, Any] | None = None,
) -> Path:
    """``save_pretrained`` weights (safetensors) and tokenizer, what ``AutoModelForCausalLM.from_pretrained`` loads,
    plus the trainer state for resuming: step, baseline, random generators, the config, and the optimiser (its moments
    are twice the weights' size, hence ``with_optimizer``; without them a resume is not exact).

    Written atomically with a manifest of checksums (:func:`policygrad.checkpointing.save_atomic`): a crash during
    the save leaves the previous checkpoint as it was.
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        state: dict[str, Any] = {"step": step, "baseline": baseline, "rng": rng if rng is not None else rng_state()}
        if config is not None:
            state["config"] = json.dumps(_comparable(config))
        if curriculum is not None:
            state["curriculum"] = curriculum
        if with_optimizer:
            state["optimizer"] = optimizer.state_dict()
        torch.save(state, tmp / TRAINER_STATE)

    return checkpointing.save_atomic(folder, write, step)


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every folder of a run that may hold a checkpoint: ``final``, ``checkpoints/step-*`` and what a save killed
    between its two renames left under a hidden ``.old`` name (see :mod:`policygrad.checkpointing`)."""
    old_finals = sorted(run_dir.glob(".final.old-*"))
    return [run_dir / "final", *old_finals, *checkpointing.folders_in(run_dir / "checkpoints")]


def latest_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The complete checkpoint with the highest step (periodic ones and ``final``), or None. A damaged one (missing,
    truncated or corrupted files) is reported in one line and passed over for the next older one."""
    return checkpointing.latest_good(checkpoint_folders(Path(run_dir)), warn)


def load_trainer_state(folder: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's trainer state, read with ``weights_only=True``: tensors and plain values only, so even a
    tampered file cannot run code when loaded; one that holds anything else, or lacks what a resume needs (a step
    that is a whole number >= 0, a finite baseline, a config that is JSON), is a one-line ``--resume`` error naming
    the file.

    A manifest only proves the file is the one that was written: a checkpoint written by a buggy or foreign program
    (or tampered with, and the manifest updated) passes it, so the contents are checked here, before anything of the
    run is touched."""
    path = folder / TRAINER_STATE
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as exc:  # UnpicklingError for foreign objects, RuntimeError for a damaged zip, ...
        raise UsageError("--resume", f"{path} cannot be read safely: {_first_line(exc)}") from None
    problem = _trainer_state_problem(state)
    if problem:
        raise UsageError("--resume", f"{path} is not a policygrad trainer state: {problem}")
    return state


def _trainer_state_problem(state: Any) -> str | None:
    """What makes ``state`` unusable for a resume, in a few words, or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    step, baseline = state.get("step"), state.get("baseline")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f'"step" must be a whole number >= 0, got {step!r:.40}' if "step" in state else 'no "step"'
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)) or not math.isfinite(baseline):
        return f'"baseline" must be a finite number, got {baseline!r:.40}' if "baseline" in state else 'no "baseline"'
    if "config" in state:
        try:
            saved = json.loads(state["config"])
        except (TypeError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            return '"config" must be a JSON object'
    for key, kind in (("rng", dict), ("optimizer", dict), ("curriculum", dict)):
        if key in state and not isinstance(state[key], kind):
            return f'"{key}" must be a {kind.__name__}, got {type(state[key]).__name__}'
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rng_state() -> dict[str, Any]:
    """Every random generator a step may draw from: torch's CPU (and CUDA) generators, Python's ``random`` and
    NumPy's global one (user reward functions may use either). Plain tensors, lists and numbers, so the state loads
    with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (generators it did not save are left as they are)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "overwrite",
        "allow_config_change",
        "output_dir",
        "max_steps",
        "epochs",
        "progress",
        "threads",
        "device",
        "eval_every",
        "eval_size",
        "eval_decoding",
        "save_every",
        "save_optimizer",
        "keep_checkpoints",
        "log_completions",
        "reward_fault",
        "reward_timeout",
        "max_bad_steps",
    }
)
"""Fields a resumed run may change without ``--allow-config-change``: how long to train, where and how to log, save
and evaluate, and what to do about faults; none of them changes the update a step makes."""


def _comparable(config: GRPOConfig) -> dict[str, Any]:
    return {k: v for k, v in config_to_dict(config).items() if k not in RESUME_MAY_CHANGE}


def config_changes(saved: dict[str, Any], config: GRPOConfig) -> list[str]:
    """``"field old -> new"`` for each field that ``config`` sets differently from ``saved`` (a checkpoint's config),
    leaving out :data:`RESUME_MAY_CHANGE` and fields the checkpoint predates."""
    now = _comparable(config)
    return [
        f"{name} {_short(saved[name])} -> {_short(value)}"
        for name, value in now.items()
        if name in saved and saved[name] != value
    ]


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def resume_command(run_dir: Path) -> str:
    """The command that continues a run: its own config.yaml as the recipe (it names the output folder too)."""
    return f"policygrad train --recipe {shlex.quote(str(run_dir / CONFIG_FILE))} --resume"


class RunLog:
    """The per-step record: ``metrics.jsonl``, TensorBoard scalars, ``completions.jsonl`` and, when a reward
    function faulted under ``reward_fault: skip``, ``faults.jsonl``.

    Resuming from step S (``append_after=S``) first drops what the logs hold beyond S (steps done after the
    checkpoint by the run that died, and a half-written last line), so the continued logs read as one run's.
    """

    FILES = ("metrics.jsonl", "completions.jsonl", "faults.jsonl")

    def __init__(self, run_dir: Path, append_after: int | None):
        self.run_dir = run_dir
        if append_after is not None:
            for name in self.FILES:
                _truncate_log(run_dir / name, append_after)
        mode = "w" if append_after is None else "a"
        self.metrics = (run_dir / "metrics.jsonl").open(mode)
        self.completions = (run_dir / "completions.jsonl").open(mode)
        self.faults = None  # opened on the first fault
        if append_after is None and (run_dir / "faults.jsonl").exists():
            (run_dir / "faults.jsonl").unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events the dead run wrote after the checkpoint
            purge = None if append_after is None else append_after + 1
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        except ImportError:
            print("policygrad train: tensorboard is not installed; no event files are written", file=sys.stderr)
            self.writer = None

    def write(self, step: int, record: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        self.metrics.write(json.dumps({"step": step, **record}, allow_nan=True) + "\n")
        self.metrics.flush()
        for sample_record in samples:
            self.completions.write(json.dumps({"step": step, **sample_record}) + "\n")
        self.completions.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def fault(self, step: int, fault: Any, prompt: str, completion: str) -> None:
        """One skipped reward fault (a :class:`policygrad.lm.rewards.RewardFault`), as a line of faults.jsonl."""
        if self.faults is None:
            self.faults = (self.run_dir / "faults.jsonl").open("a")
        record = {
            "step": step,
            "function": fault.function,
            "kind": fault.kind,
            "sample": fault.sample,
            "prompt": prompt,
            "completion": completion,
            "message": fault.message,
        }
        self.faults.write(json.dumps(record) + "\n")
        self.faults.flush()

    def close(self) -> None:
        self.metrics.close()
        self.completions.close()
        if self.faults is not None:
            self.faults.close()
        if self.writer is not None:
            self.writer.close()


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the JSONL records of steps <= ``last_step``; drop later ones and lines that do not parse (a write cut off
    by a kill). Rewritten through a temporary file, so a kill here loses nothing either."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except ValueError:
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """A rich progress bar, or nothing."""

    enabled: bool
    total: int
    done: int

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.total, completed=self.done)
        return self

    def advance(self, description: str) -> None:
        if self.enabled:
            self.bar.update(self.task, advance=1, description=description)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)


@dataclass
class _Session:
    """Everything a run sets up once: model, optimiser, prompts, rewards, and where in the run we are."""

    config: GRPOConfig
    run_dir: Path
    model: Any
    tokenizer: Any
    reference: Any  # frozen copy of the initial policy, or None without a KL term
    optimizer: torch.optim.Optimizer
    prompts: Any  # policygrad.lm.data.Prompts
    reward_set: Any  # policygrad.lm.rewards.RewardSet
    autocast_dtype: torch.dtype | None
    steps_per_epoch: int
    total_steps: int
    start_step: int = 0
    baseline: float = 0.0  # reinforce's moving average of past rewards
    curriculum: ToleranceCurriculum | None = None  # the training rewards' length tolerance, when it is scheduled
    resumed: bool = False
    last_saved: int = -1  # the step of the newest checkpoint on disk, so a stop does not write the same one twice

    def batch(self, step: int) -> list[dict[str, Any]]:
        """The B prompt records of a step."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = prompt_order(len(self.prompts.train), self.config.prompts_per_step, epoch, self.config.seed)
        return [self.prompts.train[i] for i in order[index]]

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """:func:`policygrad.lm.evaluate.evaluate` on the first ``eval_size`` held-out prompts."""
        config, records = self.config, self.prompts.heldout[: self.config.eval_size]
        if not records or not config.eval_decoding:
            return {}
        return evaluate(
            self.model,
            self.tokenizer,
            records,
            self.reward_set,
            config.eval_decoding,
            config.max_new_tokens,
            config.temperature,
            config.top_p,
            config.micro_batch_size,
            self.autocast_dtype,
            config.seed,
            config.reward_fault,
            config.reward_timeout or None,
        )

    def save(
        self,
        folder: Path,
        step: int,
        baseline: float | None = None,
        rng: dict[str, Any] | None = None,
        curriculum: dict[str, Any] | None = None,
    ) -> Path:
        """Save the model, optimiser and trainer state as the state after ``step`` steps (``baseline``, ``rng`` and
        ``curriculum`` default to the current ones; a stop passes those it saved before the step that went wrong)."""
        if curriculum is None and self.curriculum is not None:
            curriculum = self.curriculum.state()
        save_checkpoint(
            folder,
            self.model,
            self.tokenizer,
            self.optimizer,
            step,
            self.baseline if baseline is None else baseline,
            self.config.save_optimizer,
            self.config,
            rng,
            curriculum,
        )
        self.last_saved = step
        return folder

    def checkpoint(
        self,
        step: int,
        baseline: float | None = None,
        rng: dict[str, Any] | None = None,
        curriculum: dict[str, Any] | None = None,
    ) -> Path:
        """``checkpoints/step-N`` (unless the newest checkpoint already is step N), then prune old ones."""
        folder = self.run_dir / "checkpoints" / f"step-{step:06d}"
        if self.last_saved == step and checkpointing.verify(folder) is None:
            return folder
        self.save(folder, step, baseline, rng, curriculum)
        checkpointing.prune(self.run_dir / "checkpoints", self.config.keep_checkpoints)
        return folder


def _start(config: GRPOConfig) -> _Session:
    """Run directory, device, seeds, rewards, model (from the last checkpoint when resuming), prompts, optimiser."""
    from policygrad.lm.data import check_prompt_source, load_prompts
    from policygrad.lm.models import load_model
    from policygrad.lm.rewards import load_rewards

    check_output_dir(config)  # refuse a taken folder before anything heavy; write nothing until the inputs load
    run_dir = config.output_dir
    device, autocast_dtype = resolve_device(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    _seed_everything(config.seed)  # a resumed run then restores the generators' saved states
    reward_set = load_rewards(config.rewards)  # before the model: a typo here should not cost a model load
    check_prompt_source(config.prompts)  # likewise a missing or malformed prompts file

    resume_from, state = _resume_point(config) if config.resume else (None, None)
    model, tokenizer = load_model(str(resume_from or config.model), dtype="float32", device=device)
    # dropout off throughout: the ratio pi/pi_old and the KL must compare the same deterministic function
    model.eval()
    prompts = load_prompts(
        config.prompts,
        tokenizer,
        config.heldout_prompts,
        config.max_passage_tokens,
        config.target_length,
        (config.digit_sum_min, config.digit_sum_max),
        config.length_tolerance,
    )
    steps_per_epoch = len(prompts.train) // config.prompts_per_step
    if steps_per_epoch == 0:
        raise UsageError(
            "--prompts-per-step", f"{config.prompts_per_step} is more than the {len(prompts.train)} training prompts"
        )
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if state is not None and state["step"] > total_steps:
        raise UsageError(
            "--max-steps", f"the run to resume is at step {state['step']}, past the {total_steps} steps asked for"
        )
    _check_rewards_fit_prompts(reward_set, prompts.train[0], config)
    curriculum = None
    if config.curriculum_tolerance:
        if "target_length" not in prompts.train[0]:
            raise UsageError(
                "--curriculum-tolerance", "schedules the length_digits tolerance, but the prompts have no target_length"
            )
        curriculum = ToleranceCurriculum(
            config.curriculum_tolerance, config.length_tolerance, config.curriculum_advance_at, config.curriculum_window
        )

    reference = None
    if config.kl_coef > 0:
        # the reference is the run's INITIAL model, also when resuming from a later checkpoint
        reference = load_model(config.model, dtype="float32", device=device)[0] if resume_from else copy.deepcopy(model)
        reference.eval().requires_grad_(False)
    # fused: one kernel over all parameters instead of a dozen passes over memory (0.48 s -> 0.11 s per step for
    # SmolLM2-135M on this CPU, benchmarks/NOTES.md); same update rule
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=_fused_adamw_supported(device)
    )
    session = _Session(
        config,
        run_dir,
        model,
        tokenizer,
        reference,
        optimizer,
        prompts,
        reward_set,
        autocast_dtype,
        steps_per_epoch,
        total_steps,
        resumed=resume_from is not None,
        curriculum=curriculum,
    )
    if state is not None:
        _restore(session, resume_from, state)
    prepare_run_dir(config)  # the first write: everything above has loaded and been checked
    return session


def _restore(session: _Session, folder: Path, state: dict[str, Any]) -> None:
    """Put a checkpoint's trainer state into a fresh session: AdamW's moments, the generators, step and baseline.
    A state that loads but does not fit (another model's optimiser, a damaged generator state) is a one-line
    ``--resume`` error naming the file."""
    try:
        if "optimizer" in state:  # else saved with save_optimizer=false: AdamW restarts its moments
            session.optimizer.load_state_dict(state["optimizer"])
        if "rng" in state:
            set_rng_state(state["rng"])
        if session.curriculum is not None and "curriculum" in state:
            session.curriculum.restore(state["curriculum"])
    except Exception as exc:  # ValueError, KeyError, TypeError, RuntimeError: all "this file does not fit"
        raise UsageError("--resume", f"{folder / TRAINER_STATE} does not fit this run: {_first_line(exc)}") from None
    if "optimizer" not in state:
        print(
            f"policygrad train: {folder} has no optimiser state (save_optimizer: false); AdamW's "
            "moments restart from zero, so this resume is not exact",
            file=sys.stderr,
        )
    session.start_step, session.baseline = state["step"], float(state["baseline"])
    session.last_saved = session.start_step


def _check_rewards_fit_prompts(reward_set: Any, record: dict[str, Any], config: GRPOConfig) -> None:
    """Score the first training prompt with an empty completion (one a model can always produce), so a reward that
    needs fields the prompts file lacks (the built-ins need ``target_length`` and ``target_digit_sum``) fails now,
    in one line naming --rewards and --prompts, rather than at step 1 after the run folder exists. Under
    ``reward_fault: skip`` such faults are tolerated by design, so the trial only warns. The generators are put back
    afterwards: the trial leaves the run exactly as it would have been without it."""
    have = ", ".join(sorted(k for k in record if k != "prompt")) or "none"
    trial = f"tried on the first prompt of --prompts {config.prompts} (fields: {have}) with an empty completion"
    saved = rng_state()
    try:
        scores = reward_set.score(
            [record["prompt"]],
            [""],
            group_fields([record], 1),
            on_fault=config.reward_fault,
            timeout=config.reward_timeout or None,
        )
    except RewardError as err:
        raise UsageError("--rewards", f"these rewards do not fit the prompts: {trial}, {err}") from None
    finally:
        set_rng_state(saved)
    if scores.faults:
        _warn(
            f"the rewards may not fit the prompts ({trial}): {scores.faults[0].line()}; with --reward-fault skip "
            "the run goes on, and such samples train with advantage 0"
        )


def _seed_everything(seed: int) -> None:
    """torch, Python's ``random`` and NumPy's global generator, which user reward functions may draw from."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def _resume_point(config: GRPOConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest complete checkpoint of the run being resumed and its trainer state, after tidying what a killed
    save left; refuses a config that differs from the checkpoint's unless ``allow_config_change``."""
    run_dir = config.output_dir
    checkpointing.recover(run_dir)
    checkpointing.recover(run_dir / "checkpoints")
    folder = latest_checkpoint(run_dir)
    if folder is None:
        if any(candidate.is_dir() for candidate in checkpoint_folders(run_dir)):  # each one reported above
            raise UsageError(
                "--resume",
                f"{run_dir} holds no intact checkpoint (every one is damaged, see above); pass "
                "--overwrite instead of --resume to start the run again",
            )
        print(f"policygrad train: {run_dir} has no complete checkpoint yet; starting from step 0", file=sys.stderr)
        return None, None
    state = load_trainer_state(folder)
    if "config" in state and not config.allow_config_change:
        changes = config_changes(json.loads(state["config"]), config)
        if changes:
            raise UsageError(
                "--resume",
                f"the config differs from the one {folder.relative_to(run_dir)} was trained with: {'; '.join(changes)}"
                f" (resume with --recipe {run_dir / CONFIG_FILE}, or pass --allow-config-change to go on anyway)",
            )
    return folder, state


def train(config: GRPOConfig) -> Path:
    """Train ``config.model`` on ``config.prompts`` and return the run directory (see the module docstring)."""
    run = _start(config)
    log = RunLog(run.run_dir, append_after=run.start_step if run.resumed else None)
    bad_steps, before_bad = 0, None  # non-finite updates in a row, and the state from before the first of them
    try:
        with (
            StopSignals("policygrad train") as stop,
            _Progress(config.progress, run.total_steps, run.start_step) as progress,
        ):
            if config.eval_every and run.start_step == 0 and not run.resumed:
                # the learning curve's starting point: the held-out pass rate before any update (a resumed run has
                # this line in its log already, kept by RunLog's truncation, which keeps steps <= the checkpoint's)
                initial = _flat_scalars(run.evaluate())
                if initial:
                    log.write(0, initial, [])
            for step in range(run.start_step, run.total_steps):
                started = time.perf_counter()
                records = run.batch(step)
                # what a stop inside this step saves
                before = (step, run.baseline, rng_state(), run.curriculum.state() if run.curriculum else None)

                # 1. sample G completions of each of B prompts with the current policy
                torch.manual_seed(config.seed * 1_000_003 + step)  # repeatable, and the same after a resume
                rollout = sample(
                    run.model,
                    run.tokenizer,
                    [r["prompt"] for r in records],
                    config.group_size,
                    config.max_new_tokens,
                    config.temperature,
                    config.top_p,
                    micro_batch_size=config.micro_batch_size,
                    autocast_dtype=run.autocast_dtype,
                    score_tokens=config.updates_per_batch > 1,
                )
                sampled = time.perf_counter()

                # 2. score every completion
                fields = task_fields = group_fields(records, config.group_size)
                if run.curriculum is not None:  # the rewards see this stage's tolerance; the logged rates the task's
                    fields = {**task_fields, "tolerance": [run.curriculum.tolerance] * len(rollout.completions)}
                try:
                    scores = run.reward_set.score(
                        rollout.prompts,
                        rollout.completions,
                        fields,
                        on_fault=config.reward_fault,
                        timeout=config.reward_timeout or None,
                        allow_nan=False,
                    )
                except RewardError as err:  # policy "error": keep everything up to this step, then say how to go on
                    folder = run.checkpoint(*before)
                    raise RewardError(
                        err.field,
                        f"{str(err)[len(err.field) + 2 :]}; saved the run at step {step} in {folder}; fix "
                        f"the function (or pass --reward-fault skip) and resume with: {resume_command(run.run_dir)}",
                    ) from err
                _log_faults(log, step + 1, scores, rollout)
                rewards = torch.tensor(scores.rewards, dtype=torch.float32)  # (N,)
                if config.truncated_reward is not None:  # a reply must end itself, not be cut off by the budget
                    rewards[rollout.truncated.cpu() & ~rewards.isnan()] = config.truncated_reward
                ref_logprobs = _reference_logprobs(run.reference, rollout, config, run.autocast_dtype)  # (N, T)|None

                # 3. advantages, and this batch's entropy weight
                advantages, next_baseline = ADVANTAGES[config.advantage](rewards, config, run.baseline)  # (N,)
                entropy_weight = ENTROPY_WEIGHTS[config.entropy_weight](rewards, config)

                # 4. update the policy
                update_metrics = update(
                    run.model,
                    run.optimizer,
                    rollout,
                    advantages,
                    ref_logprobs,
                    entropy_weight,
                    config,
                    run.autocast_dtype,
                )
                run.baseline = next_baseline

                # 5. log, and now and then evaluate and save
                done, elapsed = step + 1, time.perf_counter() - started
                record = _step_record(rollout, scores, rewards, advantages, entropy_weight, update_metrics, task_fields)
                if run.curriculum is not None:
                    staged = task_rates(rollout.completions, fields)["pass_rate"]
                    record["curriculum/tolerance"] = float(run.curriculum.tolerance)
                    record["curriculum/pass_rate"] = staged
                    run.curriculum.observe(staged)
                record.update(
                    baseline=run.baseline,
                    lr=run.optimizer.param_groups[0]["lr"],
                    epoch=step // run.steps_per_epoch,
                    sample_time=sampled - started,
                    step_time=elapsed,
                    tokens_per_s=float(rollout.completion_lengths.sum()) / elapsed,
                    reward_faults=float(scores.faulted_samples),
                    skipped_updates=update_metrics.get("skipped_updates", 0.0),
                )
                if config.eval_every and done % config.eval_every == 0 and done < run.total_steps:
                    record.update(_flat_scalars(run.evaluate()))
                log.write(done, record, _samples(rollout, scores.rewards, config.log_completions))
                progress.advance(f"reward {record['reward_mean']:.3f}")

                # 6. a non-finite loss or gradient: the update was skipped; several in a row stop the run
                if record["skipped_updates"]:
                    bad_steps, before_bad = bad_steps + 1, before_bad or before
                    _warn(
                        f"step {done}: non-finite loss or gradient norm (loss {record.get('loss')}, grad_norm "
                        f"{record.get('grad_norm')}); update skipped ({bad_steps} of {config.max_bad_steps} "
                        "in a row)"
                    )
                    if bad_steps >= config.max_bad_steps:
                        folder = run.checkpoint(*before_bad)
                        raise Stopped(
                            f"stopped: {bad_steps} steps in a row had a non-finite loss or gradient norm; saved the "
                            f"state from before the first of them (step {before_bad[0]}) in {folder}; lower --lr or "
                            f"check the rewards, then resume with: {resume_command(run.run_dir)}",
                            EXIT_DIVERGED,
                        )
                else:  # no periodic checkpoint while a run may be going wrong
                    bad_steps, before_bad = 0, None
                    if config.save_every and done % config.save_every == 0 and done < run.total_steps:
                        run.checkpoint(done)
                if stop.requested and done < run.total_steps:
                    folder = run.checkpoint(*(before_bad or (done,)))
                    raise Stopped(
                        f"stopped by {stop.name} after step {done} of {run.total_steps}; saved {folder}; "
                        f"resume with: {resume_command(run.run_dir)}",
                        stop.exit_code,
                    )

        final = run.evaluate()
        _write_atomic(run.run_dir / "eval.json", json.dumps({"step": run.total_steps, **final}, indent=2) + "\n")
        if final:
            log.write(run.total_steps, _flat_scalars(final), [])
        run.save(run.run_dir / "final", run.total_steps)
    finally:
        log.close()
    return run.run_dir


def _warn(message: str) -> None:
    print(f"policygrad train: {message}", file=sys.stderr, flush=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _log_faults(log: RunLog, step: int, scores: Any, rollout: Rollout) -> None:
    """Reward faults skipped under ``reward_fault: skip``: one line each in faults.jsonl, one warning per step."""
    for fault in scores.faults:
        row = 0 if fault.sample is None else fault.sample
        log.fault(step, fault, rollout.prompts[row], rollout.completions[row])
    if scores.faults:
        more = f" (and {len(scores.faults) - 1} more)" if len(scores.faults) > 1 else ""
        _warn(
            f"step {step}: {scores.faulted_samples} samples get advantage 0 after a reward fault: "
            f"{scores.faults[0].line()}{more}; see faults.jsonl"
        )


def _samples(rollout: Rollout, rewards: list[float], count: int) -> list[dict[str, Any]]:
    """The first ``count`` (prompt, completion, reward) of a batch, for completions.jsonl."""
    rows = zip(rollout.prompts, rollout.completions, rewards)
    return [{"prompt": p, "completion": c, "reward": r} for p, c, r in list(rows)[:count]]


def _reference_logprobs(
    reference: torch.nn.Module | None, rollout: Rollout, config: GRPOConfig, autocast_dtype: torch.dtype | None
) -> Tensor | None:
    """Log-probs of the sampled tokens under the frozen reference model: (N, T), or None without a KL term."""
    if reference is None:
        return None
    return rollout_logprobs(reference, rollout, config.temperature, config.micro_batch_size, autocast_dtype)


def _flat_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{decoding: {metric: value}}`` -> ``{"eval/<decoding>/<metric>": value}`` for the numbers only (no examples)."""
    return {
        f"eval/{decoding}/{key}": value
        for decoding, values in results.items()
        for key, value in values.items()
        if isinstance(value, (int, float))
    }


def _step_record(rollout, scores, rewards, advantages, entropy_weight, update_metrics, fields) -> dict[str, float]:
    """The numbers logged each step; every metric's definition lives here or in the function that returns it."""
    valid = rewards[~rewards.isnan()]
    lengths = rollout.completion_lengths.float()  # (N,)
    record: dict[str, float] = {
        "reward_mean": valid.mean().item() if valid.numel() else float("nan"),
        "reward_std": valid.std().item() if valid.numel() > 1 else 0.0,
        "reward_nan": float(scores.nan_count),
        "advantage_mean": advantages.mean().item(),
        "advantage_std": advantages.std().item() if advantages.numel() > 1 else 0.0,
        "advantage_min": advantages.min().item(),
        "advantage_max": advantages.max().item(),
        "entropy_weight": float(entropy_weight),
        "completion_tokens": lengths.mean().item(),
        "completion_chars": sum(len(c.strip()) for c in rollout.completions) / len(rollout.completions),
        "truncated": rollout.truncated.float().mean().item(),
        **task_rates(rollout.completions, fields),
        **update_metrics,
    }
    if len(scores.per_function) > 1:
        for name, values in scores.per_function.items():
            finite = [v for v in values if not math.isnan(v)]
            record[f"reward/{name}"] = sum(finite) / len(finite) if finite else float("nan")
    return record


def run_train(config: GRPOConfig) -> int:
    """``policygrad train``: train, then say where the run is. Returns the exit code (see :data:`EXIT_DIVERGED`)."""
    try:
        run_dir = train(config)
    except Stopped as stopped:
        print(f"policygrad train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    after = {k: v for k, v in json.loads((run_dir / "eval.json").read_text()).items() if isinstance(v, dict)}
    if after:
        _print_before_after(_step0_evaluation(run_dir), after, config.eval_size)
    print(f"saved {run_dir} (final model in {run_dir / 'final'})")
    return 0


SUMMARY_ROWS = {
    "pass_rate": "pass rate (both rules)",
    "length_rate": "length rule",
    "digits_rate": "digit-sum rule",
    "mean_reward": "mean reward",
    "mean_length": "mean length (characters)",
    "truncated_rate": "cut off at max_new_tokens",
}
"""The held-out numbers ``policygrad train`` prints at the end, before and after training."""


def _step0_evaluation(run_dir: Path) -> dict[str, dict[str, float]]:
    """The step-0 evaluation in metrics.jsonl as ``{decoding: {metric: value}}`` (empty if there was none)."""
    before: dict[str, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") != 0:
            continue
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval":
                before.setdefault(parts[1], {})[parts[2]] = value
    return before


def _print_before_after(before: dict, after: dict, prompts: int) -> None:
    from rich.console import Console
    from rich.table import Table

    for decoding, values in after.items():
        table = Table(title=f"held-out prompts ({prompts}, {decoding} decoding)", title_justify="left")
        table.add_column("")
        if decoding in before:
            table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for key, label in SUMMARY_ROWS.items():
            if key not in values:
                continue
            cells = [before[decoding].get(key)] if decoding in before else []
            table.add_row(label, *[f"{v:.3g}" if isinstance(v, float) else str(v) for v in [*cells, values[key]]])
        Console().print(table)
