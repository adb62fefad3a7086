"""Reward functions: loading from specs and combining with weights (the calls and their faults: test_reward_calls.py)."""

from __future__ import annotations

import doctest
import math

import pytest

from policygrad.errors import UsageError
from policygrad.lm import rewards
from policygrad.lm.rewards import RewardFunction, RewardSet, load_reward, load_rewards

pytestmark = pytest.mark.exact  # each a spec or a batch against the value or error worked out by hand

PROMPTS = ["first prompt", "first prompt", "second prompt", "second prompt"]
COMPLETIONS = ["aa", "bbbb", "1", "22"]


def test_docstring_examples_run():
    assert doctest.testmod(rewards).failed == 0


def reward_set(*functions):
    return RewardSet([RewardFunction(f.__name__, f, 1.0) for f in functions])


def test_fault_machinery_names_are_importable_from_here():
    from policygrad.lm import reward_calls

    assert rewards.RewardFault is reward_calls.RewardFault and rewards.FAULT_KINDS is reward_calls.FAULT_KINDS
    assert rewards.MAX_ABANDONED_CALLS == reward_calls.MAX_ABANDONED_CALLS


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

    scores = reward_set(sometimes).score(PROMPTS, COMPLETIONS, {})
    assert math.isnan(scores.rewards[2]) and scores.rewards[:2] == [1.0, 1.0]
    assert scores.nan_count == 1


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
