"""The length_digits task: the checker and both reward modes on hand-written cases."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policygrad.lm import tasks


@pytest.mark.exact
def test_docstring_examples_run():
    assert doctest.testmod(tasks).failed == 0


@pytest.mark.exact
@pytest.mark.parametrize(
    "completion, length, digits, tolerance, expected",
    [
        ("1234567", 7, 28, 0, (True, True)),
        ("  1234567\n", 7, 28, 0, (True, True)),  # surrounding white space is not counted
        ("12 34 567", 9, 28, 0, (True, True)),  # inside white space is
        ("1234567", 8, 28, 0, (False, True)),
        ("1234567", 8, 28, 1, (True, True)),  # within the tolerance
        ("1234567", 9, 28, 1, (False, True)),
        ("1234567", 7, 27, 0, (True, False)),
        ("", 0, 0, 0, (True, True)),
        ("²³", 2, 5, 0, (True, False)),  # superscripts are not decimal digits
    ],
)
def test_check(completion, length, digits, tolerance, expected):
    result = tasks.check(completion, length, digits, tolerance)
    assert (result.length_ok, result.digits_ok) == expected
    assert result.passed == all(expected)


@pytest.mark.exact
def test_binary_is_one_exactly_on_a_pass():
    assert tasks.binary("9" * 2 + "x" * 62, 64, 18) == 1.0
    assert tasks.binary("9" * 2 + "x" * 61, 64, 18) == 0.0
    assert tasks.binary("9" * 2 + "x" * 62, 64, 17) == 0.0


@pytest.mark.exact
def test_shaped_values_by_hand():
    # 10 of 20 characters: length credit 1 - 10/20 = 0.5; digit sum 3 of 12: credit 1 - 9/12 = 0.25
    assert tasks.shaped("12abcdefgh", 20, 12) == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)
    # a miss inside the tolerance costs nothing; outside it only the excess counts
    assert tasks.shaped("abcdefghij", 12, 5, tolerance=2) == pytest.approx(0.5)
    assert tasks.shaped("abcdefghij", 13, 5, tolerance=2) == pytest.approx(0.5 * (1 - 1 / 13))
    # far too long and far too many digits: both credits floor at 0
    assert tasks.shaped("9" * 100, 10, 5) == 0.0
    assert tasks.shaped("99-----", 7, 18) == 1.0


@pytest.mark.property
def test_only_a_pass_scores_one():
    for completion in ["99----", "99------", "98-----", "99-- -"]:
        assert tasks.shaped(completion, 7, 18) < 1.0


@pytest.mark.exact
@pytest.mark.parametrize(
    "completion",
    [
        "The digits in your reply must add up to 12.",
        "OK. the digits in your reply must add up to 12",
        "The digits   in your\nreply must add up to 5!!!!",
    ],
)
def test_shaped_gives_no_credit_for_echoing_the_instruction(completion):
    assert tasks.echoes_instruction(completion)
    assert tasks.shaped(completion, len(completion.strip()), tasks.digit_sum(completion)) == 0.0


@pytest.mark.exact
def test_echo_would_earn_credit_without_the_guard():
    # the reason the guard exists: the echoed sentence is on-length and carries the target's digits
    echo = tasks.DIGITS_SENTENCE.format(digit_sum=12)
    result = tasks.check(echo, 48, 12)
    assert result.length == 43 and result.digit_sum == 3  # close on length, some digit credit


@pytest.mark.exact
def test_prompt_holds_both_targets():
    prompt = tasks.make_prompt("  A passage.  ", 64, 13)
    assert prompt.startswith("A passage.\n\n")
    assert "exactly 64 characters" in prompt and "add up to 13." in prompt


@pytest.mark.property
def test_draw_digit_sum_is_deterministic_and_covers_the_range():
    draws = [tasks.draw_digit_sum(f"passage {i}") for i in range(400)]
    assert draws == [tasks.draw_digit_sum(f"passage {i}") for i in range(400)]
    assert set(draws) == set(range(5, 21))
    assert {tasks.draw_digit_sum(f"p{i}", 3, 3) for i in range(10)} == {3}
    with pytest.raises(ValueError):
        tasks.draw_digit_sum("x", 5, 4)


@pytest.mark.exact
def test_batch_reward_functions():
    kwargs = dict(target_length=[2, 2, 3], target_digit_sum=[10, 10, 1], tolerance=[0, 0, 1])
    assert tasks.binary_reward(["p"] * 3, ["55", "5", "1a"], **kwargs) == [1.0, 0.0, 1.0]
    assert tasks.shaped_reward(["p"] * 3, ["55", "ab", "1a"], **kwargs) == [1.0, 0.5, 1.0]
    assert tasks.sharp_reward(["p"] * 3, ["55", "5", "1a"], **kwargs) == [1.0, 2**-0.5 * 2**-5, 1.0]
    with pytest.raises(ValueError, match="target_digit_sum"):
        tasks.shaped_reward(["p"], ["x"], target_length=[1])


@pytest.mark.property
@settings(max_examples=200, deadline=None)
@given(
    completion=st.text(alphabet="0123456789ab -", max_size=40),
    length=st.integers(1, 40),
    target=st.integers(0, 60),
    tolerance=st.integers(0, 3),
)
def test_shaped_and_sharp_are_in_unit_interval_and_one_exactly_on_a_pass(completion, length, target, tolerance):
    passed = tasks.check(completion, length, target, tolerance).passed
    for mode in (tasks.shaped, tasks.joint, tasks.sharp):
        reward = mode(completion, length, target, tolerance)
        assert 0.0 <= reward <= 1.0
        assert (reward == 1.0) == passed
    reward = tasks.shaped(completion, length, target, tolerance)
    assert tasks.binary(completion, length, target, tolerance) == float(reward == 1.0)


@pytest.mark.exact
def test_joint_values_by_hand():
    # 10 of 20 characters: length credit 0.5; digit sum 3 of 12: credit 0.25; joint is their product
    assert tasks.joint("12abcdefgh", 20, 12) == pytest.approx(0.5 * 0.25)
    # the right length without digits earns nothing (shaped pays it half)
    assert tasks.joint("abcdefghij", 10, 5) == 0.0 and tasks.shaped("abcdefghij", 10, 5) == 0.5
    assert tasks.joint("abcdefgh05", 10, 5) == 1.0
    assert tasks.joint("abcdefgh05", 13, 5, tolerance=2) == pytest.approx(1 - 1 / 13)
    assert tasks.joint("The digits in your reply must add up to 5.", 42, 5) == 0.0  # an echo earns nothing
    assert tasks.joint_reward(["p", "p"], ["55", "ab"], target_length=[2, 2], target_digit_sum=[10, 10]) == [1.0, 0.0]


@pytest.mark.exact
def test_sharp_values_by_hand():
    assert tasks.sharp("99-----", 7, 18) == 1.0  # a pass
    assert tasks.sharp("99---", 7, 18) == 0.5  # 2 characters short: half
    assert tasks.sharp("99-", 7, 18) == 0.25  # 4 short: a quarter
    assert tasks.sharp("99-----", 7, 17) == 0.5  # digit sum 1 over: half
    assert tasks.sharp("98---", 7, 18) == 0.25  # both: the product
    assert tasks.sharp("99---", 8, 18, tolerance=1) == pytest.approx(2**-1.0)  # only the miss beyond the tolerance
    assert tasks.sharp("Reply with exactly 7 characters.", 32, 7) == 0.0  # an echo earns nothing
    # where shaped pays almost everything for a near miss, sharp pays half
    assert tasks.shaped("99---", 7, 18) > 0.8 and tasks.sharp("99---", 7, 18) == 0.5


@pytest.mark.exact
def test_rates_by_digit_sum_target_by_hand():
    """Each target S apart, in increasing S: a template that serves some targets only shows at once."""
    completions = ["55", "64", "19", "x", "99"]
    fields = {"target_length": [2, 2, 2, 2, 2], "target_digit_sum": [10, 10, 10, 18, 18], "tolerance": [0] * 5}
    assert tasks.by_target(completions, fields) == {
        "S=10": {"prompts": 3, "pass_rate": 1.0, "length_rate": 1.0, "digits_rate": 1.0},
        "S=18": {"prompts": 2, "pass_rate": 0.5, "length_rate": 0.5, "digits_rate": 0.5},
    }
    assert tasks.by_target(["a"], {"prompt_id": [1]}) == {}  # prompts of another kind have no parts
    assert tasks.LENGTH_DIGITS.breakdown is tasks.by_target
