"""Reward functions: loading from specs, combining with weights, and one-line errors that name the culprit."""

from __future__ import annotations

import doctest
import math

import pytest

from policygrad.errors import UsageError
from policygrad.lm import rewards
from policygrad.lm.rewards import RewardError, RewardFunction, RewardSet, load_reward, load_rewards

PROMPTS = ["first prompt", "first prompt", "second prompt", "second prompt"]
COMPLETIONS = ["aa", "bbbb", "1", "22"]


def test_docstring_examples_run():
    assert doctest.testmod(rewards).failed == 0


def _set(*functions):
    return RewardSet([RewardFunction(f.__name__, f, 1.0) for f in functions])


def test_builtins_and_module_specs_load():
    assert load_reward("shaped").fn is rewards.BUILTIN["shaped"]
    spec = load_reward("policygrad.lm.tasks:binary_reward=2.5")
    assert spec.name == "policygrad.lm.tasks:binary_reward" and spec.weight == 2.5


def test_file_spec_loads_and_combines_with_weights(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        "def length(prompts, completions, **fields):\n"
        "    return [float(len(c)) for c in completions]\n"
        "def bonus(prompts, completions, bonus, **fields):\n"
        "    return bonus\n"
    )
    combined = load_rewards([f"{path}:length=0.5", f"{path}:bonus"])
    scores = combined.score(PROMPTS, COMPLETIONS, {"bonus": [1.0, 0.0, 1.0, 0.0]})
    assert scores.rewards == [0.5 * 2 + 1, 0.5 * 4, 0.5 * 1 + 1, 0.5 * 2]
    assert scores.per_function[f"{path}:length"] == [2.0, 4.0, 1.0, 2.0]
    assert scores.nan_count == 0


def test_nan_passes_through_and_is_counted():
    def sometimes(prompts, completions, **fields):
        return [math.nan if c == "1" else 1.0 for c in completions]

    scores = _set(sometimes).score(PROMPTS, COMPLETIONS, {})
    assert math.isnan(scores.rewards[2]) and scores.rewards[:2] == [1.0, 1.0]
    assert scores.nan_count == 1


def _error(function, fields=None) -> str:
    with pytest.raises(RewardError) as info:
        _set(function).score(PROMPTS, COMPLETIONS, fields or {})
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


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nonsense", "neither a built-in"),
        ("no_such_module_xyz:f", "cannot import"),
        ("policygrad.lm.tasks:nope", "no attribute 'nope'"),
        ("policygrad.lm.tasks:DEFAULT_TARGET_LENGTH", "not a function"),
        ("missing_file.py:f", "no such file"),
        ("shaped=heavy", "must be a number"),
    ],
)
def test_bad_specs_are_one_line_usage_errors(spec, fragment):
    with pytest.raises(UsageError, match=fragment) as info:
        load_reward(spec)
    assert "\n" not in str(info.value)


def test_duplicate_and_empty_spec_lists():
    with pytest.raises(UsageError, match="twice"):
        load_rewards(["shaped", "shaped=2"])
    with pytest.raises(UsageError):
        load_rewards([])
