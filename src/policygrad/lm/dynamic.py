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
swapped for informative ones. The step's metrics count the extra groups (``dynamic/extra_groups``), those of them
with spread (``dynamic/extra_with_spread``) and the spread of the first draw (``dynamic/first_zero_spread``,
comparable with a run without dynamic sampling); ``zero_spread_groups`` is that of the batch trained on.

Redraws (``retry_temperature`` T' > 0, policygrad's variant): a fresh prompt mostly lands where the policy already
varies, and the prompts whose groups are flat (a target the policy's one reply misses every time) are the ones left
unexplored. Instead of fresh prompts, the batch's flat prompts are drawn again, in order, at the hotter T':

    extra draw j = G completions of flat_prompts[(extra + j) mod |flat_prompts|] at temperature T'

scored, like every group, as the training policy at T (``logprobs``); their ``sampler_logprobs`` are at T', so with
``tis_cap`` C > 0 the update weights their tokens by min(pi_T / pi_T', C) (truncated importance sampling), and
without it a hot group's tokens count as if drawn at T (a biased, stronger push toward what the redraw found).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from policygrad.guard import StepGuard
from policygrad.lm.metrics import zero_spread_groups
from policygrad.lm.rewards import Scores
from policygrad.lm.rollout import Rollout, join_groups, pad_token_id
from policygrad.lm.scoring import Scored, score
from policygrad.rng import step_seed
from policygrad.runlog import RunLog

__all__ = ["fresh_prompts", "join_scored", "redraws", "sample_and_score"]


def sample_and_score(
    run: Any, guard: StepGuard, log: RunLog, records: list[dict[str, Any]], step: int
) -> tuple[Rollout, Scored, dict[str, float]]:
    """Sample G completions of each of this rank's ``records`` and score them; with ``max_extra_groups`` > 0, replace
    groups without reward spread by fresh prompts' groups as the module docstring says. Returns the rollout, its
    scores and the dynamic-sampling metrics ({} when it is off)."""
    config = run.config
    prompts = [r["prompt"] for r in records]
    first = run.world.shard(config.prompts_per_step).start  # this rank's first prompt, numbered over the whole batch
    rollout = run.sample(prompts, step, range(first, first + len(prompts)))
    scored = score(run, guard, log, rollout, records, step)
    if not config.max_extra_groups:
        return rollout, scored, {}
    world, size = run.world, config.prompts_per_step  # B, over every rank
    draws = [(first, rollout, scored)]  # (number of the draw's first prompt, its rollout, its scores)
    flat = _gather_flat(world, [(first, _flat(scored, config.group_size))])  # {prompt number: no spread}
    extra, hot = 0, config.retry_temperature or None
    batch = [r for part in world.gather(records) for r in part] if hot else []  # every rank's, in prompt order
    while sum(not f for f in flat.values()) < size and extra < config.max_extra_groups:
        count = min(size - sum(not f for f in flat.values()), config.max_extra_groups - extra)
        if hot:
            fresh = redraws(batch, [flat[b] for b in range(size)], extra, count)
        else:
            fresh = fresh_prompts(run.prompts.train, config.seed, step, extra, count)
        mine = list(range(world.rank, count, world.size))  # extra draw j goes to rank j mod W
        numbers = [size + extra + j for j in mine]
        more = _sample_some(run, [fresh[j]["prompt"] for j in mine], step, numbers, hot)
        more_scored = score(run, guard, log, more, [fresh[j] for j in mine], step)  # every rank: it agrees on faults
        draws += [] if more is None else [(n, more, more_scored, g) for g, n in enumerate(numbers)]  # per group
        flags = _flat(more_scored, config.group_size) if more_scored is not None else []
        flat.update(_gather_flat(world, [(n, [f]) for n, f in zip(numbers, flags)]))
        extra += count
    picks = _picks(world, draws, flat, config.group_size, size)
    joined = join_groups([(r, g) for r, _, g in picks], pad_token_id(run.model, run.tokenizer))
    joined = joined if world.size == 1 else joined.to(rollout.completion_ids.device)
    first_flat = sum(flat[b] for b in range(size))
    metrics = {
        "dynamic/extra_groups": float(extra),
        "dynamic/extra_with_spread": float(sum(not f for n, f in flat.items() if n >= size)),
        "dynamic/first_zero_spread": first_flat / size,
    }
    return joined, join_scored([(s, g) for _, s, g in picks], config.group_size), metrics


def _flat(scored: Scored, group_size: int) -> list[bool]:
    return zero_spread_groups(scored.rewards, group_size).tolist()


def _gather_flat(world: Any, parts: list[tuple[int, list[bool]]]) -> dict[int, bool]:
    """Every rank's groups' flags, by prompt number: ``parts`` are (first prompt number, flags of its groups)."""
    return {
        start + g: f for rank_parts in world.gather(parts) for start, flags in rank_parts for g, f in enumerate(flags)
    }


def _sample_some(
    run: Any, prompts: list[str], step: int, numbers: list[int], temperature: float | None
) -> Rollout | None:
    """G completions of each of ``prompts`` (numbered ``numbers`` over every rank's draws) at ``temperature`` (None:
    the training one), or None for none."""
    if not prompts:
        return None
    return run.sample(prompts, step, numbers, temperature)


def _picks(world: Any, draws: list[tuple], flat: dict[int, bool], group_size: int, size: int) -> list[tuple]:
    """This rank's share of the step's B groups, ``(rollout, scored, group)`` each: the groups with spread in the
    order they were drawn, then those without, the first B of them, cut into the ranks' consecutive shares. Under
    torchrun a group may have been drawn by another rank: every rank's draws are gathered (on the CPU)."""
    groups: dict[int, tuple] = {}
    first, rollout, scored = draws[0]
    for g in range(len(rollout.completions) // group_size):
        groups[first + g] = (rollout, scored, g)
    for number, more, more_scored, g in draws[1:]:
        groups[number] = (more, more_scored, g)
    if world.size > 1:
        on_cpu = {id(r): r.to("cpu") for r, _, _ in groups.values()}  # each draw once, not once per group
        shared = {n: (on_cpu[id(r)], s, g) for n, (r, s, g) in groups.items()}
        groups = {n: pick for part in world.gather(shared) for n, pick in part.items()}
    order = sorted(groups)  # the batch's prompts, then the fresh ones in the order drawn
    chosen = ([n for n in order if not flat[n]] + [n for n in order if flat[n]])[:size]
    return [groups[n] for n in chosen[world.shard(size)]]


def fresh_prompts(train: list[dict[str, Any]], seed: int, step: int, start: int, count: int) -> list[dict[str, Any]]:
    """Prompts ``start .. start + count - 1`` of step ``step``'s fresh draws: a seeded permutation of the training
    prompts, a function of (seed, step) alone, so a resumed run draws the same ones."""
    generator = torch.Generator().manual_seed(step_seed(seed, step) + 7919)
    order = torch.randperm(len(train), generator=generator).tolist()
    return [train[order[(start + i) % len(order)]] for i in range(count)]


def redraws(batch: list[dict[str, Any]], flat: list[bool], start: int, count: int) -> list[dict[str, Any]]:
    """Redraws ``start .. start + count - 1`` of a step (``retry_temperature``): the batch's prompts whose first
    draw had no reward spread, in batch order, cycled.

    >>> [r["n"] for r in redraws([{"n": 0}, {"n": 1}, {"n": 2}], [True, False, True], 1, 3)]
    [2, 0, 2]
    """
    prompts = [record for record, no_spread in zip(batch, flat) if no_spread]
    return [prompts[(start + i) % len(prompts)] for i in range(count)]


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
