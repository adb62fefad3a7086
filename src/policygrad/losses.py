"""Policy-gradient and value losses, and the ways to average per-token terms into one number.

Letters: B rows (sequences, episodes or seeds), T tokens or steps. A ``mask`` (B, T) is 1 for tokens that count
(the completion up to and including its first EOS) and 0 for padding. Losses return ``(loss, metrics)``: a scalar
tensor to minimise and a dict of detached Python floats, each metric computed here and nowhere else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from policygrad.regularizers import kl
from policygrad.variants import AGGREGATIONS

__all__ = [
    "aggregate",
    "constant_length_mean",
    "policy_loss",
    "sequence_mean",
    "token_mean",
    "truncated_importance_weights",
    "value_loss",
]


def token_mean(values: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def sequence_mean(values: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    per_row = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    has_tokens = mask.sum(-1) > 0
    return per_row[has_tokens].sum() / has_tokens.sum().clamp(min=1)


def constant_length_mean(values: Tensor, mask: Tensor, max_len: int | None) -> Tensor:
    rows = values.numel() // values.shape[-1]
    return (values * mask).sum() / (rows * (max_len if max_len is not None else values.shape[-1]))


# the registry of these reductions by name is policygrad.variants.AGGREGATIONS


def aggregate(values: Tensor, mask: Tensor, mode: str = "token_mean", max_len: int | None = None) -> Tensor:
    """Reduce per-token values (B, T) under a mask to a scalar.

        token_mean     sum(v * m) / sum(m)                       every token weighs the same (DAPO, Yu et al. 2025)
        sequence_mean  mean_b [ sum_t(v * m)_b / sum_t m_b ]     every sequence weighs the same (GRPO as published,
                                                                 Shao et al. 2024); rows with no tokens are skipped
        constant       sum(v * m) / (B * max_len)                a length-independent constant (Dr. GRPO, Liu et al.
                                                                 2025); max_len defaults to T

    ``sequence_mean`` makes a token of a long completion count less than one of a short completion, a length bias;
    the other two do not.

    Args:
        values:  (B, T) (or (..., T): leading dims count as rows).
        mask:    same shape, 1 for tokens that count.
        mode:    a name of :data:`policygrad.variants.AGGREGATIONS`.
        max_len: for ``constant`` only.
    Returns:
        () scalar.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {mode!r}")
    return AGGREGATIONS[mode](values, mask.to(values.dtype), max_len)


def policy_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: str = "token_mean",
    max_len: int | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The policy-gradient loss, per token, then aggregated.

    Without ``old_logprobs`` (on-policy), REINFORCE (Williams 1992): the gradient of

        l_t = - A_t * log pi(a_t | s_t)

    is minus the score-function estimate of the policy gradient.

    With ``old_logprobs`` (samples from an older policy, several updates per batch), the clipped surrogate of PPO
    (Schulman et al. 2017, eq. 7) with separate lower and upper clip ranges (DAPO's "clip-higher", Yu et al. 2025):

        r_t = exp(logprobs - old_logprobs)
        l_t = - min( r_t * A_t,  clip(r_t, 1 - eps_low, 1 + eps_high) * A_t )

    At ``r = 1`` (the first update on fresh samples) its gradient is exactly REINFORCE's: ``grad r = r grad log pi``.

    With ``is_weights`` w_t (no gradient; :func:`truncated_importance_weights`), each token's term is ``w_t * l_t``:
    the correction for samples drawn by an engine whose probabilities differ from the trainer's.

    Args:
        logprobs:      (B, T) log pi_theta of the taken actions; carries the gradient.
        advantages:    (B, T) per token, or (B,) per sequence (broadcast over T).
        mask:          (B, T), default all ones.
        old_logprobs:  (B, T) log-probs under the sampling policy, or None for plain REINFORCE.
        clip_eps_low:  eps_low; the ratio is clipped below at 1 - eps_low.
        clip_eps_high: eps_high; defaults to eps_low.
        aggregation:   how per-token losses are averaged, see :func:`aggregate`.
        max_len:       for ``aggregation="constant"``.
        is_weights:    (B, T) per-token importance weights, or None for none.
    Returns:
        (loss, metrics). Metrics: ``clip_fraction`` (tokens whose gradient the clip removed, low and high split out
        as ``clip_fraction_low``/``clip_fraction_high``), ``approx_kl`` (k3 estimate of KL(old || new), Schulman 2020),
        ``ratio_mean`` and ``ratio_max``; REINFORCE reports none of these.
    """
    if mask is None:
        mask = torch.ones_like(logprobs)
    mask = mask.to(logprobs.dtype)
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1): one advantage for every token of a sequence
    weights = 1.0 if is_weights is None else is_weights.detach()  # (B, T) or 1
    if old_logprobs is None:
        per_token = -advantages * logprobs * weights  # (B, T)
        return aggregate(per_token, mask, aggregation, max_len), {}

    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped) * weights  # (B, T)
    loss = aggregate(per_token, mask, aggregation, max_len)

    with torch.no_grad():
        low = ((ratio < 1.0 - clip_eps_low) & (advantages < 0)).to(mask.dtype)  # gradient removed below
        high = ((ratio > 1.0 + eps_high) & (advantages > 0)).to(mask.dtype)  # gradient removed above
        tokens = mask.sum().clamp(min=1)
        metrics = {
            "clip_fraction_low": ((low * mask).sum() / tokens).item(),
            "clip_fraction_high": ((high * mask).sum() / tokens).item(),
            "approx_kl": ((kl(old_logprobs, logprobs, "k3") * mask).sum() / tokens).item(),
            "ratio_mean": ((ratio * mask).sum() / tokens).item(),
            "ratio_max": ratio.masked_fill(mask == 0, float("-inf")).max().item() if mask.any() else 1.0,
        }
        metrics["clip_fraction"] = metrics["clip_fraction_low"] + metrics["clip_fraction_high"]
    return loss, metrics


def truncated_importance_weights(
    logprobs: Tensor, sampler_logprobs: Tensor, cap: float, mask: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; TRL's ``vllm_importance_sampling_correction``, verl's rollout importance sampling): the
    tokens were drawn by a sampling engine with probabilities pi_sampler, the gradient is the trainer's under its own
    pi_old, and the two differ (other kernels, other precision, a KV cache). Reweight each token by

        w_t = min( pi_old(y_t) / pi_sampler(y_t),  C ) = min( exp(logprobs_t - sampler_logprobs_t),  C )

    The cap C bounds the variance that a token the sampler found far less likely than the trainer would add.

    Args:
        logprobs:         (B, T) log pi_old of the sampled tokens, recomputed by the trainer (no gradient).
        sampler_logprobs: (B, T) the sampling engine's log-probs of the same tokens.
        cap:              C > 0.
        mask:             (B, T) tokens that count, for the metrics (default all).
    Returns:
        (weights (B, T) without gradient, metrics): ``tis_weight_mean``, ``tis_capped_fraction`` (tokens whose
        weight the cap cut) and ``tis_logprob_gap`` (mean |logprobs - sampler_logprobs|, in nats).
    """
    with torch.no_grad():
        ratio = torch.exp(logprobs.float() - sampler_logprobs.float())  # (B, T)
        weights = ratio.clamp(max=cap)
        mask = torch.ones_like(ratio) if mask is None else mask.to(ratio.dtype)
        tokens = mask.sum().clamp(min=1)
        metrics = {
            "tis_weight_mean": ((weights * mask).sum() / tokens).item(),
            "tis_capped_fraction": (((ratio > cap).to(mask.dtype) * mask).sum() / tokens).item(),
            "tis_logprob_gap": (((logprobs - sampler_logprobs).abs() * mask).sum() / tokens).item(),
        }
    return weights, metrics


def value_loss(
    values: Tensor,
    returns: Tensor,
    mask: Tensor | None = None,
    old_values: Tensor | None = None,
    clip_eps: float | None = None,
    aggregation: str = "token_mean",
) -> tuple[Tensor, dict[str, float]]:
    """Squared-error loss of a learned baseline (the critic), optionally clipped around the old predictions.

        l_t = 1/2 (V_t - R_t)^2
        clipped (PPO2, Dhariwal et al. 2017, OpenAI Baselines):
        l_t = 1/2 max( (V_t - R_t)^2,  (V_old + clip(V_t - V_old, -eps, eps) - R_t)^2 )

    Args:
        values:     (B, T) or (B,) current predictions; carries the gradient.
        returns:    same shape, the targets (e.g. the ``returns`` of :func:`policygrad.advantages.gae`).
        mask:       same shape, default all ones.
        old_values: predictions when the data was collected; needed with ``clip_eps``.
        clip_eps:   None for the plain loss.
        aggregation: see :func:`aggregate`.
    Returns:
        (loss, metrics) with ``explained_variance`` = 1 - Var(R - V) / Var(R) (1 is perfect, <= 0 is no better than a
        constant) and, when clipped, ``value_clip_fraction``.
    """
    if values.dim() == 1:
        values, returns = values.unsqueeze(0), returns.unsqueeze(0)
        old_values = None if old_values is None else old_values.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if mask is None:
        mask = torch.ones_like(values)
    mask = mask.to(values.dtype)
    per_token = 0.5 * (values - returns) ** 2
    metrics: dict[str, float] = {}
    if clip_eps is not None:
        if old_values is None:
            raise ValueError("value_loss: clip_eps needs old_values")
        clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        clipped = 0.5 * (clipped_values - returns) ** 2
        with torch.no_grad():
            metrics["value_clip_fraction"] = (
                ((clipped > per_token).to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)
            ).item()
        per_token = torch.maximum(per_token, clipped)
    with torch.no_grad():
        selected = mask.bool()
        target, error = returns[selected], (returns - values)[selected]
        target_var = target.var() if target.numel() > 1 else target.new_zeros(())
        error_var = error.var() if error.numel() > 1 else error.new_zeros(())
        metrics["explained_variance"] = (1.0 - error_var / target_var).item() if target_var > 0 else float("nan")
    return aggregate(per_token, mask, aggregation), metrics
