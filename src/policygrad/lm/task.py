"""What a task is to the rest of policygrad: the rates a completion is judged by and the rows a person sees.

A task's prompts are records ``{"prompt": ..., <fields>}`` (from a .jsonl file, a Hugging Face dataset, or the
embedded corpus); its reward functions receive the fields per completion (:mod:`policygrad.lm.rewards`). The trainer,
evaluation and reports know a task only through this object, chosen by the config's ``task`` from
:data:`policygrad.variants.TASKS`: a second task is a module with its reward functions, a :class:`Task` and one line
in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Task"]


@dataclass(frozen=True)
class Task:
    """One task.

    Attributes:
        name:         its name in :data:`policygrad.variants.TASKS`.
        rates:        ``(completions, fields) -> {rate name: fraction}``, the fractions of completions that meet the
                      task's rules (``fields``: the per-completion record fields, as the rewards get them); ``{}``
                      when the records lack the task's fields (prompts of another kind).
        summary_rows: ``{result key: label}``, the held-out numbers ``policygrad train`` prints before and after.
        breakdown:    ``(completions, fields) -> {part: {rate name: fraction, "prompts": count}}``, the rates of
                      each part of the prompts (length_digits: each digit-sum target), so that a policy that serves
                      some parts only is visible at once; None for a task without parts.
    """

    name: str
    rates: Callable[[Sequence[str], Mapping[str, Sequence[Any]]], dict[str, float]]
    summary_rows: Mapping[str, str]
    breakdown: Callable[[Sequence[str], Mapping[str, Sequence[Any]]], dict[str, dict[str, float]]] | None = None
