"""Returns, advantages and baselines: what multiplies the score in the policy gradient.

The score-function (REINFORCE) estimator of the policy gradient is

    grad J(theta) = E_tau[ sum_t grad log pi_theta(a_t | s_t) * Psi_t ]

and every function here computes a choice of ``Psi_t`` (Schulman et al. 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation", section 2, lists them): the discounted return-to-go, the return minus a
baseline, the GAE(gamma, lambda) advantage, or, for one reward per sampled completion, the group-relative advantages
of GRPO and RLOO. Subtracting a baseline ``b`` that does not depend on the action leaves the expectation unchanged,
because ``E[grad log pi(a)] = 0``, and can shrink its variance a great deal.

Shapes: time (or the sample index, for one reward per completion) runs along the LAST dimension; any leading
dimensions are independent batches (vectorised environments, seeds). Letters used below:
    T  steps along the last dimension        N  samples (= prompts * group_size)
    G  group size (completions per prompt)   ...  any leading batch dimensions

All functions are pure: tensors in, tensors out, float32 or float64, no state. The estimators a trainer picks by name
(:data:`policygrad.variants.ADVANTAGES`, :data:`policygrad.variants.BANDIT_BASELINES`) are small classes at the end
of the module that call them; the one with state (the moving-average baseline) saves and restores it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from policygrad.variants import REWARD_SCALES

__all__ = [
    "returns_to_go",
    "gae",
    "constant_baseline",
    "moving_average",
    "leave_one_out",
    "group_advantages",
    "scale_by_group_std",
    "scale_by_batch_std",
    "no_scale",
    "Estimator",
    "NoBaseline",
    "GroupNormalized",
    "GroupMean",
    "LeaveOneOut",
    "MovingAverageBaseline",
]


def returns_to_go(rewards: Tensor, dones: Tensor, gamma: float) -> Tensor:
    """Discounted return from every step to the end of its episode.

        G_t = r_t + gamma * (1 - d_t) * G_{t+1},        G_T = 0

    ``d_t = 1`` means the episode ended after step ``t``: nothing flows back across it, so several episodes may lie
    end to end along the last dimension. Steps after the last ``done`` are an unfinished episode and get the
    (truncated) sum of what was observed; to bootstrap them use :func:`gae` with ``lam=1`` and a ``last_value``.
    Source: Sutton and Barto, "Reinforcement Learning: An Introduction" (2nd ed.), eq. 3.9; the "reward-to-go" form of
    the policy gradient (Spinning Up, "Don't let the past distract you").

    Args:
        rewards: (..., T) reward received after each step.
        dones:   (..., T) 1 where the episode ended after that step, else 0 (bool, int or float).
        gamma:   discount factor in [0, 1].
    Returns:
        (..., T) returns, same dtype as ``rewards``.
    """
    not_done = 1.0 - dones.to(rewards.dtype)  # (..., T)
    returns = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])  # (...)
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * not_done[..., t] * running
        returns[..., t] = running
    return returns


def gae(
    rewards: Tensor,
    values: Tensor,
    dones: Tensor,
    last_value: Tensor | float,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation, GAE(gamma, lambda).

        delta_t = r_t + gamma * (1 - d_t) * V_{t+1} - V_t,          V_T = last_value
        A_t     = delta_t + gamma * lam * (1 - d_t) * A_{t+1},      A_T = 0
        returns = A + V   (the lambda-return, the usual value-function target)

    ``lam = 0`` gives the one-step TD errors ``delta_t``; ``lam = 1`` gives the bootstrapped return minus ``V_t``
    (exactly :func:`returns_to_go` minus ``values`` when the last step is done or ``last_value`` is 0). Between them
    lambda trades bias (from an imperfect ``V``) against variance (from long sums of rewards).
    Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16.

    Time-limit truncation is not termination: the state reached at a truncation still has value. Handle it by adding
    ``gamma * V(s_truncated)`` to that step's reward and marking it done, which bootstraps it exactly.

    Args:
        rewards:    (..., T) reward after each step.
        values:     (..., T) value estimate V(s_t) of the state each step started from.
        dones:      (..., T) 1 where the episode ended after that step.
        last_value: (...) or scalar: V of the state after the last step, used unless that step is done.
        gamma:      discount factor in [0, 1].
        lam:        GAE lambda in [0, 1].
    Returns:
        (advantages, returns), each (..., T).
    """
    not_done = 1.0 - dones.to(values.dtype)  # (..., T)
    last = torch.as_tensor(last_value, dtype=values.dtype, device=values.device)
    last = last.unsqueeze(-1) if last.dim() > 0 else last  # (...) -> (..., 1); a scalar broadcasts
    next_values = torch.cat([values[..., 1:], last.expand_as(values[..., :1])], dim=-1)  # (..., T): V_{t+1}
    deltas = rewards + gamma * not_done * next_values - values  # (..., T)
    advantages = torch.empty_like(deltas)
    running = torch.zeros_like(deltas[..., 0])  # (...)
    for t in range(deltas.shape[-1] - 1, -1, -1):
        running = deltas[..., t] + gamma * lam * not_done[..., t] * running
        advantages[..., t] = running
    return advantages, advantages + values


def constant_baseline(rewards: Tensor, baseline: Tensor | float) -> Tensor:
    """Advantage against a fixed baseline: ``A_i = r_i - b``.

    Unbiased for any ``b`` chosen without looking at the sampled actions; ``b = E[r]`` is close to the
    variance-minimising choice (Greensmith, Bartlett and Baxter 2004, "Variance Reduction Techniques for Gradient
    Estimates in Reinforcement Learning", give the exact optimum).

    Args:
        rewards:  (..., N).
        baseline: scalar or a tensor broadcastable to ``rewards``.
    Returns:
        (..., N) advantages.
    """
    return rewards - baseline


def moving_average(previous: Tensor, rewards: Tensor, decay: float) -> Tensor:
    """One update of an exponential moving average of the mean reward, the classic REINFORCE baseline.

        b_new = decay * b_old + (1 - decay) * mean(r)         (mean over the last dimension, NaNs left out)

    Use ``b_old`` for the current batch's advantages and only then update it: a baseline computed from past batches
    does not depend on the current samples, so the estimator stays unbiased (Williams 1992, "Simple Statistical
    Gradient-Following Algorithms for Connectionist Reinforcement Learning", section 4, reinforcement comparison).

    Args:
        previous: (...) the baseline so far.
        rewards:  (..., N) this batch's rewards.
        decay:    in [0, 1); larger means a longer memory.
    Returns:
        (...) the updated baseline.
    """
    return decay * previous + (1.0 - decay) * rewards.nanmean(dim=-1)


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """(..., N) -> (..., N // G, G), consecutive blocks of ``group_size``; one clear error if N is not a multiple."""
    if group_size < 1 or rewards.shape[-1] % group_size:
        raise ValueError(
            f"group_size must be a positive divisor of the number of rewards ({rewards.shape[-1]}), got {group_size}"
        )
    return rewards.unflatten(-1, (rewards.shape[-1] // group_size, group_size))


def leave_one_out(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: each sample's baseline is the mean reward of the OTHER samples of its group.

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j  =  G/(G-1) * (r_i - mean_j r_j)

    The baseline does not use sample ``i`` itself, so the estimator stays unbiased; compare the plain group mean,
    which includes ``r_i`` and so scales the expected gradient by ``(G-1)/G``.
    Source: Kool, van Hoof and Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!";
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback".

    A NaN reward (a failed reward call) is left out of its group's baseline and gets advantage 0; with ``G'`` valid
    samples the formula uses ``G'``. A sample with no valid peer gets advantage 0.

    Args:
        rewards:    (..., N) with N a multiple of ``group_size``; groups are consecutive blocks.
        group_size: G >= 1.
    Returns:
        (..., N) advantages.
    """
    grouped = _grouped(rewards, group_size)  # (..., N/G, G)
    valid = ~grouped.isnan()
    count = valid.sum(-1, keepdim=True)  # (..., N/G, 1)
    total = grouped.nan_to_num(0.0).sum(-1, keepdim=True)
    others = (count - 1).clamp(min=1)
    advantages = grouped - (total - grouped) / others
    advantages = torch.where(valid & (count > 1), advantages, torch.zeros_like(advantages))
    return advantages.flatten(-2)


def scale_by_group_std(grouped: Tensor) -> Tensor:
    """Sample (Bessel-corrected) standard deviation of each group's valid rewards: (..., N/G, G) -> (..., N/G, 1)."""
    return _nanstd(grouped, dim=-1, keepdim=True)


def scale_by_batch_std(grouped: Tensor) -> Tensor:
    """Sample standard deviation of all valid rewards of the batch (over the last two dims): -> (..., 1, 1)."""
    return _nanstd(grouped.flatten(-2), dim=-1, keepdim=True).unsqueeze(-1)


def no_scale(grouped: Tensor) -> Tensor:
    """Dr. GRPO: no division at all (the std term re-weights prompts by their difficulty)."""
    return torch.ones_like(grouped[..., :1])


# the registry of these divisors by name is policygrad.variants.REWARD_SCALES; eps is added to the std ones


def _nanstd(x: Tensor, dim: int, keepdim: bool) -> Tensor:
    """Bessel-corrected standard deviation ignoring NaNs; 0 where fewer than two values are valid."""
    valid = ~x.isnan()
    count = valid.sum(dim, keepdim=True)
    mean = x.nanmean(dim, keepdim=True)
    squares = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim, keepdim=True)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    std = torch.where(count > 1, std, torch.zeros_like(std))
    return std if keepdim else std.squeeze(dim)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantages: each reward against the other completions of the same prompt.

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)     scale="group"  (Shao et al. 2024, DeepSeekMath, eq. 4)
        A_i = (r_i - mean(r_group)) / (std(r_batch) + eps)     scale="batch"  (Hu 2025, REINFORCE++ style)
        A_i =  r_i - mean(r_group)                             scale="none"   (Liu et al. 2025, "Understanding R1-Zero-
                                                                               Like Training", Dr. GRPO)

    ``std`` is the sample (Bessel-corrected, divide by n - 1) standard deviation. Groups are consecutive blocks of
    ``group_size`` along the last dimension, the layout of ``prompts.repeat_interleave(G)``. The group mean includes
    ``r_i`` itself, so the expected policy gradient is scaled by ``(G-1)/G`` (see :func:`leave_one_out` for the
    unbiased variant); the std division rescales each prompt's step further.

    Edge cases, chosen so that nothing becomes NaN:
      * a group whose valid rewards are all equal gets advantage exactly 0 (it carries no preference), whatever eps;
      * a NaN reward (a failed reward call) is left out of its group's mean and std and of the batch std, and gets
        advantage 0; a group with fewer than two valid rewards gets 0.

    Args:
        rewards:    (..., N) with N = prompts * group_size.
        group_size: G >= 1.
        scale:      "group", "batch" or "none" (see :data:`policygrad.variants.REWARD_SCALES`).
        eps:        added to the std divisor; default 1e-4 as in TRL's GRPOTrainer.
    Returns:
        (..., N) advantages, same dtype as ``rewards``.
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {', '.join(REWARD_SCALES)}, got {scale!r}")
    grouped = _grouped(rewards, group_size)  # (..., N/G, G)
    valid = ~grouped.isnan()
    centered = grouped - grouped.nanmean(-1, keepdim=True)
    divisor = REWARD_SCALES[scale](grouped)
    if scale != "none":
        divisor = divisor + eps
    # all-equal groups: the centred value may be a rounding residue (mean of 0.1s), so zero them explicitly
    spread = grouped.nan_to_num(float("-inf")).amax(-1, keepdim=True) - grouped.nan_to_num(float("inf")).amin(
        -1, keepdim=True
    )
    informative = valid & (spread > 0)
    advantages = torch.where(informative, centered / divisor, torch.zeros_like(centered))
    return advantages.flatten(-2)


# --------------------------------------------------------------------------------------------------------------
# Estimators chosen by name (policygrad.variants): rewards (..., N) -> advantages (..., N), with state()/restore()
# --------------------------------------------------------------------------------------------------------------


class Estimator:
    """An advantage estimator: ``estimator(rewards)`` -> advantages of the same shape; stateless unless it says."""

    def __call__(self, rewards: Tensor) -> Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What a checkpoint must hold to continue exactly (plain values and tensors)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state` returned."""


class NoBaseline(Estimator):
    """Plain REINFORCE: the advantage is the reward."""

    def __call__(self, rewards: Tensor) -> Tensor:
        return rewards


class GroupNormalized(Estimator):
    """GRPO: :func:`group_advantages` with the config's group size, divisor and eps."""

    def __init__(self, group_size: int, scale_rewards: str = "group", advantage_eps: float = 1e-4):
        self.group_size, self.scale, self.eps = group_size, scale_rewards, advantage_eps

    def __call__(self, rewards: Tensor) -> Tensor:
        return group_advantages(rewards, self.group_size, self.scale, self.eps)


class GroupMean(Estimator):
    """The group's mean as the baseline, no division (``group_size`` None: the whole last dimension is one group)."""

    def __init__(self, group_size: int | None = None):
        self.group_size = group_size

    def __call__(self, rewards: Tensor) -> Tensor:
        return group_advantages(rewards, self.group_size or rewards.shape[-1], scale="none")


class LeaveOneOut(Estimator):
    """RLOO: :func:`leave_one_out` (``group_size`` None: the whole last dimension is one group)."""

    def __init__(self, group_size: int | None = None):
        self.group_size = group_size

    def __call__(self, rewards: Tensor) -> Tensor:
        return leave_one_out(rewards, self.group_size or rewards.shape[-1])


class MovingAverageBaseline(Estimator):
    """REINFORCE with a moving average of past batches' mean reward as the baseline (:func:`moving_average`):

        A_i = r_i - b_k,        b_{k+1} = decay * b_k + (1 - decay) * mean(r^(k))

    How it starts: the first batch has no past, so ``b_0`` is that batch's own mean (a group-mean baseline for one
    step, biased by (N-1)/N for that step only) rather than 0, so that a reward offset (rewards around 3, say) does
    not throw the first step far off; from the second batch on the baseline uses past batches only and the estimate is
    unbiased (Williams 1992). A NaN reward (a failed reward call) gets advantage 0 and is left out of the mean; a
    batch with no valid reward leaves the baseline as it was. Shapes: rewards (..., N), one baseline per leading index.
    """

    def __init__(self, baseline_decay: float = 0.9):
        self.decay = baseline_decay
        self.mean: Tensor | None = None  # (...) the baseline b_k; None before the first batch

    def __call__(self, rewards: Tensor) -> Tensor:
        if rewards.isnan().all():
            return torch.zeros_like(rewards)
        previous = rewards.nanmean(-1) if self.mean is None else self.mean.to(rewards.dtype)  # (...)
        advantages = (rewards - previous.unsqueeze(-1)).nan_to_num(0.0)
        self.mean = moving_average(previous, rewards, self.decay)
        return advantages

    def state(self) -> dict[str, Any]:
        return {"mean": None if self.mean is None else self.mean.clone()}

    def restore(self, state: dict[str, Any]) -> None:
        mean = state.get("mean")
        self.mean = None if mean is None else torch.as_tensor(mean).clone()
