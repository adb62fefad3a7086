"""A K-armed bandit with a softmax policy: the smallest problem where the policy gradient is known exactly.

The policy is ``pi = softmax(theta)`` over K arms; arm k pays ``mu_k + noise * eps``, eps ~ N(0, 1). Then

    J(theta)      = sum_k pi_k mu_k                                   (expected reward)
    dJ/dtheta_k   = pi_k (mu_k - J)                                   (exact gradient)
    score         = grad log pi(a) = onehot(a) - pi
    estimate      = 1/N sum_i A_i (onehot(a_i) - pi)                  (REINFORCE, A_i = r_i - b_i)

so every estimator can be checked against the truth, in expectation by enumeration and in variance by sampling.

Letters: S independent runs (seeds) run side by side as rows, N samples per update, K arms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from policygrad.losses import policy_loss
from policygrad.regularizers import entropy
from policygrad.variants import BANDIT_BASELINES, build

__all__ = [
    "expected_reward",
    "exact_gradient",
    "gradient_estimate",
    "BanditRun",
    "run_bandit",
]


def expected_reward(probs: Tensor, means: Tensor) -> Tensor:
    """J = sum_k pi_k mu_k.  probs (..., K), means (K,) -> (...)."""
    return probs @ means


def exact_gradient(probs: Tensor, means: Tensor) -> Tensor:
    """dJ/dtheta_k = pi_k (mu_k - J) for a softmax policy.  probs (..., K), means (K,) -> (..., K)."""
    return probs * (means - expected_reward(probs, means).unsqueeze(-1))


def gradient_estimate(logits: Tensor, actions: Tensor, advantages: Tensor, entropy_coef: float = 0.0) -> Tensor:
    """The ascent direction that one batch of samples gives, through the library's own loss.

        g = -grad_theta [ policy_loss(log pi(a_i), A_i) - entropy_coef * H(pi) ]
          = 1/N sum_i A_i (onehot(a_i) - pi) + entropy_coef * grad H(pi)

    Each row (seed) is one "sequence" of N samples: ``sequence_mean`` averages a row's samples, and the rows are
    independent, so multiplying by S gives every row its own gradient. The entropy term is exact (K is small).

    Args:
        logits:     (S, K) the policy parameters theta.
        actions:    (S, N) sampled arms.
        advantages: (S, N) what multiplies each score.
        entropy_coef: weight of the entropy bonus.
    Returns:
        (S, K) gradient estimates.
    """
    theta = logits.detach().requires_grad_(True)
    logprobs = F.log_softmax(theta, dim=-1).gather(-1, actions)  # (S, N)
    loss, _ = policy_loss(logprobs, advantages, aggregation="sequence_mean")
    loss = loss * theta.shape[0] - entropy_coef * entropy(theta).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    return -grad


@dataclasses.dataclass
class BanditRun:
    """What a run records, for S seeds side by side. Index 0 of the step axis is before the first update."""

    probs: Tensor  # (steps + 1, S, K)
    expected_reward: Tensor  # (steps + 1, S)
    gradient_estimates: Tensor  # (steps, S, K)
    exact_gradients: Tensor  # (steps, S, K)  at the parameters each estimate was taken at

    @property
    def gradient_variance(self) -> Tensor:
        """(steps,) mean over seeds of ||g - grad J||^2: the total variance of an unbiased estimate, per step."""
        return ((self.gradient_estimates - self.exact_gradients) ** 2).sum(-1).mean(-1)


def run_bandit(
    means: Tensor,
    noise: float,
    baseline: str,
    samples: int,
    lr: float,
    steps: int,
    seed: int,
    seeds: int = 1,
    entropy_coef: float = 0.0,
    baseline_decay: float = 0.9,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> BanditRun:
    """Run REINFORCE on the bandit from uniform logits, for ``seeds`` independent runs at once.

    Per step: sample N arms from pi, draw their rewards, turn rewards into advantages with the named baseline,
    estimate the gradient with :func:`gradient_estimate`, step ``theta += lr * g``. All runs share one random
    generator seeded with ``seed``, so a run is reproduced by the same (seed, seeds) pair.

    Args:
        means: (K,) float64 or float32 mean reward of each arm.
        on_step: called after every update with (step, probs (S, K)), for live views.
    Raises:
        FloatingPointError: when a step makes the logits non-finite (learning rate or rewards far too large).
    """
    generator = torch.Generator().manual_seed(seed)
    # one estimator for all S runs: each row of rewards (S, N) is one run's batch, and one group
    advantage_fn = build(BANDIT_BASELINES, baseline, SimpleNamespace(baseline_decay=baseline_decay))
    logits = torch.zeros(seeds, means.shape[0], dtype=means.dtype)  # (S, K)
    probs = [logits.softmax(-1)]
    estimates, exact = [], []
    for step in range(steps):
        pi = probs[-1]  # (S, K)
        actions = torch.multinomial(pi, samples, replacement=True, generator=generator)  # (S, N)
        noise_draw = torch.randn(actions.shape, generator=generator, dtype=means.dtype)
        rewards = means[actions] + noise * noise_draw  # (S, N)
        advantages = advantage_fn(rewards)  # (S, N)
        g = gradient_estimate(logits, actions, advantages, entropy_coef)  # (S, K)
        estimates.append(g)
        exact.append(exact_gradient(pi, means))
        logits = logits + lr * g
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"the policy diverged at step {step + 1}: its logits are no longer finite numbers")
        probs.append(logits.softmax(-1))
        if on_step is not None:
            on_step(step + 1, probs[-1])
    all_probs = torch.stack(probs)
    return BanditRun(
        probs=all_probs,
        expected_reward=expected_reward(all_probs, means),
        gradient_estimates=torch.stack(estimates),
        exact_gradients=torch.stack(exact),
    )
