"""The bandit's step-by-step math that the playground shows (policygrad.bandit.core): one update as a function, the
batch reused through the clipped ratio, every estimator on the same draws, their Monte Carlo moments, and the bias of
the group mean. Exact values come from hand computation or enumeration of every sample tuple (K^N of them)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from policygrad.advantages import group_advantages, leave_one_out
from policygrad.bandit.core import (
    bandit_step,
    estimator_moments,
    exact_gradient,
    gradient_estimate,
    gradient_scale,
    group_mean_expected_gradient,
    make_estimators,
    policy_update,
    run_bandit,
)
from policygrad.variants import BANDIT_BASELINES

K, N = 3, 3
DTYPE = torch.float64
MEANS = torch.tensor([1.0, -0.5, 2.0], dtype=DTYPE)
LOGITS = torch.tensor([0.3, -0.2, 0.7], dtype=DTYPE)


def enumerate_mean(baseline: str) -> torch.Tensor:
    """Exact E[g] of a stateless estimator, noise 0, over all K^N action tuples (as tests/test_bandit_exact.py)."""
    actions = torch.tensor(list(itertools.product(range(K), repeat=N)))  # (K^N, N)
    probability = LOGITS.softmax(-1)[actions].prod(-1)  # (K^N,)
    advantages = make_estimators([baseline], N, 0.9)[baseline](MEANS[actions])
    g = gradient_estimate(LOGITS.expand(actions.shape[0], K), actions, advantages)  # (K^N, K)
    return (probability[:, None] * g).sum(0)


@pytest.mark.exact
def test_group_mean_expected_gradient_is_the_enumerated_expectation():
    expected = group_mean_expected_gradient(LOGITS.softmax(-1), MEANS, N)
    torch.testing.assert_close(enumerate_mean("group"), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(expected, (N - 1) / N * exact_gradient(LOGITS.softmax(-1), MEANS), rtol=0, atol=0)


@pytest.mark.exact
def test_gradient_scale():
    exact = exact_gradient(LOGITS.softmax(-1), MEANS)
    assert gradient_scale(exact, exact).item() == pytest.approx(1.0, abs=1e-15)
    assert gradient_scale(enumerate_mean("group"), exact).item() == pytest.approx((N - 1) / N, abs=1e-12)
    assert gradient_scale(enumerate_mean("loo"), exact).item() == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(gradient_scale(exact, torch.zeros(K, dtype=DTYPE)).item())  # no gradient, no scale
    assert gradient_scale(torch.ones(5, K), torch.ones(5, K)).shape == (5,)


@pytest.mark.exact
def test_one_epoch_is_the_reinforce_step():
    actions, advantages = torch.tensor([[0, 2, 2, 1]]), torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=DTYPE)
    logits = LOGITS.unsqueeze(0)
    updated, g, metrics = policy_update(logits, actions, advantages, lr=0.7, entropy_coef=0.1)
    assert torch.equal(g, gradient_estimate(logits, actions, advantages, 0.1))
    assert torch.equal(updated, logits + 0.7 * g)
    p, q = logits.softmax(-1), updated.softmax(-1)
    assert metrics["kl"] == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-12)  # KL(pi_0 || pi_1), by hand
    assert (metrics["clip_fraction"], metrics["approx_kl"]) == (0.0, 0.0)


@pytest.mark.exact
def test_a_fully_clipped_epoch_does_not_move():
    """K=2, one sample of each arm, A = +1 and -1, lr 2: after the first epoch the ratios are 1.76 and 0.24, both
    beyond 1 +- 0.2 in the direction their advantage pushes, so the clip removes every gradient."""
    logits, actions = torch.zeros(1, 2, dtype=DTYPE), torch.tensor([[0, 1]])
    advantages = torch.tensor([[1.0, -1.0]], dtype=DTYPE)
    once, _, _ = policy_update(logits, actions, advantages, lr=2.0, epochs=1)
    thrice, _, metrics = policy_update(logits, actions, advantages, lr=2.0, epochs=3, clip_eps=0.2)
    assert torch.equal(once, torch.tensor([[1.0, -1.0]], dtype=DTYPE))  # g = 1/2 [(1, 0) - pi - ((0, 1) - pi)]
    assert torch.equal(thrice, once) and metrics["clip_fraction"] == 1.0


@pytest.mark.exact
def test_a_later_epoch_keeps_only_the_unclipped_samples():
    """Epoch 2 by hand: g_2 = 1/N sum over unclipped i of A_i rho_i (onehot(a_i) - pi_1), rho_i = pi_1(a_i)/pi_0(a_i)."""
    logits = LOGITS.unsqueeze(0)
    actions = torch.tensor([[2, 0, 1, 2]])
    advantages = torch.tensor([[3.0, -0.1, 0.2, -2.0]], dtype=DTYPE)
    lr, eps = 0.8, 0.1
    first, g1, _ = policy_update(logits, actions, advantages, lr, epochs=1)
    second, _, metrics = policy_update(logits, actions, advantages, lr, epochs=2, clip_eps=eps)
    pi0, pi1 = logits.softmax(-1)[0], first.softmax(-1)[0]
    g2 = torch.zeros(K, dtype=DTYPE)
    clipped = 0
    for a, A in zip(actions[0].tolist(), advantages[0].tolist()):
        rho = (pi1[a] / pi0[a]).item()
        if (A > 0 and rho > 1 + eps) or (A < 0 and rho < 1 - eps):
            clipped += 1
            continue
        g2 += A * rho * (F.one_hot(torch.tensor(a), K).to(DTYPE) - pi1) / actions.shape[1]
    assert 0 < clipped < actions.shape[1]  # the case is a mixed one
    torch.testing.assert_close(second, first + lr * g2, rtol=0, atol=1e-14)
    assert metrics["clip_fraction"] == clipped / actions.shape[1]


@pytest.mark.exact
def test_run_bandit_is_the_loop_written_out():
    """An independent plain loop (sample, reward, advantage, estimate, step) with the same generator reproduces
    run_bandit exactly: the refactor into bandit_step draws what it drew before."""
    means = torch.tensor([3.2, 4.0, 3.6, 3.0], dtype=DTYPE)
    for baseline in BANDIT_BASELINES.names:
        run = run_bandit(means, 0.5, baseline, samples=4, lr=0.3, steps=25, seed=3, seeds=2, entropy_coef=0.05)
        generator = torch.Generator().manual_seed(3)
        estimator = make_estimators([baseline], 4, 0.9)[baseline]
        logits = torch.zeros(2, 4, dtype=DTYPE)
        for t in range(25):
            actions = torch.multinomial(logits.softmax(-1), 4, replacement=True, generator=generator)
            rewards = means[actions] + 0.5 * torch.randn(actions.shape, generator=generator, dtype=DTYPE)
            g = gradient_estimate(logits, actions, estimator(rewards), 0.05)
            assert torch.equal(run.gradient_estimates[t], g), (baseline, t)
            logits = logits + 0.3 * g
        assert torch.equal(run.probs[-1], logits.softmax(-1))


@pytest.mark.exact
def test_every_estimator_sees_the_same_draws():
    generator = torch.Generator().manual_seed(7)
    estimators = make_estimators(BANDIT_BASELINES.names, 5, 0.5)
    result = bandit_step(LOGITS.unsqueeze(0), MEANS, 0.3, 5, 0.2, estimators, "loo", generator, epochs=2)
    assert result.actions.shape == result.rewards.shape == (1, 5) and result.probs.shape == (1, K)
    assert set(result.estimates) == set(BANDIT_BASELINES.names)
    logits, actions, rewards = LOGITS.unsqueeze(0), result.actions, result.rewards
    by_hand = {
        "none": rewards,
        "loo": leave_one_out(rewards, 5),
        "group": group_advantages(rewards, 5, scale="none"),
        "grpo": group_advantages(rewards, 5, scale="group"),
        "mean": rewards - rewards.mean(-1, keepdim=True),  # the first batch: its own mean
    }
    for name, g in result.estimates.items():
        torch.testing.assert_close(g, gradient_estimate(logits, actions, by_hand[name]), rtol=0, atol=1e-14)
    assert torch.equal(result.gradient_estimate, result.estimates["loo"])
    assert torch.equal(result.exact_gradient, exact_gradient(LOGITS.softmax(-1), MEANS).unsqueeze(0))
    assert estimators["mean"].mean is not None  # the moving average learned from these draws too


@pytest.mark.property
def test_monte_carlo_moments_match_enumeration_and_leave_the_estimators_alone():
    estimators = make_estimators(BANDIT_BASELINES.names, N, 0.9)
    estimators["mean"].restore({"mean": torch.tensor([1.7], dtype=DTYPE)})  # a memory, as after some steps
    batches = 20_000
    moments = estimator_moments(LOGITS, MEANS, 0.0, N, estimators, batches, torch.Generator().manual_seed(0))
    assert estimators["mean"].state()["mean"].tolist() == [1.7]  # used as the fixed baseline, not updated
    exact = exact_gradient(LOGITS.softmax(-1), MEANS)
    for name in ("none", "loo", "group"):
        mean, variance = moments[name]
        assert mean.shape == (K,) and variance.shape == ()
        standard_error = (variance / batches).sqrt()  # bounds every coordinate's standard error
        torch.testing.assert_close(mean, enumerate_mean(name), rtol=0, atol=4 * standard_error.item())
    # a memory from earlier batches is a constant baseline: unbiased
    torch.testing.assert_close(moments["mean"][0], exact, rtol=0, atol=4 * (moments["mean"][1] / batches).sqrt().item())
    assert moments["group"][0] @ exact < 0.8 * (exact @ exact)  # (N-1)/N = 2/3, far from 1 at this M
