"""A K-armed bandit with a softmax policy: the smallest problem where the policy gradient is known exactly.

The policy is ``pi = softmax(theta)`` over K arms; arm k pays ``mu_k + noise * eps``, eps ~ N(0, 1). Then

    J(theta)      = sum_k pi_k mu_k                                   (expected reward)
    dJ/dtheta_k   = pi_k (mu_k - J)                                   (exact gradient)
    score         = grad log pi(a) = onehot(a) - pi
    estimate      = 1/N sum_i A_i (onehot(a_i) - pi)                  (REINFORCE, A_i = r_i - b_i)

so every estimator can be checked against the truth, in expectation by enumeration and in variance by sampling.

The loop is :func:`bandit_step` (sample, score, estimate, update), which :func:`run_bandit` repeats for the terminal
and the browser playground calls one step at a time: the same draws and the same numbers for the same seed. Each step
also applies every other estimator to the same draws, so they can be compared on equal terms.

Letters: S independent runs (seeds) run side by side as rows, N samples per update, K arms, M Monte Carlo batches.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Categorical, kl_divergence

from policygrad.advantages import Estimator
from policygrad.losses import policy_loss
from policygrad.regularizers import entropy
from policygrad.variants import BANDIT_BASELINES, build

__all__ = [
    "expected_reward",
    "exact_gradient",
    "group_mean_expected_gradient",
    "gradient_scale",
    "gradient_estimate",
    "policy_update",
    "estimator_moments",
    "make_estimators",
    "check_finite",
    "bandit_step",
    "BanditStep",
    "BanditRun",
    "run_bandit",
]


def expected_reward(probs: Tensor, means: Tensor) -> Tensor:
    """J = sum_k pi_k mu_k.  probs (..., K), means (K,) -> (...)."""
    return probs @ means


def exact_gradient(probs: Tensor, means: Tensor) -> Tensor:
    """dJ/dtheta_k = pi_k (mu_k - J) for a softmax policy.  probs (..., K), means (K,) -> (..., K)."""
    return probs * (means - expected_reward(probs, means).unsqueeze(-1))


def group_mean_expected_gradient(probs: Tensor, means: Tensor, samples: int) -> Tensor:
    """Expectation of the estimate whose baseline is the mean of the group INCLUDING the sample itself.

        A_i = r_i - 1/N sum_j r_j = (N-1)/N (r_i - 1/(N-1) sum_{j != i} r_j)
        E[g] = (N-1)/N * pi_k (mu_k - J)

    The second form is (N-1)/N times the leave-one-out advantage, whose estimate is unbiased (the other samples are
    independent of sample i), so the group mean shrinks the expected gradient by (N-1)/N: by half at N = 2. Noise and
    the entropy bonus aside; see :func:`policygrad.advantages.group_advantages`.

    Args:
        probs: (..., K) the sampling policy.  means: (K,).  samples: N >= 1.
    Returns:
        (..., K).
    """
    return (samples - 1) / samples * exact_gradient(probs, means)


def gradient_scale(estimate: Tensor, exact: Tensor) -> Tensor:
    """How much of the exact gradient an (expected) estimate carries: its projection on it, in units of it.

        scale = <E[g], grad J> / ||grad J||^2        1 for an unbiased estimator, (N-1)/N for the group mean

    Args:
        estimate: (..., K).  exact: (..., K).
    Returns:
        (...), NaN where the exact gradient is (numerically) zero and the question has no answer.
    """
    norm = (exact * exact).sum(-1)
    scale = (estimate * exact).sum(-1) / norm
    return torch.where(norm > 1e-24, scale, torch.full_like(scale, float("nan")))


def _ascent(
    logits: Tensor,
    actions: Tensor,
    advantages: Tensor,
    entropy_coef: float | Tensor,
    old_logprobs: Tensor | None = None,
    clip_eps: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """The ascent direction and the loss's metrics: see :func:`gradient_estimate` and :func:`policy_update`.
    ``entropy_coef`` is one weight for every row or (S,), a weight per row (each run its own, as a dynamic weight
    computed from each run's rewards is)."""
    theta = logits.detach().requires_grad_(True)
    logprobs = F.log_softmax(theta, dim=-1).gather(-1, actions)  # (S, N)
    loss, metrics = policy_loss(
        logprobs, advantages, old_logprobs=old_logprobs, clip_eps_low=clip_eps, aggregation="sequence_mean"
    )
    loss = loss * theta.shape[0] - (entropy_coef * entropy(theta)).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    return -grad, metrics


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
    return _ascent(logits, actions, advantages, entropy_coef)[0]


def policy_update(
    logits: Tensor,
    actions: Tensor,
    advantages: Tensor,
    lr: float,
    epochs: int = 1,
    clip_eps: float = 0.2,
    entropy_coef: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """``epochs`` gradient-ascent steps on one batch, the later ones through PPO's clipped ratio.

        epoch 1:   theta_1 = theta_0 + lr * g,      g the REINFORCE estimate at the sampling policy pi_0
        epoch e:   theta_e = theta_{e-1} + lr * grad [ 1/N sum_i min(rho_i A_i, clip(rho_i, 1-eps, 1+eps) A_i) ]
                   rho_i = pi_{e-1}(a_i) / pi_0(a_i)

    The first epoch's ratio is 1, where the clipped surrogate's gradient is REINFORCE's (``policy_loss``), so one
    epoch is plain REINFORCE, number for number. Later epochs reuse the samples off-policy; the clip stops pushing a
    sample's probability once its ratio has left [1-eps, 1+eps] in the direction its advantage wants (Schulman et al.
    2017, "Proximal Policy Optimization Algorithms", eq. 7), and the KL to the sampling policy measures how far the
    reuse went.

    Args:
        logits:     (S, K) theta_0, the sampling policy's parameters.
        actions:    (S, N) arms sampled from softmax(theta_0).
        advantages: (S, N).
        lr:         step size.  epochs: >= 1 steps on this batch.  clip_eps: the clip range eps.
        entropy_coef: weight of the entropy bonus, in every epoch: one for all rows, or (S,) one per row.
    Returns:
        (logits after the update (S, K), the first epoch's estimate g (S, K), metrics) with metrics floats averaged
        over rows: ``kl`` = KL(pi_0 || pi_after), exact over the K arms; ``clip_fraction`` and ``approx_kl`` (k3 of
        the samples) of the last epoch, as ``policy_loss`` reports them (0 with one epoch).
    """
    gradient, _ = _ascent(logits, actions, advantages, entropy_coef)
    updated = logits + lr * gradient
    metrics = {"clip_fraction": 0.0, "approx_kl": 0.0}
    old_logprobs = F.log_softmax(logits, dim=-1).gather(-1, actions)  # (S, N) log pi_0(a_i)
    for _ in range(epochs - 1):
        step, loss_metrics = _ascent(updated, actions, advantages, entropy_coef, old_logprobs, clip_eps)
        updated = updated + lr * step
        metrics = {"clip_fraction": loss_metrics["clip_fraction"], "approx_kl": loss_metrics["approx_kl"]}
    before, after = Categorical(logits=logits, validate_args=False), Categorical(logits=updated, validate_args=False)
    metrics["kl"] = kl_divergence(before, after).mean().item()  # NaN once diverged: the caller checks the logits
    return updated, gradient, metrics


def make_estimators(names, samples: int, baseline_decay: float) -> dict[str, Estimator]:
    """A fresh estimator for each baseline name (:data:`policygrad.variants.BANDIT_BASELINES`), each row of N samples
    one group."""
    settings = SimpleNamespace(baseline_decay=baseline_decay, group_size=samples)
    return {name: build(BANDIT_BASELINES, name, settings) for name in names}


@dataclasses.dataclass
class BanditStep:
    """One update of S runs. The chosen baseline's numbers, and every estimator's estimate on the same draws."""

    probs: Tensor  # (S, K) the sampling policy pi, before the update
    actions: Tensor  # (S, N)
    rewards: Tensor  # (S, N)
    advantages: Tensor  # (S, N) from the chosen baseline
    gradient_estimate: Tensor  # (S, K) the chosen estimate g at pi
    exact_gradient: Tensor  # (S, K) pi_k (mu_k - J) at pi
    logits: Tensor  # (S, K) after the update
    estimates: dict[str, Tensor]  # name -> (S, K) each estimator's g on these draws (the chosen one included)
    metrics: dict[str, float]  # policy_update's: kl, clip_fraction, approx_kl


def draw(pi: Tensor, means: Tensor, noise: float, samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """N arms from each row of ``pi`` (S, K), with replacement, and their rewards ``mu_a + noise * eps``, eps ~ N(0, 1):
    (actions (S, N), rewards (S, N)). The arms are drawn first, then the noise, from ``generator`` alone."""
    actions = torch.multinomial(pi, samples, replacement=True, generator=generator)
    rewards = means[actions] + noise * torch.randn(actions.shape, generator=generator, dtype=means.dtype)
    return actions, rewards


def bandit_step(
    logits: Tensor,
    means: Tensor,
    noise: float,
    samples: int,
    lr: float,
    estimators: Mapping[str, Estimator],
    baseline: str,
    generator: torch.Generator,
    entropy_coef: float = 0.0,
    epochs: int = 1,
    clip_eps: float = 0.2,
) -> BanditStep:
    """One update: sample N arms from pi = softmax(logits), draw their rewards, turn the rewards into advantages with
    ``estimators[baseline]``, step with :func:`policy_update`. Every other estimator sees the same rewards (so one
    with a memory, the moving average, keeps learning it) and gives its own estimate, which is not used.

    Args:
        logits: (S, K).  means: (K,) float64 or float32.  generator: the only source of randomness.
        estimators: name -> estimator; must hold ``baseline``.
    Returns:
        a :class:`BanditStep`; its ``logits`` may be non-finite if the step diverged (the caller decides).
    """
    pi = logits.softmax(-1)  # (S, K)
    actions, rewards = draw(pi, means, noise, samples, generator)  # (S, N) each
    advantages = estimators[baseline](rewards)  # (S, N)
    updated, g, metrics = policy_update(logits, actions, advantages, lr, epochs, clip_eps, entropy_coef)
    estimates = {
        name: g if name == baseline else gradient_estimate(logits, actions, estimator(rewards), entropy_coef)
        for name, estimator in estimators.items()
    }
    return BanditStep(pi, actions, rewards, advantages, g, exact_gradient(pi, means), updated, estimates, metrics)


def estimator_moments(
    logits: Tensor,
    means: Tensor,
    noise: float,
    samples: int,
    estimators: Mapping[str, Estimator],
    batches: int,
    generator: torch.Generator,
    entropy_coef: float = 0.0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Monte Carlo mean and total variance of each estimator at one policy, all on the same M batches.

        E[g]   ~ 1/M sum_m g_m                          (K,)
        Var[g] ~ 1/(M-1) sum_m ||g_m - E[g]||^2          ()   the trace of the covariance

    Stateful estimators (the moving average) are copied, so their memory is used as the fixed baseline of every
    batch and left as it was. Compare the means with :func:`exact_gradient` for the bias, the variances between
    estimators for what a baseline buys.

    Args:
        logits: (K,) one policy.  means: (K,).  batches: M >= 2.  generator: the draws' source.
        estimators: name -> estimator.
    Returns:
        name -> (mean (K,), variance ()).
    """
    pi = logits.softmax(-1)
    actions, rewards = draw(pi.expand(batches, -1), means, noise, samples, generator)  # (M, N) each
    moments = {}
    for name, estimator in estimators.items():
        advantages = copy.deepcopy(estimator)(rewards)  # (M, N)
        g = gradient_estimate(logits.expand(batches, -1), actions, advantages, entropy_coef)  # (M, K)
        moments[name] = (g.mean(0), ((g - g.mean(0)) ** 2).sum(-1).sum() / (batches - 1))
    return moments


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


def check_finite(logits: Tensor, step: int) -> None:
    """Raise FloatingPointError, naming the 1-based ``step``, when an update made the logits non-finite."""
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"the policy diverged at step {step}: its logits are no longer finite numbers")


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
    epochs: int = 1,
    clip_eps: float = 0.2,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> BanditRun:
    """Run REINFORCE on the bandit from uniform logits, for ``seeds`` independent runs at once: :func:`bandit_step`
    ``steps`` times. All runs share one random generator seeded with ``seed``, so a run is reproduced by the same
    (seed, seeds) pair.

    Args:
        means: (K,) float64 or float32 mean reward of each arm.
        epochs, clip_eps: updates per batch and their clip range (:func:`policy_update`).
        on_step: called after every update with (step, probs (S, K)), for live views.
    Raises:
        FloatingPointError: when a step makes the logits non-finite (learning rate or rewards far too large).
    """
    generator = torch.Generator().manual_seed(seed)
    # one estimator for all S runs: each row of rewards (S, N) is one run's batch, and one group
    estimators = make_estimators([baseline], samples, baseline_decay)
    logits = torch.zeros(seeds, means.shape[0], dtype=means.dtype)  # (S, K)
    probs = [logits.softmax(-1)]
    estimates, exact = [], []
    for step in range(steps):
        result = bandit_step(
            logits, means, noise, samples, lr, estimators, baseline, generator, entropy_coef, epochs, clip_eps
        )
        estimates.append(result.gradient_estimate)
        exact.append(result.exact_gradient)
        logits = result.logits
        check_finite(logits, step + 1)
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
