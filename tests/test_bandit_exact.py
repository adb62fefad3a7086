"""The score-function estimator on a small softmax bandit, checked exactly by enumerating every sample.

With deterministic rewards, enumerating all K^N action tuples gives the estimator's exact expectation and
variance, which must match dJ/dtheta = pi * (mu - J) to 1e-10 (float64) where the theory says it is unbiased.
"""

import itertools
from types import SimpleNamespace

import pytest
import torch

from policygrad.bandit.core import exact_gradient, gradient_estimate, run_bandit
from policygrad.variants import BANDIT_BASELINES, build

K, N = 3, 3
DTYPE = torch.float64  # the exact values are compared to 1e-10
MEANS = torch.tensor([1.0, -0.5, 2.0], dtype=DTYPE)
LOGITS = torch.tensor([0.3, -0.2, 0.7], dtype=DTYPE)


def _estimator(baseline: str):
    """The playground's estimator by name (policygrad.variants.BANDIT_BASELINES), decay 0.9."""
    return build(BANDIT_BASELINES, baseline, SimpleNamespace(baseline_decay=0.9))


def enumerate_estimator(baseline: str, means=MEANS, state=None, entropy_coef=0.0):
    """Exact mean and total variance of the gradient estimate over all K^N action tuples."""
    actions = torch.tensor(list(itertools.product(range(K), repeat=N)))  # (K^N, N): every sample, one per row
    pi = LOGITS.softmax(-1)
    probability = pi[actions].prod(-1)  # (K^N,)
    rewards = means[actions]  # noise 0
    estimator = _estimator(baseline)
    if state is not None:  # a moving average of earlier batches, independent of these samples
        estimator.restore({"mean": torch.full((actions.shape[0],), state, dtype=DTYPE)})
    advantages = estimator(rewards)
    g = gradient_estimate(LOGITS.expand(actions.shape[0], K), actions, advantages, entropy_coef)  # (K^N, K)
    mean = (probability[:, None] * g).sum(0)
    variance = (probability * ((g - mean) ** 2).sum(-1)).sum()
    return mean, variance


@pytest.mark.exact
def test_probabilities_sum_to_one():
    actions = torch.tensor(list(itertools.product(range(K), repeat=N)))
    assert LOGITS.softmax(-1)[actions].prod(-1).sum().item() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.exact
@pytest.mark.parametrize("baseline", ["none", "loo"])
def test_unbiased_estimators(baseline):
    mean, _ = enumerate_estimator(baseline)
    exact = exact_gradient(LOGITS.softmax(-1), MEANS)
    torch.testing.assert_close(mean, exact, rtol=0, atol=1e-10)


@pytest.mark.exact
def test_moving_average_baseline_from_past_batches_is_unbiased():
    mean, _ = enumerate_estimator("mean", state=1.7)  # b from earlier batches, independent of these samples
    torch.testing.assert_close(mean, exact_gradient(LOGITS.softmax(-1), MEANS), rtol=0, atol=1e-10)


@pytest.mark.exact
def test_group_mean_including_itself_scales_by_g_minus_one_over_g():
    mean, _ = enumerate_estimator("group")
    exact = exact_gradient(LOGITS.softmax(-1), MEANS)
    torch.testing.assert_close(mean, (N - 1) / N * exact, rtol=0, atol=1e-10)


@pytest.mark.exact
def test_entropy_bonus_adds_exact_entropy_gradient():
    mean, _ = enumerate_estimator("none", entropy_coef=0.5)
    pi = LOGITS.softmax(-1)
    entropy_gradient = -pi * (pi.log() + (-(pi * pi.log()).sum()))  # dH/dtheta for a softmax
    torch.testing.assert_close(mean, exact_gradient(pi, MEANS) + 0.5 * entropy_gradient, rtol=0, atol=1e-10)


@pytest.mark.exact
def test_baseline_cuts_variance_under_a_reward_offset():
    # the same bandit with every reward shifted by +10: the gradient is unchanged, the raw estimator's noise is not
    offset = MEANS + 10.0
    none_mean, none_var = enumerate_estimator("none", means=offset)
    loo_mean, loo_var = enumerate_estimator("loo", means=offset)
    exact = exact_gradient(LOGITS.softmax(-1), offset)
    torch.testing.assert_close(none_mean, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(loo_mean, exact, rtol=0, atol=1e-10)
    assert none_var.item() == pytest.approx(reference_variance(offset.tolist(), "none"), rel=1e-12)
    assert loo_var.item() == pytest.approx(reference_variance(offset.tolist(), "loo"), rel=1e-12)
    assert none_var > 30 * loo_var


def reference_variance(means: list[float], baseline: str) -> float:
    """Independent brute force in plain Python floats: g = 1/N sum_i A_i (onehot(a_i) - pi), exact mean and variance."""
    import math

    z = [math.exp(x) for x in LOGITS.tolist()]
    pi = [x / sum(z) for x in z]
    outcomes = []
    for tup in itertools.product(range(K), repeat=N):
        r = [means[a] for a in tup]
        adv = r if baseline == "none" else [r[i] - (sum(r) - r[i]) / (N - 1) for i in range(N)]
        g = [sum(adv[i] * ((1.0 if tup[i] == k else 0.0) - pi[k]) for i in range(N)) / N for k in range(K)]
        outcomes.append((math.prod(pi[a] for a in tup), g))
    mean = [sum(p * g[k] for p, g in outcomes) for k in range(K)]
    return sum(p * sum((g[k] - mean[k]) ** 2 for k in range(K)) for p, g in outcomes)


@pytest.mark.property
def test_monte_carlo_estimate_within_a_few_standard_errors():
    # fixed seed, 20,000 independent batches (rows) at the same parameters, with reward noise
    rows, generator = 20_000, torch.Generator().manual_seed(1234)
    pi = LOGITS.softmax(-1)
    actions = torch.multinomial(pi.expand(rows, K), N, replacement=True, generator=generator)
    rewards = MEANS[actions] + 0.5 * torch.randn(actions.shape, generator=generator, dtype=DTYPE)
    for baseline in ("none", "loo"):
        advantages = _estimator(baseline)(rewards)
        g = gradient_estimate(LOGITS.expand(rows, K), actions, advantages)
        standard_error = g.std(0) / rows**0.5
        z = (g.mean(0) - exact_gradient(pi, MEANS)).abs() / standard_error
        assert (z < 4).all(), (baseline, z)


@pytest.mark.smoke
def test_run_bandit_learns_reproducibly_and_shapes():
    means = torch.tensor([3.2, 4.0, 3.6, 3.0], dtype=DTYPE)
    run = run_bandit(means, noise=0.5, baseline="loo", samples=4, lr=0.3, steps=200, seed=0, seeds=8)
    assert run.probs.shape == (201, 8, 4) and run.gradient_estimates.shape == (200, 8, 4)
    assert run.expected_reward.shape == (201, 8) and run.gradient_variance.shape == (200,)
    assert run.expected_reward[0].tolist() == [3.45] * 8
    assert (run.expected_reward[-1] > 3.9).all()
    again = run_bandit(means, noise=0.5, baseline="loo", samples=4, lr=0.3, steps=200, seed=0, seeds=8)
    assert torch.equal(run.probs, again.probs)


@pytest.mark.smoke
def test_measured_variance_reduction_in_a_run():
    means = torch.tensor([3.2, 4.0, 3.6, 3.0], dtype=DTYPE)
    common = dict(noise=0.5, samples=4, lr=0.3, steps=20, seed=0, seeds=64)
    none = run_bandit(means, baseline="none", **common).gradient_variance.mean()
    loo = run_bandit(means, baseline="loo", **common).gradient_variance.mean()
    assert none > 10 * loo
