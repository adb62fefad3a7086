"""Calling reward functions: one-line errors that name the function and the sample, the checks of what they return,
salvaging the samples that do not break them, and the calls that time out."""

from __future__ import annotations

import math
import threading

import pytest
from test_rewards import COMPLETIONS, PROMPTS, reward_set  # tests/lm is on sys.path under pytest

from policygrad.errors import UsageError
from policygrad.lm import reward_calls
from policygrad.lm.rewards import RewardError

pytestmark = pytest.mark.exact  # each a faulty function against the fault and message it must give


def _error(function, fields=None) -> str:
    with pytest.raises(RewardError) as info:
        reward_set(function).score(PROMPTS, COMPLETIONS, fields or {})
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, UsageError)  # the CLI prints it as one line, exit 2
    return message


def test_raising_function_is_named_with_the_sample():
    def picky(prompts, completions, **fields):
        return [1.0 / (len(c) - 1) for c in completions]  # "1" has length 1: ZeroDivisionError

    message = _error(picky)
    assert "reward picky" in message and "ZeroDivisionError" in message
    assert "sample 2" in message and "'second prompt'" in message


def test_wrong_count():
    message = _error(lambda prompts, completions, **f: [1.0])
    assert "<lambda>" in message and "returned 1 rewards for 4 completions" in message


def test_none_and_non_numbers():
    assert "returned None" in _error(lambda p, c, **f: None)
    message = _error(lambda p, c, **f: [1.0, 2.0, "3", 4.0])
    assert "sample 2" in message and "str" in message and "'second prompt'" in message
    assert "sample 1" in _error(lambda p, c, **f: [1.0, None, 1.0, 1.0])
    assert "finite" in _error(lambda p, c, **f: [1.0, 1.0, 1.0, math.inf])


def test_unknown_field_name_is_reported_by_the_function():
    def needs_target(prompts, completions, target, **fields):
        return target

    assert "needs_target" in _error(needs_target)  # TypeError: missing 'target'


def test_call_one_by_one_finds_the_sample_and_salvages_the_others():
    def picky(prompts, completions, **fields):
        return [1.0 / (len(c) - 1) for c in completions]  # "1" has length 1: ZeroDivisionError

    values, faults = reward_calls.call("picky", picky, PROMPTS, COMPLETIONS, {}, salvage=True)
    assert values[:2] == [1.0, 1 / 3] and math.isnan(values[2]) and values[3] == 1.0
    assert [(f.function, f.kind, f.sample) for f in faults] == [("picky", "raised", 2)]
    assert isinstance(faults[0].cause, ZeroDivisionError)
    assert faults[0].line().startswith("reward picky: raised ZeroDivisionError on sample 2 (prompt 'second prompt'")
    values, faults = reward_calls.call("picky", picky, PROMPTS, COMPLETIONS, {})  # not salvaging: stops at the first
    assert [(f.kind, f.sample) for f in faults] == [("raised", 2)] and math.isnan(values[3])


def test_a_failure_of_the_batch_as_a_whole_faults_every_sample():
    def batch_only(prompts, completions, **fields):
        if len(completions) > 1:
            raise MemoryError("too many at once")
        return [1.0]

    values, faults = reward_calls.call("batch_only", batch_only, PROMPTS, COMPLETIONS, {}, salvage=True)
    assert all(math.isnan(v) for v in values)
    assert [(f.kind, f.sample) for f in faults] == [("raised", None)]
    assert faults[0].message == (
        "raised MemoryError on a batch of 4 (first prompt 'first prompt', completion 'aa'): too many at once"
    )


def test_values_are_checked_one_by_one():
    values, faults = reward_calls.call(
        "odd", lambda p, c, **f: [True, 10**400, math.nan, 2], PROMPTS, COMPLETIONS, {}, allow_nan=False
    )
    assert [(f.kind, f.sample) for f in faults] == [("type", 0), ("inf", 1), ("nan", 2)]
    assert all(math.isnan(v) for v in values[:3]) and values[3] == 2.0 and type(values[3]) is float
    assert set(reward_calls.FAULT_KINDS) >= {f.kind for f in faults}


def test_a_call_past_its_timeout_is_abandoned_and_counted():
    release = threading.Event()

    def stuck(prompts, completions, **fields):
        release.wait(5.0)
        return [0.0] * len(completions)

    abandoned: list[threading.Thread] = []
    try:
        for count in range(1, reward_calls.MAX_ABANDONED_CALLS + 1):
            assert reward_calls.refuse_call(abandoned) is None
            values, faults = reward_calls.call("stuck", stuck, ["p"], ["c"], {}, timeout=0.05, abandoned=abandoned)
            assert math.isnan(values[0]) and [(f.kind, f.sample) for f in faults] == [("timeout", None)]
            assert (
                faults[0].message == "did not return within 0.05 s on a batch of 1 (first prompt 'p', completion 'c')"
            )
            assert len(abandoned) == count
        refusal = reward_calls.refuse_call(abandoned)
        assert refusal is not None and refusal.startswith("3 reward calls that timed out are still running")
    finally:
        release.set()
    for thread in abandoned:
        thread.join(5.0)
    assert reward_calls.refuse_call(abandoned) is None and abandoned == []  # finished calls are forgotten


def test_descriptions_are_one_short_line():
    long = "word " * 30
    assert reward_calls.describe_sample(7, "a\nprompt", long) == (
        f"sample 7 (prompt 'a prompt', completion {(long.strip()[:37] + '...')!r})"
    )
    assert reward_calls.one_line(ValueError("two\nlines")) == "two lines"
    assert reward_calls.one_line(KeyboardInterrupt()) == "KeyboardInterrupt"
