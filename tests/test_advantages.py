"""Exact values (by hand) and properties of policygrad.advantages."""

import statistics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from policygrad.advantages import (
    constant_baseline,
    gae,
    group_advantages,
    leave_one_out,
    moving_average,
    returns_to_go,
)

NAN = float("nan")
t = torch.tensor


# --- returns_to_go -------------------------------------------------------------------------------------------------
def test_returns_to_go_by_hand_with_an_episode_boundary():
    # episode 1: steps 0,1 (done after 1); episode 2: steps 2,3, unfinished
    rewards, dones = t([1.0, 2.0, 3.0, 4.0]), t([0, 1, 0, 0])
    # G1 = 2, G0 = 1 + .5*2 = 2; G3 = 4, G2 = 3 + .5*4 = 5
    assert returns_to_go(rewards, dones, 0.5).tolist() == [2.0, 2.0, 5.0, 4.0]


def test_returns_to_go_batched_and_dtype():
    rewards = t([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float32)
    out = returns_to_go(rewards, torch.zeros(2, 3), 0.9)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    torch.testing.assert_close(out, t([[2.71, 1.9, 1.0], [0.81, 0.9, 1.0]], dtype=torch.float32))


# --- gae -----------------------------------------------------------------------------------------------------------
def test_gae_by_hand():
    rewards, values, dones = t([1.0, 0.0, 2.0]), t([0.5, 1.0, 1.5]), t([0, 0, 0])
    gamma, lam, last_value = 0.9, 0.5, 2.0
    d2 = 2.0 + 0.9 * 2.0 - 1.5  # 2.3
    d1 = 0.0 + 0.9 * 1.5 - 1.0  # 0.35
    d0 = 1.0 + 0.9 * 1.0 - 0.5  # 1.4
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    advantages, returns = gae(rewards, values, dones, last_value, gamma, lam)
    torch.testing.assert_close(advantages, t([a0, a1, a2]), rtol=0, atol=1e-15)
    torch.testing.assert_close(returns, advantages + values, rtol=0, atol=0)


def test_gae_done_stops_bootstrap_and_flow():
    # done after step 1: V(s_2) must not leak into step 1, and step 2's advantage must not flow into step 1
    rewards, values, dones = t([0.0, 1.0, 5.0]), t([0.0, 0.0, 10.0]), t([0, 1, 0])
    advantages, _ = gae(rewards, values, dones, last_value=0.0, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [1.0, 1.0, -5.0]


def test_gae_last_value_ignored_when_last_step_done():
    rewards, values = t([1.0, 1.0]), t([0.0, 0.0])
    a_done, _ = gae(rewards, values, t([0, 1]), last_value=100.0, gamma=0.9, lam=0.95)
    a_zero, _ = gae(rewards, values, t([0, 1]), last_value=0.0, gamma=0.9, lam=0.95)
    assert torch.equal(a_done, a_zero)


episodes = st.integers(1, 12).flatmap(
    lambda T: st.tuples(
        st.lists(st.floats(-5, 5), min_size=T, max_size=T),
        st.lists(st.floats(-5, 5), min_size=T, max_size=T),
        st.lists(st.booleans(), min_size=T, max_size=T),
        st.floats(-5, 5),
        st.floats(0, 1),
    )
)


@settings(max_examples=200, deadline=None)
@given(episodes)
def test_gae_lambda_limits(case):
    rewards, values, dones, last_value, gamma = (t(x) if isinstance(x, list) else x for x in case)
    dones = dones.double()
    # lam = 0: one-step TD errors
    a0, _ = gae(rewards, values, dones, last_value, gamma, 0.0)
    next_values = torch.cat([values[1:], t([last_value])])
    torch.testing.assert_close(a0, rewards + gamma * (1 - dones) * next_values - values)
    # lam = 1 with the last step done: Monte-Carlo return minus the baseline
    dones[-1] = 1.0
    a1, returns = gae(rewards, values, dones, last_value, gamma, 1.0)
    torch.testing.assert_close(a1, returns_to_go(rewards, dones, gamma) - values)
    torch.testing.assert_close(returns, returns_to_go(rewards, dones, gamma))


def test_gae_truncation_by_reward_bootstrap():
    # a time-limit truncation after step 1 with V(s_trunc) = 3: fold gamma * 3 into r_1 and mark it done
    gamma = 0.5
    rewards = t([1.0, 1.0 + gamma * 3.0, 2.0])
    advantages, returns = gae(rewards, torch.zeros(3), t([0, 1, 0]), last_value=4.0, gamma=gamma, lam=1.0)
    assert returns.tolist() == [1.0 + 0.5 * 2.5, 2.5, 2.0 + 0.5 * 4.0]


# --- baselines -----------------------------------------------------------------------------------------------------
def test_constant_and_moving_average():
    assert constant_baseline(t([1.0, 3.0]), 2.0).tolist() == [-1.0, 1.0]
    # 0.9 * 1 + 0.1 * mean(2, 4) ; NaN left out of the mean
    assert moving_average(t(1.0), t([2.0, 4.0, NAN]), 0.9).item() == pytest.approx(1.2, abs=1e-15)


def test_leave_one_out_by_hand():
    out = leave_one_out(t([1.0, 0.0, 1.0, 1.0, 2.0, 4.0]), group_size=3)
    # group 1: 1 - (0+1)/2, 0 - (1+1)/2, 1 - (1+0)/2; group 2: 1 - 3, 2 - 2.5, 4 - 1.5
    torch.testing.assert_close(out, t([0.5, -1.0, 0.5, -2.0, -0.5, 2.5]), rtol=0, atol=1e-15)


@given(st.lists(st.floats(-100, 100), min_size=2, max_size=8))
def test_leave_one_out_is_scaled_centering(rewards):
    r = t(rewards)
    G = len(rewards)
    torch.testing.assert_close(leave_one_out(r, G), G / (G - 1) * (r - r.mean()), rtol=1e-9, atol=1e-9)


def test_leave_one_out_nan():
    out = leave_one_out(t([1.0, NAN, 3.0, NAN, 5.0, NAN]), 3)
    assert out.tolist() == [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]  # second group has one valid sample: nothing to compare


# --- group_advantages ----------------------------------------------------------------------------------------------
def test_group_advantages_by_hand():
    r = t([1.0, 0.0, 1.0, 1.0, 0.0, 2.0, 4.0, 2.0])
    # group 1: mean .75, sample std .5; group 2: mean 2, sample std sqrt(8/3)
    s2 = (8 / 3) ** 0.5
    expected_group = [0.5, -1.5, 0.5, 0.5, -2 / s2, 0.0, 2 / s2, 0.0]
    torch.testing.assert_close(group_advantages(r, 4, "group", eps=0.0), t(expected_group), rtol=0, atol=1e-15)
    sb = statistics.stdev(r.tolist())
    expected_batch = [(x - m) / (sb + 1e-4) for x, m in zip(r.tolist(), [0.75] * 4 + [2.0] * 4)]
    torch.testing.assert_close(group_advantages(r, 4, "batch", eps=1e-4), t(expected_batch), rtol=0, atol=1e-15)
    torch.testing.assert_close(group_advantages(r, 4, "none"), t([0.25, -0.75, 0.25, 0.25, -2.0, 0.0, 2.0, 0.0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_zero_variance_group_gets_exact_zeros(scale, eps):
    r = t([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])  # the mean of three 0.1s is not exactly 0.1 in floating point
    out = group_advantages(r, 3, scale, eps)
    assert out.tolist() == [0.0] * 6 and not out.isnan().any()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_nan_rewards_are_left_out(scale):
    r = t([1.0, NAN, 0.0, 1.0, NAN, NAN, NAN, NAN])
    out = group_advantages(r, 4, scale, eps=0.0)
    same = group_advantages(t([1.0, 0.0, 1.0]), 3, scale, eps=0.0)
    assert not out.isnan().any()
    torch.testing.assert_close(out[[0, 2, 3]], same)
    assert out[[1, 4, 5, 6, 7]].tolist() == [0.0] * 5


def test_group_advantages_shapes_and_float32():
    r = torch.rand(5, 12, dtype=torch.float32)
    out = group_advantages(r, 4)
    assert out.shape == (5, 12) and out.dtype == torch.float32
    # each group (row-wise blocks) has mean 0 and sample std ~1
    grouped = out.view(5, 3, 4)
    torch.testing.assert_close(grouped.mean(-1), torch.zeros(5, 3, dtype=torch.float32), atol=1e-6, rtol=0)


def test_group_advantages_bad_arguments():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(t([1.0, 2.0]), 2, scale="std")


@settings(max_examples=100, deadline=None)
@given(episodes, st.floats(0, 1))
def test_gae_gamma_zero_is_reward_minus_value(case, lam):
    rewards, values, dones, last_value, _ = (t(x) if isinstance(x, list) else x for x in case)
    advantages, returns = gae(rewards, values, dones.double(), last_value, 0.0, lam)
    torch.testing.assert_close(advantages, rewards - values)
    torch.testing.assert_close(returns, rewards)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-10, 10), min_size=8, max_size=8),
    st.floats(0.1, 100),
    st.floats(-100, 100),
)
def test_group_normalisation_ignores_reward_shift_and_scale(rewards, scale, shift):
    r = t(rewards)
    assume(all(max(g) - min(g) > 1e-3 for g in (rewards[:4], rewards[4:])))  # rounding can make a tiny spread vanish
    for mode in ("group", "batch"):
        torch.testing.assert_close(
            group_advantages(scale * r + shift, 4, mode, eps=0.0), group_advantages(r, 4, mode, eps=0.0),
            rtol=1e-6, atol=1e-6,
        )
    # Dr. GRPO keeps the reward's scale
    torch.testing.assert_close(group_advantages(scale * r + shift, 4, "none"), scale * group_advantages(r, 4, "none"),
                               rtol=1e-6, atol=1e-6)


def test_gae_batched_last_value_has_the_leading_shape():
    rewards, values, dones = torch.ones(3, 4), torch.zeros(3, 4), torch.zeros(3, 4)
    last_value = t([0.0, 1.0, 2.0])  # (N,), one per row
    advantages, _ = gae(rewards, values, dones, last_value, gamma=1.0, lam=1.0)
    assert advantages[:, -1].tolist() == [1.0, 2.0, 3.0] and advantages[:, 0].tolist() == [4.0, 5.0, 6.0]
