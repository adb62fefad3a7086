"""Evaluation on held-out prompts: the task's rates (:class:`policygrad.lm.task.Task`), mean reward, examples.

Used every ``eval_every`` steps by the trainer and by ``policygrad eval`` (:func:`run_eval`). One completion per
prompt, greedy (argmax, the model's "best answer") and/or sampled (what training sees).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from policygrad.runs import CONFIG_FILE, checkpoint_run, model_folder
from policygrad.variants import TASKS

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from policygrad.distributed import World
    from policygrad.lm.config import EvalConfig, GRPOConfig
    from policygrad.lm.rewards import RewardSet

__all__ = ["EvalSettings", "evaluate", "evaluate_heldout", "group_fields", "run_eval", "run_recipe"]

EXAMPLES = 3
"""Completions kept per decoding in the result, for a human to read."""

EVAL_STREAMS = 2**32 - 1
"""The ``step`` argument of :func:`policygrad.rng.step_seed` for the sampled evaluation's per-prompt generators: a
step no run reaches, so they are never the generators of a training step's prompts."""


def group_fields(records: Sequence[Mapping[str, Any]], group_size: int) -> dict[str, list[Any]]:
    """The records' fields other than ``"prompt"``, one list per field, each value repeated ``group_size`` times
    (the row layout of a :class:`~policygrad.lm.rollout.Rollout`). A field missing from a record is None there.

    >>> group_fields([{"prompt": "a", "x": 1}, {"prompt": "b", "x": 2}], 2)
    {'x': [1, 1, 2, 2]}
    """
    names = sorted({key for record in records for key in record if key != "prompt"})
    return {name: [record.get(name) for record in records for _ in range(group_size)] for name in names}


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`evaluate` generates and scores: the decodings, the sampling settings of the run, the generation
    batch size, the autocast dtype, the seed of the sampled decoding, and the reward-fault policy and timeout (a run
    that skips reward faults in training skips them in evaluation too: NaN, counted in ``nan_rewards``)."""

    decodings: tuple[str, ...] = ("greedy",)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    autocast_dtype: torch.dtype | None = None
    seed: int = 0
    on_fault: str = "error"
    timeout: float | None = None
    task: str = "length_digits"

    @classmethod
    def of(cls, config: GRPOConfig, autocast_dtype: torch.dtype | None, faults: bool = True) -> EvalSettings:
        """The settings of a run's config (``faults``: with its reward-fault policy and timeout)."""
        return cls(
            tuple(config.eval_decoding),
            config.max_new_tokens,
            config.temperature,
            config.top_p,
            config.micro_batch_size,
            autocast_dtype,
            config.seed,
            config.reward_fault if faults else "error",
            (config.reward_timeout or None) if faults else None,
            config.task,
        )


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    reward_set: RewardSet,
    settings: EvalSettings = EvalSettings(),
    on_batch: Callable[[int], None] | None = None,
    world: World | None = None,
) -> dict[str, dict[str, Any]]:
    """Generate one completion per record for each decoding of ``settings`` and score it; ``on_batch(n)`` is called
    after each batch of ``n`` completions (a progress bar).

    Returns:
        ``{decoding: {<the task's rates, e.g. "pass_rate">, "by_part" (the rates of each part of the prompts, for
        a task with parts: ``{"S=5": {"prompts", "pass_rate", ...}, ...}``), "mean_reward",
        "nan_rewards", "mean_length" (characters), "truncated_rate" (the fraction cut off at ``max_new_tokens``
        instead of ended by the model), "rewards": every prompt's reward in the order of ``records`` (NaN where
        a reward function gave none), "examples": [{"prompt", "completion", "reward"}, ...]}}``

    The records are generated in batches of ``settings.batch_size``, and the batches are the same however many
    processes share them: under torchrun (``world``) rank r generates and scores batches r, r + W, r + 2W, ... and
    every rank gets the whole result, so a greedy evaluation on W processes is the one-process evaluation (same
    batches, same arithmetic) in about 1 / W of the time. The sampled decoding draws each prompt's completion from
    its own generator, seeded by (``settings.seed``, the prompt's index), so it does not depend on the split either.
    """
    from policygrad.distributed import World

    world = world or World()
    results: dict[str, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    prompts = [r["prompt"] for r in records]
    fields = group_fields(records, 1)
    for decoding in settings.decodings:
        mine = _generate_and_score(model, tokenizer, records, reward_set, settings, decoding, world, on_batch)
        parts = sorted(part for rank_parts in world.gather(mine) for part in rank_parts)  # (start, ...) in order
        completions = [c for _, chunk, _, _, _ in parts for c in chunk]
        rewards = [r for _, _, _, chunk_rewards, _ in parts for r in chunk_rewards]
        truncated = sum(part[2] for part in parts)
        nan_count = sum(part[4] for part in parts)
        valid = [r for r in rewards if not math.isnan(r)]
        results[decoding] = {
            **TASKS[settings.task].rates(completions, fields),
            **_breakdown(TASKS[settings.task], completions, fields),
            "mean_reward": sum(valid) / len(valid) if valid else float("nan"),
            "nan_rewards": nan_count,
            "mean_length": sum(len(c.strip()) for c in completions) / max(len(completions), 1),
            "truncated_rate": truncated / max(len(completions), 1),
            "rewards": rewards,
            "examples": [
                {"prompt": p, "completion": c, "reward": r}
                for p, c, r in list(zip(prompts, completions, rewards))[:EXAMPLES]
            ],
        }
    model.train(was_training)
    return results


def _generate_and_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    reward_set: RewardSet,
    settings: EvalSettings,
    decoding: str,
    world: World,
    on_batch: Callable[[int], None] | None,
) -> list[tuple[int, list[str], int, list[float], int]]:
    """This rank's batches of one decoding, each ``(start, completions, truncated, rewards, nan_count)``."""
    import torch

    from policygrad.lm.rewards import RewardError
    from policygrad.lm.rollout import sample
    from policygrad.rng import step_seed

    parts, failure = [], None
    for start in range(world.rank * settings.batch_size, len(records), world.size * settings.batch_size):
        chunk = records[start : start + settings.batch_size]
        seeds = [step_seed(settings.seed, EVAL_STREAMS, start + i) for i in range(len(chunk))]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        rollout = sample(
            model,
            tokenizer,
            [r["prompt"] for r in chunk],
            group_size=1,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            greedy=decoding == "greedy",
            autocast_dtype=settings.autocast_dtype,
            score_tokens=False,
            generators=None if decoding == "greedy" else generators,
        )
        prompts, fields = [r["prompt"] for r in chunk], group_fields(chunk, 1)
        try:
            scores = reward_set.score(prompts, rollout.completions, fields, settings.on_fault, settings.timeout)
        except RewardError as err:  # said on every rank below, or the others would wait for this one's batches
            failure = (err.field, str(err)[len(err.field) + 2 :])
            break
        parts.append((start, rollout.completions, int(rollout.truncated.sum()), list(scores.rewards), scores.nan_count))
        if on_batch is not None:
            on_batch(len(chunk))
    failure = world.first(failure)  # any rank's reward fault stops the evaluation on every rank, with its message
    if failure is not None:
        raise RewardError(*failure)
    return parts


def _breakdown(task: Any, completions: list[str], fields: dict[str, list[Any]]) -> dict[str, Any]:
    """``{"by_part": {part: rates}}`` when the task has parts (length_digits: each digit-sum target), else ``{}``."""
    parts = task.breakdown(completions, fields) if task.breakdown is not None else {}
    return {"by_part": parts} if parts else {}


def evaluate_heldout(
    config: GRPOConfig | EvalConfig, on_batch: Callable[[int], None] | None = None
) -> dict[str, Any] | None:
    """Evaluate ``config.model`` (a checkpoint folder, say) on the first ``eval_size`` held-out prompts of
    ``config.prompts``, with the config's rewards, decodings and sampling settings: ``{"model", "prompts",
    decoding: rates}`` (see :func:`evaluate`), or None when the source holds out no prompts."""
    from policygrad.lm.data import check_prompt_source, prompts_for
    from policygrad.lm.device import resolve_device, use_threads
    from policygrad.lm.models import load_model
    from policygrad.lm.rewards import load_rewards

    device, autocast_dtype = resolve_device(config)
    use_threads(config)  # --threads: the count the training run used, so the numbers compare (it was ignored before)
    reward_set = load_rewards(config.rewards)
    check_prompt_source(config.prompts)  # a bad prompts file is reported before a model is loaded
    model, tokenizer = load_model(model_folder(config.model), dtype="float32", device=device)
    records = prompts_for(config, tokenizer).heldout[: config.eval_size]
    if not records:
        return None
    settings = EvalSettings.of(config, autocast_dtype, faults=False)
    results = evaluate(model, tokenizer, records, reward_set, settings, on_batch)
    return {"model": config.model, "prompts": len(records), **results}


def run_recipe(args: Sequence[str]) -> EvalConfig | None:
    """The recipe ``policygrad eval`` implies without ``--recipe``: for ``--model`` a run's checkpoint (or the run
    folder), that run's own config.yaml, so the checkpoint is scored on the task it trained on (its prompts, targets,
    passage length, new tokens, threads); the flags given override it. Says on stderr which settings it took."""
    from policygrad.lm.config import EvalConfig, load_config

    model = _flag_value(args, "--model")
    run = checkpoint_run(model) if model else None
    if run is None:
        return None
    config = EvalConfig.of(load_config(run / CONFIG_FILE), model=model)
    print(
        f"policygrad eval: the task of {run / CONFIG_FILE}: prompts {config.prompts}, {config.heldout_prompts} held "
        f"out, target length {config.target_length}, digit sums {config.digit_sum_min}..{config.digit_sum_max}, "
        f"{config.max_passage_tokens}-token passages, {config.max_new_tokens} new tokens, eval size "
        f"{config.eval_size}, threads {config.threads or 'auto'} (flags override these)",
        file=sys.stderr,
    )
    return config


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last ``--flag VALUE`` or ``--flag=VALUE`` in ``args``."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def run_eval(config: EvalConfig) -> int:
    """``policygrad eval``: :func:`evaluate_heldout` with a progress bar, then the task's summary table (or, with
    ``--json``, the whole result as JSON on stdout). Returns the exit code."""
    from policygrad.lm.report import Progress, print_before_after

    total = min(config.eval_size, config.heldout_prompts) * len(config.eval_decoding)
    with Progress(config.progress and not config.json, total, 0, "eval") as progress:
        results = evaluate_heldout(config, on_batch=progress.advance_by)
    if results is None:
        print("policygrad eval: no held-out prompts to evaluate (raise --heldout-prompts)", file=sys.stderr)
        return 2
    if results["prompts"] < config.eval_size:
        print(
            f"policygrad eval: {results['prompts']} held-out prompts evaluated (--eval-size {config.eval_size} asks "
            f"for more than the source holds out)",
            file=sys.stderr,
        )
    if config.json:
        print(json.dumps(results, indent=2))
        return 0
    after = {k: v for k, v in results.items() if isinstance(v, dict)}
    print_before_after({}, after, results["prompts"], TASKS[config.task].summary_rows, by_part=True)
    print(f"{results['model']}: {_examples_line(after)}")
    return 0


def _examples_line(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The first example completion of the first decoding, as a person would want to see one."""
    decoding, values = next(iter(results.items()))
    examples = values.get("examples") or []
    if not examples:
        return "no examples"
    reply = " ".join(str(examples[0]["completion"]).split())
    return f"first held-out reply ({decoding}): {reply[:120]!r}"
