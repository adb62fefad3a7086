"""Evaluation on held-out prompts: pass rates of the ``length_digits`` rules, mean reward, example completions.

Used every ``eval_every`` steps by the trainer and by ``policygrad eval`` (:func:`run_eval`). One completion per
prompt, greedy (argmax, the model's "best answer") and/or sampled (what training sees).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from policygrad.lm import tasks

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from policygrad.lm.config import GRPOConfig
    from policygrad.lm.rewards import RewardSet

__all__ = ["evaluate", "group_fields", "run_eval", "task_rates"]

EXAMPLES = 3
"""Completions kept per decoding in the result, for a human to read."""


def group_fields(records: Sequence[Mapping[str, Any]], group_size: int) -> dict[str, list[Any]]:
    """The records' fields other than ``"prompt"``, one list per field, each value repeated ``group_size`` times
    (the row layout of a :class:`~policygrad.lm.rollout.Rollout`). A field missing from a record is None there.

    >>> group_fields([{"prompt": "a", "x": 1}, {"prompt": "b", "x": 2}], 2)
    {'x': [1, 1, 2, 2]}
    """
    names = sorted({key for record in records for key in record if key != "prompt"})
    return {name: [record.get(name) for record in records for _ in range(group_size)] for name in names}


def task_rates(completions: Sequence[str], fields: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """Fractions of completions that pass both ``length_digits`` rules, the length rule and the digits rule.

    Empty when the prompts are not ``length_digits`` prompts (no ``target_length``/``target_digit_sum`` fields).

    >>> task_rates(["55", "5x"], {"target_length": [2, 2], "target_digit_sum": [10, 10]})
    {'pass_rate': 0.5, 'length_rate': 1.0, 'digits_rate': 0.5}
    """
    lengths, sums = fields.get("target_length"), fields.get("target_digit_sum")
    if not completions or lengths is None or sums is None or None in lengths or None in sums:
        return {}
    tolerances = fields.get("tolerance") or [0] * len(completions)
    checks = [tasks.check(c, int(n), int(s), int(t or 0)) for c, n, s, t in zip(completions, lengths, sums, tolerances)]
    n = len(checks)
    return {
        "pass_rate": sum(c.passed for c in checks) / n,
        "length_rate": sum(c.length_ok for c in checks) / n,
        "digits_rate": sum(c.digits_ok for c in checks) / n,
    }


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    reward_set: RewardSet,
    decodings: Sequence[str] = ("greedy",),
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    on_fault: str = "error",
    timeout: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Generate one completion per record for each decoding and score it. ``on_fault`` and ``timeout`` go to
    :meth:`~policygrad.lm.rewards.RewardSet.score` (the trainer passes its ``reward_fault`` and ``reward_timeout``,
    so a run that skips reward faults in training skips them in evaluation too: NaN, counted in ``nan_rewards``).

    Returns:
        ``{decoding: {"pass_rate", "length_rate", "digits_rate" (length_digits prompts only), "mean_reward",
        "nan_rewards", "mean_length" (characters), "truncated_rate" (the fraction cut off at ``max_new_tokens``
        instead of ended by the model), "examples": [{"prompt", "completion", "reward"}, ...]}}``
    """
    import torch

    from policygrad.lm.rollout import sample

    results: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    for decoding in decodings:
        torch.manual_seed(seed)  # the same sampled evaluation for the same weights
        completions: list[str] = []
        truncated = 0  # completions cut off by max_new_tokens rather than ended by the model
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            rollout = sample(
                model,
                tokenizer,
                [r["prompt"] for r in chunk],
                group_size=1,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                greedy=decoding == "greedy",
                autocast_dtype=autocast_dtype,
                score_tokens=False,
            )
            completions.extend(rollout.completions)
            truncated += int(rollout.truncated.sum())
        prompts = [r["prompt"] for r in records]
        fields = group_fields(records, 1)
        scores = reward_set.score(prompts, completions, fields, on_fault, timeout) if records else None
        valid = [r for r in (scores.rewards if scores else []) if not math.isnan(r)]
        results[decoding] = {
            **task_rates(completions, fields),
            "mean_reward": sum(valid) / len(valid) if valid else float("nan"),
            "nan_rewards": scores.nan_count if scores else 0,
            "mean_length": sum(len(c.strip()) for c in completions) / max(len(completions), 1),
            "truncated_rate": truncated / max(len(completions), 1),
            "examples": [
                {"prompt": p, "completion": c, "reward": r}
                for p, c, r in list(zip(prompts, completions, scores.rewards if scores else []))[:EXAMPLES]
            ],
        }
    model.train(was_training)
    return results


def evaluate_heldout(config: GRPOConfig) -> dict[str, Any] | None:
    """Evaluate ``config.model`` (a checkpoint folder, say) on the first ``eval_size`` held-out prompts of
    ``config.prompts``, with the config's rewards, decodings and sampling settings: ``{"model", "prompts",
    decoding: rates}`` (see :func:`evaluate`), or None when the source holds out no prompts."""
    from policygrad.lm.data import check_prompt_source, load_prompts
    from policygrad.lm.models import load_model
    from policygrad.lm.rewards import load_rewards
    from policygrad.lm.trainer import resolve_device

    device, autocast_dtype = resolve_device(config)
    reward_set = load_rewards(config.rewards)
    check_prompt_source(config.prompts)  # a bad prompts file is reported before a model is loaded
    model, tokenizer = load_model(config.model, dtype="float32", device=device)
    prompts = load_prompts(
        config.prompts,
        tokenizer,
        config.heldout_prompts,
        config.max_passage_tokens,
        config.target_length,
        (config.digit_sum_min, config.digit_sum_max),
        config.length_tolerance,
    )
    records = prompts.heldout[: config.eval_size]
    if not records:
        return None
    results = evaluate(
        model,
        tokenizer,
        records,
        reward_set,
        config.eval_decoding,
        config.max_new_tokens,
        config.temperature,
        config.top_p,
        config.micro_batch_size,
        autocast_dtype,
        config.seed,
    )
    return {"model": config.model, "prompts": len(records), **results}


def run_eval(config: GRPOConfig) -> int:
    """``policygrad eval``: :func:`evaluate_heldout` printed as JSON on stdout. Returns the exit code."""
    results = evaluate_heldout(config)
    if results is None:
        print("policygrad eval: no held-out prompts to evaluate (raise --heldout-prompts)", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0
