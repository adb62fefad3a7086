"""Step 2 of the loop, scoring a rollout: the reward functions on every completion, their faults handled by the run's
policy, the reward of a cut-off reply, and the log-probs of the frozen reference for the KL term.

A reward function's fault under ``reward_fault: error`` saves the state from before the step and stops the run with
the command that resumes it (under torchrun every rank stops at the same step with the first faulting rank's message:
the ranks agree, or those without a fault would wait for the others forever); under ``skip`` the samples concerned score NaN (advantage 0), one line each goes to
``faults.jsonl`` and one warning per step to stderr (docs/reliability.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from policygrad.guard import StepGuard
from policygrad.lm import fsdp
from policygrad.lm.evaluate import group_fields
from policygrad.lm.rewards import RewardError
from policygrad.lm.rollout import Rollout, rollout_logprobs
from policygrad.runlog import RunLog

__all__ = ["Scored", "importance_correction", "reference_logprobs", "score"]


@dataclass
class Scored:
    """A rollout's rewards: ``rewards`` (N,) float32 (NaN where a fault was skipped), the reward set's ``scores``
    (per function, faults), the task's per-row fields and those the rewards saw (with a curriculum's tolerance)."""

    rewards: Tensor
    scores: Any  # policygrad.lm.rewards.Scores
    task_fields: dict[str, list[Any]]
    fields: dict[str, list[Any]]


def score(
    run: Any, guard: StepGuard, log: RunLog, rollout: Rollout | None, records: list[dict[str, Any]], step: int
) -> Scored | None:
    """Score the N completions of ``rollout`` (``records`` are its B prompt records; ``step`` the steps done before).
    Under torchrun a rank with nothing to score this time (``rollout`` None: a round of dynamic sampling that drew
    fewer fresh prompts than there are ranks) still takes part in the ranks' agreement on faults, and gets None."""
    config = run.config
    task_fields = fields = group_fields(records, config.group_size)
    if run.curriculum is not None and rollout is not None:  # the rewards see this stage's tolerance
        fields = {**task_fields, "tolerance": [run.curriculum.tolerance] * len(rollout.completions)}
    fault, original, scores = None, None, None
    try:
        if rollout is not None:
            scores = run.reward_set.score(
                rollout.prompts,
                rollout.completions,
                fields,
                on_fault=config.reward_fault,
                timeout=config.reward_timeout or None,
                allow_nan=False,
            )
    except RewardError as err:  # policy "error": keep everything up to this step, then say how to go on
        fault, original = (err.field, str(err)[len(err.field) + 2 :]), err
    fault = run.world.first(fault)  # any rank's fault stops every rank (the first rank's message)
    if fault is not None:
        folder = guard.save_before()
        saved = f"saved the run at step {step} in {folder}" if folder else "nothing trained yet, so nothing saved"
        field, message = fault
        raise RewardError(
            field,
            f"{message}; {saved}; fix the function (or pass --reward-fault skip) and resume with: {run.resume_hint}",
        ) from original
    first_row = run.world.shard(config.prompts_per_step).start * config.group_size  # of this rank's rows
    _log_faults(log, step + 1, scores, rollout, run.world, first_row)
    if rollout is None:
        return None
    rewards = torch.tensor(scores.rewards, dtype=torch.float32)  # (N,)
    if config.truncated_reward is not None:  # a reply must end itself, not be cut off by the budget
        rewards[rollout.truncated.cpu() & ~rewards.isnan()] = config.truncated_reward
    return Scored(rewards, scores, task_fields, fields)


def _log_faults(log: RunLog, step: int, scores: Any, rollout: Rollout | None, world: Any, first_row: int = 0) -> None:
    """Reward faults skipped under ``reward_fault: skip``: one line each in faults.jsonl, one warning per step.
    Under torchrun rank 0 writes every rank's lines, ``sample`` counted over the whole batch (from ``first_row``)."""
    rows = []
    for fault in scores.faults if scores is not None else ():
        row = 0 if fault.sample is None else fault.sample
        rows.append(
            {
                "function": fault.function,
                "kind": fault.kind,
                "sample": None if fault.sample is None else first_row + fault.sample,
                "prompt": rollout.prompts[row],
                "completion": rollout.completions[row],
                "message": fault.message,
            }
        )
    log.rows("faults", step, [row for part in world.gather(rows) for row in part])
    if scores is not None and scores.faults:
        more = f" (and {len(scores.faults) - 1} more)" if len(scores.faults) > 1 else ""
        print(
            f"policygrad train: step {step}: {scores.faulted_samples} samples get advantage 0 after a reward fault: "
            f"{scores.faults[0].line()}{more}; see faults.jsonl",
            file=sys.stderr,
            flush=True,
        )


def reference_logprobs(run: Any, rollout: Rollout) -> Tensor | None:
    """Log-probs of the sampled tokens under the frozen reference model: (N, T), or None without a KL term."""
    if run.reference is None:
        return None
    config = run.config
    sharded = fsdp.is_sharded(run.model)  # the reference too: a sharded copy, or (LoRA) the policy, adapters off
    width = rollout.completion_ids.shape[1]
    if sharded:  # every rank runs the same passes (their all-gathers are collectives): see fsdp.same_width
        rollout = rollout.widened(run.world.maximum(width))
    logprobs = rollout_logprobs(
        run.reference, rollout, config.temperature, config.micro_batch_size, run.autocast_dtype, embed_once=not sharded
    )
    return logprobs[:, :width]


def importance_correction(run: Any, rollout: Rollout) -> tuple[Tensor | None, dict[str, float]]:
    """With ``tis_cap`` C > 0: the truncated importance weights min(pi_old / pi_sampler, C) of the sampled tokens
    (:func:`policygrad.losses.truncated_importance_weights`; pi_old from the trainer's log-prob pass, pi_sampler
    what the decoding loop drew each token with), and their metrics over the whole batch (every rank's tokens).
    Without: None and no metrics."""
    config = run.config
    if config.tis_cap <= 0:
        return None, {}
    from policygrad.losses import truncated_importance_weights

    mask = rollout.completion_mask
    weights, local = truncated_importance_weights(rollout.logprobs, rollout.sampler_logprobs, config.tis_cap, mask)
    tokens = float(mask.sum())
    total = run.world.sum(tokens)
    return weights, {
        f"tis/{key[len('tis_') :]}": run.world.sum(value * tokens) / max(total, 1.0) for key, value in local.items()
    }
