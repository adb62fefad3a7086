"""The ``length_digits`` task: reply with exactly L characters whose decimal digits add up to S.

A prompt is a passage of text followed by an instruction naming both targets. The task is cheap to check, needs no
reference answer, and is hard for a small model out of the box (counting characters and adding digits are exactly
what tokenised language models are bad at), so a learning curve is visible within a few hundred steps.

Everything here is a pure function of strings and integers (no torch, no tokenizer), so it can be read, tested and
reused by anyone's reward code. The reward functions at the bottom follow the public reward interface of
:mod:`policygrad.lm.rewards`: ``(prompts, completions, **fields) -> list[float]``, one float per completion, with the
targets arriving as the per-completion fields ``target_length``, ``target_digit_sum`` and (optional) ``tolerance``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policygrad.lm.task import Task
from policygrad.variants import REWARD_MODES

__all__ = [
    "DEFAULT_TARGET_LENGTH",
    "DIGIT_SUM_RANGE",
    "Check",
    "LENGTH_DIGITS",
    "SUMMARY_ROWS",
    "by_target",
    "rates",
    "batch_reward",
    "binary",
    "binary_reward",
    "check",
    "digit_sum",
    "draw_digit_sum",
    "echoes_instruction",
    "instruction",
    "joint",
    "joint_reward",
    "make_prompt",
    "misses",
    "shaped",
    "shaped_reward",
    "sharp",
    "sharp_reward",
]

DEFAULT_TARGET_LENGTH = 64
"""Characters the reply must have unless a recipe says otherwise."""

DIGIT_SUM_RANGE = (5, 20)
"""Inclusive range the per-prompt digit-sum target is drawn from."""

_DIGITS = "0123456789"  # only ASCII digits count: "²" or "٣" pass str.isdigit() but are not decimal digits to a reader

LENGTH_SENTENCE = "Reply with exactly {length} characters."
DIGITS_SENTENCE = "The digits in your reply must add up to {digit_sum}."
"""The two instruction sentences. The second is the one a model learns to echo (see :func:`echoes_instruction`)."""


def instruction(length: int, digit_sum: int) -> str:
    """The instruction appended to every passage.

    >>> instruction(64, 12)
    'Reply with exactly 64 characters. The digits in your reply must add up to 12.'
    """
    return f"{LENGTH_SENTENCE.format(length=length)} {DIGITS_SENTENCE.format(digit_sum=digit_sum)}"


def make_prompt(passage: str, length: int, digit_sum: int) -> str:
    """A passage, a blank line, then the instruction.

    >>> make_prompt("Cats sleep a lot.", 10, 7)
    'Cats sleep a lot.\\n\\nReply with exactly 10 characters. The digits in your reply must add up to 7.'
    """
    return f"{passage.strip()}\n\n{instruction(length, digit_sum)}"


def draw_digit_sum(passage: str, low: int = DIGIT_SUM_RANGE[0], high: int = DIGIT_SUM_RANGE[1]) -> int:
    """A digit-sum target in ``[low, high]`` that depends only on the passage text.

    Hashing the text (not a position or a global RNG) gives the same prompt the same target on every machine and in
    every split, and Python's ``hash`` is salted per process, so sha256 it is.

    >>> draw_digit_sum("Cats sleep a lot.") == draw_digit_sum("Cats sleep a lot.")
    True
    >>> 5 <= draw_digit_sum("anything") <= 20
    True
    """
    if low > high:
        raise ValueError(f"digit-sum range is empty: low {low} > high {high}")
    value = int.from_bytes(hashlib.sha256(passage.encode("utf-8")).digest()[:8], "big")
    return low + value % (high - low + 1)


def digit_sum(text: str) -> int:
    """Sum of the ASCII decimal digits in ``text``; other characters count 0.

    >>> digit_sum("a1b2c3")
    6
    >>> digit_sum("no digits")
    0
    """
    return sum(_DIGITS.index(ch) for ch in text if ch in _DIGITS)


@dataclass(frozen=True)
class Check:
    """What :func:`check` found about one completion."""

    length: int  # characters after stripping surrounding white space
    digit_sum: int
    length_ok: bool
    digits_ok: bool

    @property
    def passed(self) -> bool:
        """Both rules hold: the task's pass criterion."""
        return self.length_ok and self.digits_ok


def check(completion: str, target_length: int, target_digit_sum: int, tolerance: int = 0) -> Check:
    """Check one completion against both rules.

        length rule:  | len(strip(completion)) - target_length | <= tolerance
        digits rule:  sum of its decimal digits == target_digit_sum

    White space around the reply is not counted, because chat models habitually add a leading space or trailing
    newline and that is not what the instruction is about; white space inside it is counted.

    >>> check("  12345  ", 5, 15).passed
    True
    >>> c = check("abc9", 5, 9, tolerance=1)
    >>> c.length, c.length_ok, c.digits_ok
    (4, True, True)
    >>> check("abc9", 5, 9).length_ok
    False
    """
    text = completion.strip()
    total = digit_sum(text)
    return Check(
        length=len(text),
        digit_sum=total,
        length_ok=abs(len(text) - target_length) <= tolerance,
        digits_ok=total == target_digit_sum,
    )


def echoes_instruction(completion: str) -> bool:
    """Whether the completion restates the instruction: it shares a run of three words with it.

        words(t) = lower-cased runs of letters, every number written "#"
        echo     = words_3grams(completion) & words_3grams(instruction(#, #)) is not empty

    The known reward hack of this task: a model copies the instruction from the prompt, which is fluent, about the
    right length and full of the right digits, and with partial credit it earns a good reward without doing the
    task. Policies were measured paraphrasing around narrower guards: an exact-sentence guard within 60 steps ("The
    digits in the reply must add up to 16."), a guard on four phrases within 40 steps ("The digits in your response
    should add up exactly 64 characters.", whose "64" holds digit sum 10). Any three consecutive words of the
    instruction, with the numbers abstracted, catch both; a reply about anything else rarely shares them.

    >>> echoes_instruction("Sure! The digits in your reply must add up to 12.")
    True
    >>> echoes_instruction("The digits in your response should add up exactly 64 characters.")
    True
    >>> echoes_instruction("It has exactly 64 characters, I promise.")
    True
    >>> echoes_instruction("1234567 cats add up")
    False
    """
    return not _trigrams(completion).isdisjoint(ECHO_TRIGRAMS)


def _words(text: str) -> list[str]:
    return ["#" if word[0] in _DIGITS else word for word in re.findall(r"[a-z]+|[0-9]+", text.lower())]


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


ECHO_TRIGRAMS = frozenset(_trigrams(instruction(0, 0)))
"""The instruction's runs of three words, numbers as "#": a reply holding one of them echoes it."""


# --------------------------------------------------------------------------------------------------------------
# Reward modes: one completion -> one float
# --------------------------------------------------------------------------------------------------------------


def misses(completion: str, target_length: int, target_digit_sum: int, tolerance: int = 0) -> tuple[int, int]:
    """How far a completion is from each rule: (characters beyond the tolerance, |digit sum - target|), both 0 for a
    pass. What the partial-credit modes below turn into credit.

    >>> misses("  12345  ", 8, 12, tolerance=1)
    (2, 3)
    """
    result = check(completion, target_length, target_digit_sum, tolerance)
    return max(0, abs(result.length - target_length) - tolerance), abs(result.digit_sum - target_digit_sum)


def _linear_credits(completion: str, target_length: int, target_digit_sum: int, tolerance: int) -> tuple[float, float]:
    """(length_credit, digits_credit) of :func:`shaped`: each 1 on its rule, falling linearly to 0 with the miss."""
    length_miss, digits_miss = misses(completion, target_length, target_digit_sum, tolerance)
    return max(0.0, 1.0 - length_miss / max(target_length, 1)), max(0.0, 1.0 - digits_miss / max(target_digit_sum, 1))


def binary(completion: str, target_length: int, target_digit_sum: int, tolerance: int = 0) -> float:
    """1.0 if both rules hold (:func:`check`), else 0.0: the task's own success criterion, nothing partial.

    >>> binary("99-----", 7, 18)
    1.0
    >>> binary("99----", 7, 18)
    0.0
    """
    return 1.0 if check(completion, target_length, target_digit_sum, tolerance).passed else 0.0


def shaped(completion: str, target_length: int, target_digit_sum: int, tolerance: int = 0) -> float:
    """Partial credit in [0, 1]: half for the length, half for the digit sum, each falling linearly with the miss.

        length_credit = max(0, 1 - max(0, |n - L| - tol) / L)            n = characters after stripping
        digits_credit = max(0, 1 - |s - S| / max(S, 1))                   s = digit sum
        reward        = 0.5 * length_credit + 0.5 * digits_credit
                      = 0                   if the completion echoes the instruction (:func:`echoes_instruction`)

    A pass scores exactly 1 and nothing else does. A plain, on-task reply of the right length with no digits still
    earns 0.5, which is the gradient that teaches length first; the digit half then pulls the sum toward S. Without
    the echo guard, copying "The digits in your reply must add up to S." scores well on both halves (the sentence
    is ~50 characters and holds S's digits), and small models find that within a few dozen steps.

    >>> shaped("99-----", 7, 18)
    1.0
    >>> shaped("", 10, 5)
    0.0
    >>> shaped("abcdefghij", 10, 5)   # right length, no digits
    0.5
    >>> shaped("The digits in your reply must add up to 5.", 42, 5)
    0.0
    """
    if echoes_instruction(completion):
        return 0.0
    length_credit, digits_credit = _linear_credits(completion, target_length, target_digit_sum, tolerance)
    return 0.5 * length_credit + 0.5 * digits_credit


def joint(completion: str, target_length: int, target_digit_sum: int, tolerance: int = 0) -> float:
    """:func:`shaped`'s two credits multiplied instead of averaged: no credit for the length without digits.

        reward = length_credit * digits_credit     (credits as in :func:`shaped`; 0 for an echo of the instruction)

    With ``shaped`` a fluent reply of the right length and no digits earns 0.5 at once, and policies were measured
    collapsing onto one (the chat template's self-description, 64 characters: docs/results.md, 2026-12-02). Here it
    earns 0 (a digit sum of 0 has digit credit 0), so the length is rewarded only together with digits, and a reply
    of the right length is worth more the closer its digits come to S.

    >>> joint("99-----", 7, 18)
    1.0
    >>> joint("abcdefghij", 10, 5)   # right length, no digits
    0.0
    >>> joint("12345", 10, 5)        # half the length, digit sum 15 (miss 10 of S = 5)
    0.0
    >>> joint("0000014", 14, 5)      # half the length, digit sum 5
    0.5
    """
    if echoes_instruction(completion):
        return 0.0
    length_credit, digits_credit = _linear_credits(completion, target_length, target_digit_sum, tolerance)
    return length_credit * digits_credit


def sharp(completion: str, target_length: int, target_digit_sum: int, tolerance: int = 0) -> float:
    """Credit concentrated at the target: 1 for a pass, halving every 2 characters and every unit of digit sum off.

        length_credit = 2 ** (-max(0, |n - L| - tol) / 2)
        digits_credit = 2 ** (-|s - S|)
        reward        = length_credit * digits_credit      (0 for an echo of the instruction)

    :func:`shaped` pays almost as much for a near miss as for a pass (2 characters short of 64 costs 0.016), which
    teaches the approximate answer and then leaves exactness to chance (docs/results-2026-11-24.md). Here a near miss costs
    half: the signal is in the last few characters and digits. Far from the target it is nearly flat, so it suits a
    policy already near the target, e.g. one trained with ``shaped`` first.

    >>> sharp("99-----", 7, 18)
    1.0
    >>> sharp("99---", 7, 18), sharp("99-----", 7, 17)
    (0.5, 0.5)
    >>> sharp("Reply with exactly 7 characters.", 32, 7)
    0.0
    """
    if echoes_instruction(completion):
        return 0.0
    length_miss, digits_miss = misses(completion, target_length, target_digit_sum, tolerance)
    return 2.0 ** (-length_miss / 2) * 2.0 ** (-digits_miss)


# the task's reward modes by name, ``(completion, target_length, target_digit_sum, tolerance) -> float``, are the
# registry policygrad.variants.REWARD_MODES


# --------------------------------------------------------------------------------------------------------------
# The same modes as batch reward functions (the public interface of policygrad.lm.rewards)
# --------------------------------------------------------------------------------------------------------------


def _batch(
    mode: str,
    completions: Sequence[str],
    target_length: Sequence[int] | None,
    target_digit_sum: Sequence[int] | None,
    tolerance: Sequence[int] | None,
) -> list[float]:
    if target_length is None or target_digit_sum is None:
        missing = "target_length" if target_length is None else "target_digit_sum"
        raise ValueError(f"the length_digits task needs the per-prompt field {missing!r}")
    tolerances = tolerance if tolerance is not None else [0] * len(completions)
    score = REWARD_MODES[mode]
    return [
        score(c, int(n), int(s), int(t)) for c, n, s, t in zip(completions, target_length, target_digit_sum, tolerances)
    ]


def batch_reward(mode: str) -> Callable[..., list[float]]:
    """The reward mode ``mode`` (a name of :data:`policygrad.variants.REWARD_MODES`) for a batch, in the reward-function interface
    ``(prompts, completions, target_length=..., target_digit_sum=..., tolerance=..., **fields) -> list[float]``.

    >>> batch_reward("binary")(["p", "p"], ["55", "5"], target_length=[2, 2], target_digit_sum=[10, 10])
    [1.0, 0.0]
    >>> shaped_reward(["p", "p"], ["55", "ab"], target_length=[2, 2], target_digit_sum=[10, 10])
    [1.0, 0.5]
    >>> [round(r, 4) for r in sharp_reward(["p", "p"], ["55", "5"], target_length=[2, 2], target_digit_sum=[10, 10])]
    [1.0, 0.0221]
    """

    def reward(
        prompts: Sequence[str],
        completions: Sequence[str],
        target_length: Sequence[int] | None = None,
        target_digit_sum: Sequence[int] | None = None,
        tolerance: Sequence[int] | None = None,
        **fields: object,
    ) -> list[float]:
        return _batch(mode, completions, target_length, target_digit_sum, tolerance)

    reward.__name__ = reward.__qualname__ = f"{mode}_reward"
    reward.__doc__ = f":func:`{mode}` for a batch, in the reward-function interface (see :func:`batch_reward`)."
    return reward


binary_reward = batch_reward("binary")
shaped_reward = batch_reward("shaped")
joint_reward = batch_reward("joint")
sharp_reward = batch_reward("sharp")


def rates(completions: Sequence[str], fields: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """Fractions of completions that pass both rules, the length rule and the digits rule.

    Empty when the prompts are not ``length_digits`` prompts (no ``target_length``/``target_digit_sum`` fields).

    >>> rates(["55", "5x"], {"target_length": [2, 2], "target_digit_sum": [10, 10]})
    {'pass_rate': 0.5, 'length_rate': 1.0, 'digits_rate': 0.5}
    """
    lengths, sums = fields.get("target_length"), fields.get("target_digit_sum")
    if not completions or lengths is None or sums is None or None in lengths or None in sums:
        return {}
    tolerances = fields.get("tolerance") or [0] * len(completions)
    checks = [check(c, int(n), int(s), int(t or 0)) for c, n, s, t in zip(completions, lengths, sums, tolerances)]
    n = len(checks)
    return {
        "pass_rate": sum(c.passed for c in checks) / n,
        "length_rate": sum(c.length_ok for c in checks) / n,
        "digits_rate": sum(c.digits_ok for c in checks) / n,
    }


SUMMARY_ROWS = {
    "pass_rate": "pass rate (both rules)",
    "length_rate": "length rule",
    "digits_rate": "digit-sum rule",
}
"""The held-out numbers ``policygrad train`` prints at the end, before and after training (keys of
:func:`policygrad.lm.evaluate.evaluate`'s results), with their labels."""


def by_target(completions: Sequence[str], fields: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, float]]:
    """:func:`rates` for each digit-sum target S apart, keyed ``"S=<S>"`` in increasing S, with the number of
    prompts; ``{}`` for prompts of another kind.

    >>> by_target(["55", "5x", "9"], {"target_length": [2, 2, 1], "target_digit_sum": [10, 10, 9]})
    {'S=9': {'prompts': 1, 'pass_rate': 1.0, 'length_rate': 1.0, 'digits_rate': 1.0}, 'S=10': {'prompts': 2, \
'pass_rate': 0.5, 'length_rate': 1.0, 'digits_rate': 0.5}}
    """
    if not rates(completions, fields):
        return {}
    sums = [int(s) for s in fields["target_digit_sum"]]
    parts = {}
    for target in sorted(set(sums)):
        rows = [i for i, s in enumerate(sums) if s == target]
        subset = {name: [values[i] for i in rows] for name, values in fields.items() if values is not None}
        parts[f"S={target}"] = {"prompts": len(rows), **rates([completions[i] for i in rows], subset)}
    return parts


LENGTH_DIGITS = Task("length_digits", rates, SUMMARY_ROWS, by_target)
"""The task as the trainer, evaluation and reports see it (:data:`policygrad.variants.TASKS`)."""
