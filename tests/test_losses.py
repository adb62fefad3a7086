"""Exact values and properties of policygrad.losses."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policygrad.losses import aggregate, policy_loss, value_loss

t = torch.tensor
VALUES = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_aggregate_by_hand():
    assert aggregate(VALUES, MASK, "token_mean").item() == pytest.approx((1 + 2 + 4) / 3, abs=1e-15)
    assert aggregate(VALUES, MASK, "sequence_mean").item() == pytest.approx((1.5 + 4) / 2, abs=1e-15)
    assert aggregate(VALUES, MASK, "constant").item() == pytest.approx(7 / (2 * 3), abs=1e-15)
    assert aggregate(VALUES, MASK, "constant", max_len=10).item() == pytest.approx(7 / 20, abs=1e-15)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(VALUES, MASK, "mean")


def test_sequence_mean_skips_empty_rows():
    mask = t([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert aggregate(VALUES, mask, "sequence_mean").item() == 1.5


def test_reinforce_loss_by_hand():
    logprobs = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    loss, metrics = policy_loss(logprobs, t([2.0, -1.0]), MASK)
    # per token -A*logprob: [2, 4, 6], [-0.5, -.5, -.5]; unmasked: 2, 4, -0.5
    assert loss.item() == pytest.approx((2 + 4 - 0.5) / 3, abs=1e-15)
    assert metrics == {}


def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4)
    ratios = t([[0.5, 0.9, 1.1, 1.5]])
    logprobs = ratios.log()
    advantages = t([[1.0, -1.0, 1.0, -1.0]])
    loss, m = policy_loss(logprobs, advantages, old_logprobs=old, clip_eps_low=0.2, clip_eps_high=0.28)
    # min(r A, clip(r) A): 1*0.5 vs .8 -> .5 ; -0.9 vs -0.9 ; 1.1 vs 1.1 ; -1.5 vs -1.28 -> -1.5
    assert loss.item() == pytest.approx(-(0.5 - 0.9 + 1.1 - 1.5) / 4, abs=1e-15)
    # gradient removed: token 0? r<0.8 but A>0 -> not clipped (min keeps r A). token 3: r>1.28 but A<0 -> not clipped
    assert m["clip_fraction"] == 0.0
    loss, m = policy_loss(logprobs, -advantages, old_logprobs=old, clip_eps_low=0.2, clip_eps_high=0.28)
    assert m["clip_fraction_low"] == 0.25 and m["clip_fraction_high"] == 0.25 and m["clip_fraction"] == 0.5
    assert m["ratio_mean"] == pytest.approx(0.75 + 0.25, abs=1e-15) and m["ratio_max"] == pytest.approx(1.5)
    expected_kl = sum(r - 1 - torch.log(t(r)).item() for r in [0.5, 0.9, 1.1, 1.5]) / 4
    assert m["approx_kl"] == pytest.approx(expected_kl, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 10_000))
def test_ratio_one_makes_clipped_gradient_equal_reinforce(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    advantages = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[:, 0] = 1
    reinforce, _ = policy_loss(logprobs, advantages, mask)
    clipped, m = policy_loss(logprobs, advantages, mask, old_logprobs=logprobs.detach())
    (g1,) = torch.autograd.grad(reinforce, logprobs)
    (g2,) = torch.autograd.grad(clipped, logprobs)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-15)
    assert m["clip_fraction"] == 0.0 and m["approx_kl"] == 0.0


def test_value_loss_by_hand():
    values, returns = t([1.0, 2.0, 4.0]), t([2.0, 2.0, 1.0])
    loss, m = value_loss(values, returns)
    assert loss.item() == pytest.approx(0.5 * (1 + 0 + 9) / 3, abs=1e-15)
    # clipped around old = [1.5, 2, 2] with eps 0.5: clipped values [1, 2, 2.5] -> max(sq, clipped sq)
    loss, m = value_loss(values, returns, old_values=t([1.5, 2.0, 2.0]), clip_eps=0.5)
    assert loss.item() == pytest.approx(0.5 * (1 + 0 + 9) / 3, abs=1e-15)
    loss, m = value_loss(t([3.0]), t([0.0]), old_values=t([1.0]), clip_eps=0.5)
    assert loss.item() == pytest.approx(0.5 * 9) and m["value_clip_fraction"] == 0.0
    # moved from 0 to 2.9 toward a target of 3: the clipped prediction 0.5 is worse, so it is kept (no gradient)
    v = t([2.9], requires_grad=True)
    loss, m = value_loss(v, t([3.0]), old_values=t([0.0]), clip_eps=0.5)
    assert loss.item() == pytest.approx(0.5 * 2.5**2, abs=1e-15) and m["value_clip_fraction"] == 1.0
    assert torch.autograd.grad(loss, v)[0].item() == 0.0
    _, m = value_loss(t([1.0, 2.0, 3.0]), t([1.0, 2.0, 3.0]))
    assert m["explained_variance"] == 1.0
