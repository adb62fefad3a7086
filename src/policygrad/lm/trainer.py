"""The GRPO trainer of ``policygrad train``, in Spinning Up's order: sample, score, advantages, update, log.

For each step: take B prompts, sample G completions of each (N = B * G rows, see :mod:`policygrad.lm.rollout` for
the letters), score them with the reward functions, turn the N rewards into N advantages (GRPO, RLOO or a REINFORCE
moving-average baseline), and take ``updates_per_batch`` AdamW steps on

    loss = policy_loss(logprobs, advantages)  -  w_H * entropy  +  beta * KL(pi || pi_ref)

each aggregated over the completion tokens. With one update per batch the policy term is REINFORCE's; with several
it is the clipped importance-ratio surrogate against the sampling policy's log-probs (Schulman et al. 2017; the
GRPO objective of Shao et al. 2024, eq. 3, is this with group advantages and the k3 KL).

``train(config)`` returns the run directory; ``run_train(config)`` is the CLI entry point (exit code).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from policygrad.advantages import group_advantages, leave_one_out, moving_average
from policygrad.errors import UsageError
from policygrad.losses import aggregate, policy_loss
from policygrad.lm.config import CONFIG_FILE, GRPOConfig, config_to_dict
from policygrad.lm.evaluate import evaluate, group_fields, task_rates
from policygrad.lm.rollout import Rollout, autocast_context, sample, sequence_logprobs
from policygrad.regularizers import dynamic_entropy_weight, kl

__all__ = [
    "ADVANTAGES",
    "ENTROPY_WEIGHTS",
    "grpo_loss",
    "micro_batch_share",
    "prepare_run_dir",
    "resolve_device",
    "run_train",
    "train",
    "update",
]

TRAINER_STATE = "trainer_state.pt"
"""Saved beside each checkpoint's weights: optimiser state, step and baseline, for ``--resume``."""


# --------------------------------------------------------------------------------------------------------------
# Variants, chosen by name
# --------------------------------------------------------------------------------------------------------------


def _grpo(rewards: Tensor, config: GRPOConfig, baseline: float) -> tuple[Tensor, float]:
    return group_advantages(rewards, config.group_size, config.scale_rewards, config.advantage_eps), baseline


def _rloo(rewards: Tensor, config: GRPOConfig, baseline: float) -> tuple[Tensor, float]:
    return leave_one_out(rewards, config.group_size), baseline


def _reinforce(rewards: Tensor, config: GRPOConfig, baseline: float) -> tuple[Tensor, float]:
    # the baseline from PAST batches only (it starts at 0), so the estimate stays unbiased (Williams 1992)
    advantages = (rewards - baseline).nan_to_num(0.0)  # an unscored completion carries no signal
    if rewards.isnan().all():
        return advantages, baseline
    updated = moving_average(torch.tensor(baseline, dtype=rewards.dtype), rewards, config.baseline_decay)
    return advantages, float(updated)


ADVANTAGES: dict[str, Callable[[Tensor, GRPOConfig, float], tuple[Tensor, float]]] = {
    "grpo": _grpo,
    "rloo": _rloo,
    "reinforce": _reinforce,
}
"""``(rewards (N,), config, baseline) -> (advantages (N,), new baseline)``; only reinforce uses the baseline."""


def _constant_entropy_weight(rewards: Tensor, config: GRPOConfig) -> float:
    return config.entropy_coef


def _dynamic_entropy_weight(rewards: Tensor, config: GRPOConfig) -> float:
    return float(
        dynamic_entropy_weight(
            rewards, config.entropy_coef, config.entropy_min_weight, config.entropy_max_weight, config.entropy_eps
        )
    )


ENTROPY_WEIGHTS: dict[str, Callable[[Tensor, GRPOConfig], float]] = {
    "constant": _constant_entropy_weight,
    "dynamic": _dynamic_entropy_weight,
}
"""``(rewards (N,), config) -> w_H``, the weight of the entropy bonus for this batch."""


# --------------------------------------------------------------------------------------------------------------
# The loss and the update
# --------------------------------------------------------------------------------------------------------------


def grpo_loss(
    logprobs: Tensor,
    entropies: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    entropy_weight: float = 0.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "token_mean",
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The per-batch objective, to minimise:

        loss = L_pg  -  w_H * agg(H)  +  beta * agg(KL_est(logprobs, ref_logprobs))

    ``L_pg`` is :func:`policygrad.losses.policy_loss` (REINFORCE without ``old_logprobs``, the clipped surrogate
    with them), ``agg`` the same token/sequence aggregation, ``KL_est`` one of the per-token estimators of
    :func:`policygrad.regularizers.kl`. Pure: tensors in, ``(loss, metrics)`` out.

    Args:
        logprobs:     (N, T) log pi_theta of the completion tokens; carries the gradient.
        entropies:    (N, T) entropy of pi_theta at each completion position (with grad if w_H > 0).
        mask:         (N, T) completion mask.
        advantages:   (N,) one per completion.
        old_logprobs: (N, T) sampling-policy log-probs, or None for REINFORCE.
        ref_logprobs: (N, T) reference-model log-probs, or None for no KL term.
    Returns:
        (loss, metrics) with metrics ``pg_loss``, ``entropy``, ``kl`` (when a reference is given) and the
        clip/ratio metrics of policy_loss.
    """
    pg_loss, metrics = policy_loss(
        logprobs, advantages, mask, old_logprobs, clip_eps_low, clip_eps_high, aggregation, max_len
    )
    mean_entropy = aggregate(entropies, mask, aggregation, max_len)
    loss = pg_loss - entropy_weight * mean_entropy if entropy_weight else pg_loss
    metrics = {**metrics, "pg_loss": pg_loss.item(), "entropy": mean_entropy.item()}
    if ref_logprobs is not None:
        mean_kl = aggregate(kl(logprobs, ref_logprobs, kl_estimator), mask, aggregation, max_len)
        loss = loss + kl_coef * mean_kl
        metrics["kl"] = mean_kl.item()
    return loss, metrics


def micro_batch_share(rows_mask: Tensor, batch_mask: Tensor, aggregation: str) -> float:
    """The weight of one micro-batch's aggregated loss so that the weighted sum equals the full batch's loss.

        token_mean:     tokens(micro) / tokens(batch)
        sequence_mean:  non-empty rows(micro) / non-empty rows(batch)
        constant:       rows(micro) / rows(batch)

    Averaging micro-batch losses with equal weights would make a token's weight depend on which micro-batch it
    landed in; with these weights gradient accumulation gives exactly the full-batch gradient.
    """
    if aggregation == "token_mean":
        return rows_mask.sum().item() / max(batch_mask.sum().item(), 1)
    if aggregation == "sequence_mean":
        return (rows_mask.sum(-1) > 0).sum().item() / max((batch_mask.sum(-1) > 0).sum().item(), 1)
    return rows_mask.shape[0] / batch_mask.shape[0]


def _micro_batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, start + size)


def update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages: Tensor,
    ref_logprobs: Tensor | None,
    entropy_weight: float,
    config: GRPOConfig,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """``config.updates_per_batch`` optimiser steps on one rollout, each accumulating gradients over micro-batches.

    Returns the metrics of the LAST optimiser step (weighted over its micro-batches), plus ``grad_norm`` (before
    clipping) and ``loss``.
    """
    device = rollout.completion_ids.device
    mask = rollout.completion_mask  # (N, T)
    n = mask.shape[0]
    advantages = advantages.to(device=device, dtype=torch.float32)  # (N,)
    clipped = config.updates_per_batch > 1  # one step on fresh samples: ratio is 1, REINFORCE is the same gradient
    if clipped and rollout.logprobs is None:
        raise ValueError("several updates per batch need the sampling log-probs: sample(..., score_tokens=True)")
    metrics: dict[str, float] = {}
    for _ in range(config.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        metrics = {}
        for rows in _micro_batches(n, config.micro_batch_size):
            share = micro_batch_share(mask[rows], mask, config.aggregation)
            if share == 0:
                continue  # no tokens that count (all-empty completions): nothing to learn from these rows
            batch = rollout.rows(rows)
            with autocast_context(device, autocast_dtype):
                logprobs, entropies = sequence_logprobs(
                    model, batch["input_ids"], batch["attention_mask"], rollout.completion_start, config.temperature
                )  # (M, T) each, M rows in this micro-batch
            loss, micro = grpo_loss(
                logprobs, entropies, batch["mask"], advantages[rows],
                old_logprobs=batch["old_logprobs"] if clipped else None,
                ref_logprobs=ref_logprobs[rows] if ref_logprobs is not None else None,
                entropy_weight=entropy_weight, kl_coef=config.kl_coef, kl_estimator=config.kl_estimator,
                aggregation=config.aggregation, clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high,
                max_len=config.max_new_tokens,
            )  # fmt: skip
            (loss * share).backward()
            micro["loss"] = loss.item()
            for key, value in micro.items():
                metrics[key] = metrics.get(key, 0.0) + share * value
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        optimizer.step()
    return metrics


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
    # auto: bf16 autocast where the hardware runs it fast; CPUs without AMX gain little and lose precision
    return device, torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


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
    (out / CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return out


def prompt_order(num_prompts: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """The prompt indices of each step of one epoch: a seeded shuffle cut into batches, the incomplete last one
    dropped. A function of (seed, epoch) alone, so a resumed run sees the same prompts it would have seen."""
    generator = torch.Generator().manual_seed(seed * 1009 + epoch)
    order = torch.randperm(num_prompts, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_prompts - batch_size + 1, batch_size)]


def save_checkpoint(
    folder: Path, model, tokenizer, optimizer, step: int, baseline: float, with_optimizer: bool = True
) -> None:
    """``save_pretrained`` weights and tokenizer (what ``AutoModelForCausalLM.from_pretrained`` loads), plus the
    trainer state for resuming (the optimiser's moments are twice the weights' size, hence ``with_optimizer``)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    state = {"step": step, "baseline": baseline}
    if with_optimizer:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, folder / TRAINER_STATE)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The saved folder with the highest step (periodic ones and ``final``), or None."""
    best, best_step = None, -1
    for state in run_dir.glob(f"**/{TRAINER_STATE}"):
        step = torch.load(state, weights_only=True, map_location="cpu", mmap=True)["step"]
        if step > best_step:
            best, best_step = state.parent, step
    return best


class RunLog:
    """The per-step record: ``metrics.jsonl``, TensorBoard scalars and ``completions.jsonl``."""

    def __init__(self, run_dir: Path, append: bool):
        mode = "a" if append else "w"
        self.metrics = (run_dir / "metrics.jsonl").open(mode)
        self.completions = (run_dir / "completions.jsonl").open(mode)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
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

    def close(self) -> None:
        self.metrics.close()
        self.completions.close()
        if self.writer is not None:
            self.writer.close()


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
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
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
    resumed: bool = False

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
            self.model, self.tokenizer, records, self.reward_set, config.eval_decoding, config.max_new_tokens,
            config.temperature, config.top_p, config.micro_batch_size, self.autocast_dtype, config.seed,
        )  # fmt: skip

    def save(self, folder: Path, step: int) -> None:
        save_checkpoint(
            folder, self.model, self.tokenizer, self.optimizer, step, self.baseline, self.config.save_optimizer
        )


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
    torch.manual_seed(config.seed)
    reward_set = load_rewards(config.rewards)  # before the model: a typo here should not cost a model load
    check_prompt_source(config.prompts)  # likewise a missing or malformed prompts file

    resume_from = latest_checkpoint(run_dir) if config.resume else None
    model, tokenizer = load_model(str(resume_from or config.model), dtype="float32", device=device)
    # dropout off throughout: the ratio pi/pi_old and the KL must compare the same deterministic function
    model.eval()
    prompts = load_prompts(
        config.prompts, tokenizer, config.heldout_prompts, config.max_passage_tokens, config.target_length,
        (config.digit_sum_min, config.digit_sum_max), config.length_tolerance,
    )  # fmt: skip
    steps_per_epoch = len(prompts.train) // config.prompts_per_step
    if steps_per_epoch == 0:
        raise UsageError(
            "--prompts-per-step", f"{config.prompts_per_step} is more than the {len(prompts.train)} training prompts"
        )
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    prepare_run_dir(config)

    reference = None
    if config.kl_coef > 0:
        # the reference is the run's INITIAL model, also when resuming from a later checkpoint
        reference = load_model(config.model, dtype="float32", device=device)[0] if resume_from else copy.deepcopy(model)
        reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    session = _Session(
        config, run_dir, model, tokenizer, reference, optimizer, prompts, reward_set, autocast_dtype,
        steps_per_epoch, total_steps, resumed=resume_from is not None,
    )  # fmt: skip
    if resume_from is not None:
        state = torch.load(resume_from / TRAINER_STATE, weights_only=True, map_location=device)
        if "optimizer" in state:  # else saved with save_optimizer=false: AdamW restarts its moments
            optimizer.load_state_dict(state["optimizer"])
        session.start_step, session.baseline = int(state["step"]), float(state["baseline"])
    return session


def train(config: GRPOConfig) -> Path:
    """Train ``config.model`` on ``config.prompts`` and return the run directory (see the module docstring)."""
    run = _start(config)
    log = RunLog(run.run_dir, append=run.resumed)
    try:
        with _Progress(config.progress, run.total_steps, run.start_step) as progress:
            for step in range(run.start_step, run.total_steps):
                started = time.perf_counter()
                records = run.batch(step)

                # 1. sample G completions of each of B prompts with the current policy
                torch.manual_seed(config.seed * 1_000_003 + step)  # repeatable, and the same after a resume
                rollout = sample(
                    run.model, run.tokenizer, [r["prompt"] for r in records], config.group_size,
                    config.max_new_tokens, config.temperature, config.top_p, micro_batch_size=config.micro_batch_size,
                    autocast_dtype=run.autocast_dtype, score_tokens=config.updates_per_batch > 1,
                )  # fmt: skip
                sampled = time.perf_counter()

                # 2. score every completion
                fields = group_fields(records, config.group_size)
                scores = run.reward_set.score(rollout.prompts, rollout.completions, fields)
                rewards = torch.tensor(scores.rewards, dtype=torch.float32)  # (N,)
                ref_logprobs = _reference_logprobs(run.reference, rollout, config, run.autocast_dtype)  # (N, T)|None

                # 3. advantages, and this batch's entropy weight
                advantages, next_baseline = ADVANTAGES[config.advantage](rewards, config, run.baseline)  # (N,)
                entropy_weight = ENTROPY_WEIGHTS[config.entropy_weight](rewards, config)

                # 4. update the policy
                update_metrics = update(
                    run.model, run.optimizer, rollout, advantages, ref_logprobs, entropy_weight, config,
                    run.autocast_dtype,
                )  # fmt: skip
                run.baseline = next_baseline

                # 5. log, and now and then evaluate and save
                done, elapsed = step + 1, time.perf_counter() - started
                record = _step_record(rollout, scores, rewards, advantages, entropy_weight, update_metrics, fields)
                record.update(
                    baseline=run.baseline, lr=run.optimizer.param_groups[0]["lr"], epoch=step // run.steps_per_epoch,
                    sample_time=sampled - started, step_time=elapsed,
                    tokens_per_s=float(rollout.completion_lengths.sum()) / elapsed,
                )  # fmt: skip
                if config.eval_every and done % config.eval_every == 0 and done < run.total_steps:
                    record.update(_flat_scalars(run.evaluate()))
                log.write(done, record, _samples(rollout, scores.rewards, config.log_completions))
                progress.advance(f"reward {record['reward_mean']:.3f}")
                if config.save_every and done % config.save_every == 0 and done < run.total_steps:
                    run.save(run.run_dir / "checkpoints" / f"step-{done:06d}", done)

        final = run.evaluate()
        (run.run_dir / "eval.json").write_text(json.dumps({"step": run.total_steps, **final}, indent=2) + "\n")
        if final:
            log.write(run.total_steps, _flat_scalars(final), [])
        run.save(run.run_dir / "final", run.total_steps)
    finally:
        log.close()
    return run.run_dir


def _samples(rollout: Rollout, rewards: list[float], count: int) -> list[dict[str, Any]]:
    """The first ``count`` (prompt, completion, reward) of a batch, for completions.jsonl."""
    rows = zip(rollout.prompts, rollout.completions, rewards)
    return [{"prompt": p, "completion": c, "reward": r} for p, c, r in list(rows)[:count]]


@torch.no_grad()
def _reference_logprobs(
    reference: torch.nn.Module | None, rollout: Rollout, config: GRPOConfig, autocast_dtype: torch.dtype | None
) -> Tensor | None:
    """Log-probs of the sampled tokens under the frozen reference model: (N, T), or None without a KL term."""
    if reference is None:
        return None
    chunks = []
    with autocast_context(rollout.completion_ids.device, autocast_dtype):
        for rows in _micro_batches(rollout.completion_ids.shape[0], config.micro_batch_size):
            batch = rollout.rows(rows)
            logprobs, _ = sequence_logprobs(
                reference, batch["input_ids"], batch["attention_mask"], rollout.completion_start, config.temperature
            )
            chunks.append(logprobs)
    return torch.cat(chunks)


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
    """``policygrad train``: train, then say where the run is. Returns the exit code."""
    run_dir = train(config)
    summary = json.loads((run_dir / "eval.json").read_text())
    rates = {k: v.get("pass_rate") for k, v in summary.items() if isinstance(v, dict)}
    print(f"saved {run_dir} (final model in {run_dir / 'final'}); held-out pass rate {rates}")
    return 0
