"""Steps 1-2 of the loop with dynamic sampling: sample and score a batch, then replace the groups that teach nothing.

A group whose G rewards are all equal has GRPO/RLOO advantage exactly 0 for every completion: it costs a rollout and
moves nothing. Once the policy's entropy collapses most groups are like that (docs/results-2026-11-24.md) and learning stalls.
DAPO's dynamic sampling (Yu et al. 2025, "DAPO", sec. 3.2; verl's ``algorithm.filter_groups``, OpenRLHF's
``dynamic_filtering``) keeps only groups with reward spread and samples fresh prompts until the batch is full. Here
the fresh draws are bounded, ``max_extra_groups`` per step, so a step costs at most that many extra groups:

    kept  = groups of the first draw with spread            (B prompts x G completions)
    while |kept| < B and extra < max_extra_groups:
        k     = min(B - |kept|, max_extra_groups - extra)
        draw k fresh prompts (a function of (seed, step)), sample and score G completions of each
        kept += those with spread;  extra += k
    batch = kept, then groups without spread (first draw first) until there are B again

so the update always sees B groups, and with the budget spent it is the ordinary batch with some flat groups
swapped for informative ones. The step's metrics count the extra groups (``dynamic/extra_groups``) and the spread of
the first draw (``dynamic/first_zero_spread``, comparable with a run without dynamic sampling); ``zero_spread_groups``
is that of the batch trained on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from policygrad.guard import StepGuard
from policygrad.lm.metrics import zero_spread_groups
from policygrad.lm.rewards import Scores
from policygrad.lm.rollout import Rollout, join_groups, pad_token_id, sample
from policygrad.lm.scoring import Scored, score
from policygrad.rng import step_seed
from policygrad.runlog import RunLog

__all__ = ["fresh_prompts", "join_scored", "sample_and_score"]


def sample_and_score(
    run: Any, guard: StepGuard, log: RunLog, records: list[dict[str, Any]], step: int
) -> tuple[Rollout, Scored, dict[str, float]]:
    """Sample G completions of each of the B ``records`` and score them; with ``max_extra_groups`` > 0, replace
    groups without reward spread by fresh prompts' groups as the module docstring says. Returns the rollout, its
    scores and the dynamic-sampling metrics ({} when it is off)."""
    config = run.config
    prompts = [r["prompt"] for r in records]
    rollout = sample(run.model, run.tokenizer, prompts, **run.sampling, generators=run.generators(step, len(prompts)))
    scored = score(run, guard, log, rollout, records, step)
    if not config.max_extra_groups:
        return rollout, scored, {}
    size = len(records)
    first_flat = zero_spread_groups(scored.rewards, config.group_size).tolist()  # (B,)
    kept, flat = _split(rollout, scored, first_flat)
    extra = 0
    while len(kept) < size and extra < config.max_extra_groups:
        count = min(size - len(kept), config.max_extra_groups - extra)
        fresh = fresh_prompts(run.prompts.train, config.seed, step, extra, count)
        generators = run.generators(step, count, offset=size + extra)  # fresh prompts' own streams (torchrun)
        more = sample(run.model, run.tokenizer, [r["prompt"] for r in fresh], **run.sampling, generators=generators)
        more_scored = score(run, guard, log, more, fresh, step)
        more_flat = zero_spread_groups(more_scored.rewards, config.group_size).tolist()
        more_kept, more_flat = _split(more, more_scored, more_flat)
        kept, flat, extra = kept + more_kept, flat + more_flat, extra + count
    picks = (kept + flat)[:size]
    joined = join_groups([(r, g) for r, _, g in picks], pad_token_id(run.model, run.tokenizer))
    metrics = {"dynamic/extra_groups": float(extra), "dynamic/first_zero_spread": sum(first_flat) / size}
    return joined, join_scored([(s, g) for _, s, g in picks], config.group_size), metrics


def _split(rollout: Rollout, scored: Scored, flat: list[bool]) -> tuple[list[tuple], list[tuple]]:
    """The ``(rollout, scored, group)`` picks of a draw: those with reward spread, and those without (``flat``)."""
    picks = [(rollout, scored, g) for g in range(len(flat))]
    return [p for p, f in zip(picks, flat) if not f], [p for p, f in zip(picks, flat) if f]


def fresh_prompts(train: list[dict[str, Any]], seed: int, step: int, start: int, count: int) -> list[dict[str, Any]]:
    """Prompts ``start .. start + count - 1`` of step ``step``'s fresh draws: a seeded permutation of the training
    prompts, a function of (seed, step) alone, so a resumed run draws the same ones."""
    generator = torch.Generator().manual_seed(step_seed(seed, step) + 7919)
    order = torch.randperm(len(train), generator=generator).tolist()
    return [train[order[(start + i) % len(order)]] for i in range(count)]


def join_scored(picks: list[tuple[Scored, int]], group_size: int) -> Scored:
    """The :class:`Scored` of the rollout :func:`~policygrad.lm.rollout.join_groups` builds from the same picks."""
    rows = [(scored, g * group_size + i) for scored, g in picks for i in range(group_size)]
    rewards = torch.stack([scored.rewards[row] for scored, row in rows])  # (N,)
    faults = []
    for new_row, (scored, row) in enumerate(rows):
        faults += [
            dataclasses.replace(fault, sample=new_row)
            for fault in scored.scores.faults
            if fault.sample is None or fault.sample == row
        ]
    names = rows[0][0].scores.per_function
    scores = Scores(
        rewards=[scored.scores.rewards[row] for scored, row in rows],
        per_function={name: [scored.scores.per_function[name][row] for scored, row in rows] for name in names},
        nan_count=int(rewards.isnan().sum()),
        faults=faults,
    )

    def column(attribute: str) -> dict[str, list[Any]]:
        names = getattr(rows[0][0], attribute)
        return {name: [getattr(scored, attribute)[name][row] for scored, row in rows] for name in names}

    return Scored(rewards, scores, column("task_fields"), column("fields"))
