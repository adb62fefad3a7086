"""Exact values (by hand) and properties of policygrad.advantages."""

import math
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
DTYPE = torch.float64  # the exact values are compared to 1e-15


def t(data, dtype=None, **kwargs) -> torch.Tensor:
    """``torch.tensor``, with Python floats made float64 (not the default float32); ints and bools keep theirs."""
    if dtype is None and torch.tensor(data).is_floating_point():
        dtype = DTYPE
    return torch.tensor(data, dtype=dtype, **kwargs)


# --- returns_to_go -------------------------------------------------------------------------------------------------
@pytest.mark.exact
def test_returns_to_go_by_hand_with_an_episode_boundary():
    # episode 1: steps 0,1 (done after 1); episode 2: steps 2,3, unfinished
    rewards, dones = t([1.0, 2.0, 3.0, 4.0]), t([0, 1, 0, 0])
    # G1 = 2, G0 = 1 + .5*2 = 2; G3 = 4, G2 = 3 + .5*4 = 5
    assert returns_to_go(rewards, dones, 0.5).tolist() == [2.0, 2.0, 5.0, 4.0]


@pytest.mark.exact
def test_returns_to_go_batched_and_dtype():
    rewards = t([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float32)
    out = returns_to_go(rewards, torch.zeros(2, 3, dtype=DTYPE), 0.9)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    torch.testing.assert_close(out, t([[2.71, 1.9, 1.0], [0.81, 0.9, 1.0]], dtype=torch.float32))


# --- gae -----------------------------------------------------------------------------------------------------------
@pytest.mark.exact
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


@pytest.mark.exact
def test_gae_done_stops_bootstrap_and_flow():
    # done after step 1: V(s_2) must not leak into step 1, and step 2's advantage must not flow into step 1
    rewards, values, dones = t([0.0, 1.0, 5.0]), t([0.0, 0.0, 10.0]), t([0, 1, 0])
    advantages, _ = gae(rewards, values, dones, last_value=0.0, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [1.0, 1.0, -5.0]


@pytest.mark.property
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


@pytest.mark.property
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


@pytest.mark.exact
def test_gae_truncation_by_reward_bootstrap():
    # a time-limit truncation after step 1 with V(s_trunc) = 3: fold gamma * 3 into r_1 and mark it done
    gamma = 0.5
    rewards = t([1.0, 1.0 + gamma * 3.0, 2.0])
    advantages, returns = gae(rewards, torch.zeros(3, dtype=DTYPE), t([0, 1, 0]), last_value=4.0, gamma=gamma, lam=1.0)
    assert returns.tolist() == [1.0 + 0.5 * 2.5, 2.5, 2.0 + 0.5 * 4.0]


# --- baselines -----------------------------------------------------------------------------------------------------
@pytest.mark.exact
def test_constant_and_moving_average():
    assert constant_baseline(t([1.0, 3.0]), 2.0).tolist() == [-1.0, 1.0]
    # 0.9 * 1 + 0.1 * mean(2, 4) ; NaN left out of the mean
    assert moving_average(t(1.0), t([2.0, 4.0, NAN]), 0.9).item() == pytest.approx(1.2, abs=1e-15)


@pytest.mark.exact
def test_leave_one_out_by_hand():
    out = leave_one_out(t([1.0, 0.0, 1.0, 1.0, 2.0, 4.0]), group_size=3)
    # group 1: 1 - (0+1)/2, 0 - (1+1)/2, 1 - (1+0)/2; group 2: 1 - 3, 2 - 2.5, 4 - 1.5
    torch.testing.assert_close(out, t([0.5, -1.0, 0.5, -2.0, -0.5, 2.5]), rtol=0, atol=1e-15)


@pytest.mark.property
@given(st.lists(st.floats(-100, 100), min_size=2, max_size=8))
def test_leave_one_out_is_scaled_centering(rewards):
    r = t(rewards)
    G = len(rewards)
    torch.testing.assert_close(leave_one_out(r, G), G / (G - 1) * (r - r.mean()), rtol=1e-9, atol=1e-9)


@pytest.mark.exact
def test_leave_one_out_nan():
    out = leave_one_out(t([1.0, NAN, 3.0, NAN, 5.0, NAN]), 3)
    assert out.tolist() == [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]  # second group has one valid sample: nothing to compare


# --- group_advantages ----------------------------------------------------------------------------------------------
@pytest.mark.exact
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


@pytest.mark.property
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_zero_variance_group_gets_exact_zeros(scale, eps):
    r = t([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])  # the mean of three 0.1s is not exactly 0.1 in floating point
    out = group_advantages(r, 3, scale, eps)
    assert out.tolist() == [0.0] * 6 and not out.isnan().any()


@pytest.mark.property
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_nan_rewards_are_left_out(scale):
    r = t([1.0, NAN, 0.0, 1.0, NAN, NAN, NAN, NAN])
    out = group_advantages(r, 4, scale, eps=0.0)
    same = group_advantages(t([1.0, 0.0, 1.0]), 3, scale, eps=0.0)
    assert not out.isnan().any()
    torch.testing.assert_close(out[[0, 2, 3]], same)
    assert out[[1, 4, 5, 6, 7]].tolist() == [0.0] * 5


@pytest.mark.property
def test_group_advantages_shapes_and_float32():
    r = torch.rand(5, 12, dtype=torch.float32)
    out = group_advantages(r, 4)
    assert out.shape == (5, 12) and out.dtype == torch.float32
    # each group (row-wise blocks) has mean 0 and sample std ~1
    grouped = out.view(5, 3, 4)
    torch.testing.assert_close(grouped.mean(-1), torch.zeros(5, 3, dtype=torch.float32), atol=1e-6, rtol=0)


@pytest.mark.exact
def test_group_advantages_bad_arguments():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(t([1.0, 2.0]), 2, scale="std")


@pytest.mark.property
@settings(max_examples=100, deadline=None)
@given(episodes, st.floats(0, 1))
def test_gae_gamma_zero_is_reward_minus_value(case, lam):
    rewards, values, dones, last_value, _ = (t(x) if isinstance(x, list) else x for x in case)
    advantages, returns = gae(rewards, values, dones.double(), last_value, 0.0, lam)
    torch.testing.assert_close(advantages, rewards - values)
    torch.testing.assert_close(returns, rewards)


@pytest.mark.property
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
            group_advantages(scale * r + shift, 4, mode, eps=0.0),
            group_advantages(r, 4, mode, eps=0.0),
            rtol=1e-6,
            atol=1e-6,
        )
    # Dr. GRPO keeps the reward's scale
    torch.testing.assert_close(
        group_advantages(scale * r + shift, 4, "none"), scale * group_advantages(r, 4, "none"), rtol=1e-6, atol=1e-6
    )


@pytest.mark.exact
def test_gae_batched_last_value_has_the_leading_shape():
    rewards, values, dones = (
        torch.ones(3, 4, dtype=DTYPE),
        torch.zeros(3, 4, dtype=DTYPE),
        torch.zeros(3, 4, dtype=DTYPE),
    )
    last_value = t([0.0, 1.0, 2.0])  # (N,), one per row
    advantages, _ = gae(rewards, values, dones, last_value, gamma=1.0, lam=1.0)
    assert advantages[:, -1].tolist() == [1.0, 2.0, 3.0] and advantages[:, 0].tolist() == [4.0, 5.0, 6.0]


# --- dtypes, devices and leading dimensions ------------------------------------------------------------------------
@pytest.mark.property
def test_dones_may_be_bool_int_or_float():
    rewards, values = t([1.0, 2.0, 3.0, 4.0]), t([0.5, 0.0, 1.0, 2.0])
    expected = returns_to_go(rewards, t([0.0, 1.0, 0.0, 0.0]), 0.5)
    expected_gae = gae(rewards, values, t([0.0, 1.0, 0.0, 0.0]), 3.0, 0.5, 0.9)
    for dones in (t([False, True, False, False]), t([0, 1, 0, 0]), t([0.0, 1.0, 0.0, 0.0], dtype=torch.float32)):
        assert torch.equal(returns_to_go(rewards, dones, 0.5), expected)
        advantages, returns = gae(rewards, values, dones, 3.0, 0.5, 0.9)
        assert torch.equal(advantages, expected_gae[0]) and torch.equal(returns, expected_gae[1])


@pytest.mark.property
def test_float32_stays_float32():
    # a Python last_value or int dones must not promote the inputs: not float32 ones to float64, and not bfloat16
    # ones to torch's default float32 (a bootstrap value made without the values' dtype would)
    for dtype in (torch.float32, torch.bfloat16):
        rewards, values = t([1.0, 0.5, 2.0], dtype=dtype), t([0.1, 0.2, 0.3], dtype=dtype)
        advantages, returns = gae(rewards, values, t([0, 0, 0]), 0.7, 0.9, 0.95)
        assert advantages.dtype == dtype and returns.dtype == dtype
        assert returns_to_go(rewards, t([0, 1, 0]), 0.9).dtype == dtype


@pytest.mark.property
def test_gae_keeps_everything_on_the_device_of_values():
    # the meta device has no data, so it checks placement without an accelerator: a tensor made on the CPU by
    # mistake (the bootstrap value, the not-done mask) would fail to combine with the others
    rewards, values, dones = (torch.zeros(2, 3, dtype=DTYPE, device="meta") for _ in range(3))
    advantages, returns = gae(rewards, values, dones, 1.0, 0.9, 0.95)
    assert advantages.device.type == "meta" and returns.device.type == "meta"
    assert returns_to_go(rewards, dones, 0.9).device.type == "meta"


@pytest.mark.property
def test_gae_with_two_leading_dimensions_equals_row_by_row():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 3, 5, dtype=DTYPE), torch.randn(2, 3, 5, dtype=DTYPE)
    dones = (torch.rand(2, 3, 5, dtype=DTYPE) > 0.7).double()
    last_value = torch.randn(2, 3, dtype=DTYPE)  # (...) one per row
    advantages, returns = gae(rewards, values, dones, last_value, 0.9, 0.8)
    for i in range(2):
        for j in range(3):
            a, r = gae(rewards[i, j], values[i, j], dones[i, j], last_value[i, j].item(), 0.9, 0.8)
            torch.testing.assert_close(advantages[i, j], a, rtol=0, atol=1e-14)
            torch.testing.assert_close(returns[i, j], r, rtol=0, atol=1e-14)


@pytest.mark.exact
def test_moving_average_is_per_row():
    previous = t([1.0, -1.0])
    rewards = t([[2.0, 4.0, NAN], [0.0, 1.0, 2.0]])
    out = moving_average(previous, rewards, 0.75)
    torch.testing.assert_close(out, t([0.75 * 1 + 0.25 * 3, 0.75 * -1 + 0.25 * 1]), rtol=0, atol=1e-15)


# --- groups --------------------------------------------------------------------------------------------------------
@pytest.mark.exact
def test_group_of_one_is_allowed_and_carries_no_preference():
    r = t([1.0, 5.0, -2.0])
    for scale in ("group", "batch", "none"):
        assert group_advantages(r, 1, scale).tolist() == [0.0, 0.0, 0.0]
    assert leave_one_out(r, 1).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 0)


@pytest.mark.property
def test_batched_rewards_are_independent_rows():
    # (2, 3, 6): two leading dimensions; each row of 6 rewards (two groups of 3) is normalised on its own, also by
    # the "batch" std, which is over the last dimension only
    torch.manual_seed(3)
    r = torch.randn(2, 3, 6, dtype=DTYPE)
    r[0, 1, 4] = NAN
    for scale in ("group", "batch", "none"):
        out = group_advantages(r, 3, scale, eps=1e-3)
        for i in range(2):
            for j in range(3):
                torch.testing.assert_close(out[i, j], group_advantages(r[i, j], 3, scale, eps=1e-3), rtol=0, atol=1e-14)
    out = leave_one_out(r, 3)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], leave_one_out(r[i, j], 3), rtol=0, atol=1e-14)


@pytest.mark.exact
def test_group_advantages_eps_and_scales_exactly():
    # one group [0, 1, 2, 5]: mean 2, sample std sqrt(14/3); a second [4, 4, 4, 8]: mean 5, std 2
    r = t([0.0, 1.0, 2.0, 5.0, 4.0, 4.0, 4.0, 8.0])
    centred = [-2.0, -1.0, 0.0, 3.0, -1.0, -1.0, -1.0, 3.0]
    s1, s2 = math.sqrt(14 / 3), 2.0
    sb = statistics.stdev(r.tolist())
    for eps in (0.0, 0.25):
        group = [c / ((s1 if i < 4 else s2) + eps) for i, c in enumerate(centred)]
        torch.testing.assert_close(group_advantages(r, 4, "group", eps), t(group), rtol=0, atol=1e-15)
        batch = [c / (sb + eps) for c in centred]
        torch.testing.assert_close(group_advantages(r, 4, "batch", eps), t(batch), rtol=0, atol=1e-15)
        # eps is not added without a std to protect
        torch.testing.assert_close(group_advantages(r, 4, "none", eps), t(centred), rtol=0, atol=1e-15)
    # the default eps is 1e-4 (TRL's)
    torch.testing.assert_close(
        group_advantages(r, 4),
        t([c / ((s1 if i < 4 else s2) + 1e-4) for i, c in enumerate(centred)]),
        rtol=0,
        atol=1e-15,
    )


@pytest.mark.property
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_variance_group_with_a_failed_reward_gets_exact_zeros(scale):
    # the mean of three 0.1s is 0.10000000000000002: without the explicit zeroing, eps=0 would blow the residue up;
    # the NaN must not count as a value when deciding that the group is flat (either sign)
    r = t([0.1, 0.1, NAN, 0.1, -0.1, NAN, -0.1, -0.1, 1.0, 0.0, 1.0, 0.0])
    out = group_advantages(r, 4, scale, eps=0.0)
    assert out[:8].tolist() == [0.0] * 8 and not out.isnan().any()


@pytest.mark.exact
def test_nanstd_is_the_sample_std_of_the_valid_values():
    from policygrad.advantages import _nanstd

    x = t([[1.0, NAN, 4.0, 6.0], [NAN, NAN, 2.0, NAN], [NAN, NAN, NAN, NAN]])
    out = _nanstd(x, dim=-1, keepdim=False)
    assert out.shape == (3,)
    torch.testing.assert_close(out, t([statistics.stdev([1.0, 4.0, 6.0]), 0.0, 0.0]), rtol=0, atol=1e-15)
    assert _nanstd(x, dim=-1, keepdim=True).shape == (3, 1)
    # to the last bit on an AMD EPYC; one unit in the last place below on an Intel Xeon (AMX) of this project's kind
    expected = t([0.0, 0.0, statistics.stdev([4.0, 2.0]), 0.0])
    torch.testing.assert_close(_nanstd(x, dim=0, keepdim=False), expected, rtol=0, atol=1e-15)
