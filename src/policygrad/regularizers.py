"""Regularizers of the policy: entropy, KL estimators against a reference policy, and the weights of both terms
scaled by the inverse batch reward variance (the dynamic entropy weight, the reward-aware KL coefficient).

Shapes: ``logits`` are (..., V) with V actions or vocabulary entries; per-token log-probabilities are (..., T).
All functions are pure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from policygrad.variants import KL_ESTIMATORS

__all__ = [
    "ConstantEntropyWeight",
    "ConstantKLWeight",
    "DynamicEntropyWeight",
    "DynamicKLWeight",
    "dynamic_entropy_weight",
    "entropy",
    "entropy_of_log_probs",
    "k1",
    "k2",
    "k3",
    "kl",
]


def entropy(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution over the last dimension, in nats.

        H(pi) = - sum_a pi(a) log pi(a),      pi = softmax(logits)

    Computed from ``log_softmax`` for stability; entries with probability 0 (logit -inf, e.g. a masked action)
    contribute 0, not NaN. Source: Williams and Peng 1991 ("Function optimization using connectionist reinforcement
    learning algorithms") introduced the entropy bonus; Mnih et al. 2016 (A3C) made it standard.

    Args:
        logits: (..., V).
    Returns:
        (...) entropies.
    """
    return entropy_of_log_probs(F.log_softmax(logits, dim=-1))


def entropy_of_log_probs(logp: Tensor) -> Tensor:
    """:func:`entropy` from log-probabilities that are already normalised, ``logp = log_softmax(logits)``: for a
    caller that needs ``logp`` anyway (the log-probs of sampled tokens), so the vocabulary-sized log-softmax is
    computed once. Entries with probability 0 contribute 0.

    Args:
        logp: (..., V) normalised log-probabilities.
    Returns:
        (...) entropies, in nats.
    """
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)


def k1(d: Tensor) -> Tensor:
    return d


def k2(d: Tensor) -> Tensor:
    return 0.5 * d**2


def k3(d: Tensor) -> Tensor:
    return torch.expm1(-d) + d


# the registry of these estimators by name is policygrad.variants.KL_ESTIMATORS


def kl(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi.

    With ``d = logprobs - ref_logprobs = log pi(x) - log pi_ref(x)`` and ``x ~ pi`` (Schulman 2020, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html):

        k1 = d                          unbiased value of KL(pi || ref), high variance, can be negative
        k2 = d^2 / 2                    biased value (exact to second order), low variance, >= 0
        k3 = (exp(-d) - 1) + d          unbiased value, low variance, >= 0

    When the estimator is used as a LOSS and differentiated with the samples held fixed (how trainers use it), the
    expected gradients differ from the values' story (Tang and Munos 2025, "On a few pitfalls in KL divergence
    gradient estimation for RL"; checked by enumeration in the tests):

        E[grad k1] = E[grad log pi]                       = 0                      (no regularising force at all)
        E[grad k2] = E[d * grad log pi]                   = grad KL(pi || ref)     (the reverse KL, exactly)
        E[grad k3] = E[(1 - pi_ref/pi) * grad log pi]     = grad KL(ref || pi)     (the forward KL)

    Put k1 in the reward (as PPO-RLHF does), not in the loss; use k2 for a gradient of the reverse KL; k3 in the loss
    (GRPO, DeepSeekMath eq. 4) pulls toward the reference along the forward KL.

    Args:
        logprobs:     (..., T) log pi of the sampled tokens.
        ref_logprobs: (..., T) log pi_ref of the same tokens.
        estimator:    "k1", "k2" or "k3".
    Returns:
        (..., T) per-token estimates.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")
    return KL_ESTIMATORS[estimator](logprobs - ref_logprobs)


def dynamic_entropy_weight(
    rewards: Tensor,
    coef: float,
    min_weight: float = 0.0,
    max_weight: float = 1.0,
    eps: float = 1e-2,
) -> Tensor:
    """Entropy-bonus weight scaled by the inverse of the batch reward variance, bounded.

        w = clip( coef / (Var(r) + eps),  min_weight,  max_weight )

    ``Var`` is the sample (Bessel-corrected) variance of the batch's valid (non-NaN) rewards, 0 when fewer than two.
    Reading: when the rewards of a batch barely differ, the policy-gradient term is weak (a zero-variance batch gives
    no gradient at all), so exploration gets more weight; when rewards are spread out, the reward signal leads and
    the bonus shrinks. ``eps`` keeps the weight finite at zero variance (then ``w = clip(coef / eps)``); the bounds
    keep one flat batch from swamping the update. This is the rule of the project's reference recipe (the GRPO build
    in its seed notes: "an entropy bonus scaled by the inverse of the batch reward variance"); a constant weight is
    the ablation.

    Args:
        rewards:    (N,) or (..., N) rewards of the batch; the variance is over all of them.
        coef:       the weight at ``Var(r) + eps = 1``.
        min_weight, max_weight: the bounds.
        eps:        > 0.
    Returns:
        () the weight, a detached tensor of ``rewards``' dtype.
    """
    flat = rewards.detach().flatten()
    flat = flat[~flat.isnan()]
    variance = flat.var() if flat.numel() > 1 else flat.new_zeros(())
    return (coef / (variance + eps)).clamp(min_weight, max_weight)


class ConstantEntropyWeight:
    """The entropy bonus's weight, the same for every batch: ``w = entropy_coef``."""

    def __init__(self, entropy_coef: float):
        self.entropy_coef = entropy_coef

    def __call__(self, rewards: Tensor) -> float:
        return self.entropy_coef


class DynamicEntropyWeight:
    """The entropy bonus's weight from :func:`dynamic_entropy_weight`, with a config's bounds."""

    def __init__(self, entropy_coef: float, entropy_min_weight: float, entropy_max_weight: float, entropy_eps: float):
        self.coef, self.low, self.high, self.eps = entropy_coef, entropy_min_weight, entropy_max_weight, entropy_eps

    def __call__(self, rewards: Tensor) -> float:
        """``rewards`` (N,) -> w, a float."""
        return float(dynamic_entropy_weight(rewards, self.coef, self.low, self.high, self.eps))


class ConstantKLWeight:
    """The KL penalty's coefficient, the same for every batch: ``beta = kl_coef``."""

    def __init__(self, kl_coef: float):
        self.kl_coef = kl_coef

    def __call__(self, rewards: Tensor) -> float:
        return self.kl_coef


class DynamicKLWeight:
    """A reward-aware KL coefficient: the penalty to the reference (the pre-trained policy) weighs more when the
    batch's rewards barely differ and less when they are spread out,

        beta = clip( kl_coef / (Var(r) + kl_eps),  kl_min_weight,  kl_max_weight )

    (:func:`dynamic_entropy_weight`'s rule, applied to the KL term). The reading, after the open question of the
    project's seed notes ("a reward-aware KL schedule [that lets] the policy take larger steps when the reward is
    confident and shrink them when it is not"): a batch whose rewards are nearly equal carries little signal, and
    group normalisation blows its small differences up to unit-size advantages, so the step it asks for is mostly
    noise and the prior should hold; a batch with well-separated rewards is a confident signal and may move the
    policy further from the prior. The same reward variance drives the dynamic entropy weight the other way (more
    exploration on flat batches); this rule is the conservative counterpart. docs/studies.md, study 2, measures it.
    """

    def __init__(self, kl_coef: float, kl_min_weight: float, kl_max_weight: float, kl_eps: float):
        self.coef, self.low, self.high, self.eps = kl_coef, kl_min_weight, kl_max_weight, kl_eps

    def __call__(self, rewards: Tensor) -> float:
        """``rewards`` (N,) -> beta, a float."""
        return float(dynamic_entropy_weight(rewards, self.coef, self.low, self.high, self.eps))
