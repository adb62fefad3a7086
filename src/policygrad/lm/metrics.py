"""Step 5 of the loop, what a step logs: every metric's definition lives here or in the function that returns it
(the update's metrics in :mod:`policygrad.lm.update`, the task's rates in its :class:`~policygrad.lm.task.Task`)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from policygrad.lm.rollout import Rollout
from policygrad.lm.task import Task

__all__ = ["curriculum_record", "flat_scalars", "samples", "step_record", "zero_spread_fraction", "zero_spread_groups"]


def step_record(
    task: Task,
    rollout: Rollout,
    scored: Any,
    advantages: Tensor,
    entropy_weight: float,
    update_metrics: dict[str, float],
    group_size: int,
) -> dict[str, float]:
    """The numbers logged each step about the batch, its rewards (and the task's rates), advantages and update."""
    rewards, scores = scored.rewards, scored.scores
    valid = rewards[~rewards.isnan()]
    lengths = rollout.completion_lengths.float()  # (N,)
    record: dict[str, float] = {
        "reward_mean": valid.mean().item() if valid.numel() else float("nan"),
        "reward_std": valid.std().item() if valid.numel() > 1 else 0.0,
        "reward_nan": float(scores.nan_count),
        "reward_faults": float(scores.faulted_samples),
        "zero_spread_groups": zero_spread_fraction(rewards, group_size),
        "advantage_mean": advantages.mean().item(),
        "advantage_std": advantages.std().item() if advantages.numel() > 1 else 0.0,
        "advantage_min": advantages.min().item(),
        "advantage_max": advantages.max().item(),
        "entropy_weight": float(entropy_weight),
        "completion_tokens": lengths.mean().item(),
        "completion_chars": sum(len(c.strip()) for c in rollout.completions) / len(rollout.completions),
        "truncated": rollout.truncated.float().mean().item(),
        **task.rates(rollout.completions, scored.task_fields),
        "skipped_updates": 0.0,  # 1 when a non-finite loss or gradient skipped the update (update_metrics say so)
        **update_metrics,
    }
    if len(scores.per_function) > 1:
        for name, values in scores.per_function.items():
            finite = [v for v in values if not math.isnan(v)]
            record[f"reward/{name}"] = sum(finite) / len(finite) if finite else float("nan")
    return record


def zero_spread_fraction(rewards: Tensor, group_size: int) -> float:
    """The fraction of groups (consecutive blocks of ``group_size`` rewards) whose valid rewards are all equal, or
    that have fewer than two valid rewards: such a group carries no preference, so GRPO and RLOO give all its
    completions advantage exactly 0 and it teaches nothing (TRL logs the same as ``frac_reward_zero_std``).

    >>> import torch
    >>> zero_spread_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, float("nan")]), group_size=2)
    0.6666666666666666
    """
    flat = zero_spread_groups(rewards, group_size)  # (B,)
    return int(flat.sum()) / flat.numel()


def zero_spread_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) bool: which groups of ``rewards`` (N,) have no spread (see :func:`zero_spread_fraction`).

    >>> import torch
    >>> zero_spread_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, float("nan")]), group_size=2).tolist()
    [True, False, True]
    """
    grouped = rewards.detach().reshape(-1, group_size)  # (B, G)
    valid = ~grouped.isnan()
    high = grouped.nan_to_num(float("-inf")).amax(-1)
    low = grouped.nan_to_num(float("inf")).amin(-1)
    return (valid.sum(-1) < 2) | (high == low)


def curriculum_record(task: Task, curriculum: Any, rollout: Rollout, scored: Any) -> dict[str, float]:
    """The curriculum's stage and the pass rate under it (which the curriculum then observes); {} without one."""
    if curriculum is None:
        return {}
    staged = task.rates(rollout.completions, scored.fields)["pass_rate"]
    record = {"curriculum/tolerance": float(curriculum.tolerance), "curriculum/pass_rate": staged}
    curriculum.observe(staged)
    return record


def flat_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{decoding: {metric: value}}`` -> ``{"eval/<decoding>/<metric>": value}`` for the numbers only (no examples),
    and the rates of each part of the prompts as ``"eval/<decoding>/<part>/<metric>"`` (``eval/greedy/S=5/pass_rate``).

    >>> flat_scalars({"greedy": {"pass_rate": 0.5, "examples": [], "by_part": {"S=5": {"prompts": 2, "pass_rate": 1.0}}}})
    {'eval/greedy/pass_rate': 0.5, 'eval/greedy/S=5/prompts': 2, 'eval/greedy/S=5/pass_rate': 1.0}
    """
    flat: dict[str, float] = {}
    for decoding, values in results.items():
        for key, value in values.items():
            if isinstance(value, (int, float)):
                flat[f"eval/{decoding}/{key}"] = value
        for part, rates in values.get("by_part", {}).items():
            flat.update({f"eval/{decoding}/{part}/{key}": value for key, value in rates.items()})
    return flat


def samples(rollout: Rollout, rewards: list[float], count: int) -> list[dict[str, Any]]:
    """The first ``count`` (prompt, completion, reward) of a batch, for completions.jsonl."""
    rows = zip(rollout.prompts, rollout.completions, rewards)
    return [{"prompt": p, "completion": c, "reward": r} for p, c, r in list(rows)[:count]]
