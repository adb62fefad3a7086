"""One GRPO update: the per-batch loss and the optimiser
steps on one rollout. Pure of everything a run owns (folders, logs, checkpoints, signals): tensors, a model and an
optimiser in, metrics out. :mod:`policygrad.lm.trainer` runs the loop around it.

    loss = policy_loss(logprobs, advantages)  -  w_H * agg(H)  +  beta * agg(KL_est(logprobs, ref_logprobs))

Letters as in :mod:`policygrad.lm.rollout`: N rows (B prompts x G completions), T completion tokens.

Data parallel (:mod:`policygrad.distributed`): each rank holds N / W of the rows. The weights of its micro-batches
are taken against the WHOLE batch's count (tokens, non-empty rows or rows, summed over the ranks), so the ranks'
accumulated gradients sum to the one-process gradient; they are summed before clipping, and so are the metrics.
Under FSDP2 (:mod:`policygrad.lm.fsdp`) the backward passes reduce-scatter them instead, each rank keeping its shard.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from policygrad.distributed import World
from policygrad.lm import fsdp
from policygrad.lm.config import GRPOConfig
from policygrad.lm.lora import recomputing
from policygrad.lm.rollout import Rollout, autocast_context, completion_logprobs, micro_batches, unshared_logprobs
from policygrad.losses import aggregate, policy_loss
from policygrad.regularizers import kl

__all__ = ["grpo_loss", "micro_batch_share", "update"]


# --------------------------------------------------------------------------------------------------------------
# The loss and the update
# --------------------------------------------------------------------------------------------------------------


def grpo_loss(
    logprobs: Tensor,
    entropies: Tensor,
    mask: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    entropy_weight: float = 0.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "token_mean",
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    max_len: int | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The per-batch objective, to minimise:

        loss = L_pg  -  w_H * agg(H)  +  beta * agg(KL_est(logprobs, ref_logprobs))

    ``L_pg`` is :func:`policygrad.losses.policy_loss` (REINFORCE without ``old_logprobs``, the clipped surrogate
    with them), ``agg`` the same token/sequence aggregation, ``KL_est`` one of the per-token estimators of
    :func:`policygrad.regularizers.kl`. Pure: tensors in, ``(loss, metrics)`` out.

    Args:
        logprobs:     (N, T) log pi_theta of the completion tokens; carries the gradient.
        entropies:    (N, T) entropy of pi_theta at each completion position (with grad if w_H > 0).
        mask:         (N, T) completion mask.
        advantages:   (N,) one per completion.
        old_logprobs: (N, T) sampling-policy log-probs, or None for REINFORCE.
        ref_logprobs: (N, T) reference-model log-probs, or None for no KL term.
        is_weights:   (N, T) truncated importance weights of the policy term (``tis_cap``), or None.
    Returns:
        (loss, metrics) with metrics ``pg_loss``, ``entropy``, ``kl`` (when a reference is given) and the
        clip/ratio metrics of policy_loss.
    """
    pg_loss, metrics = policy_loss(
        logprobs, advantages, mask, old_logprobs, clip_eps_low, clip_eps_high, aggregation, max_len, is_weights
    )
    mean_entropy = aggregate(entropies, mask, aggregation, max_len)
    loss = pg_loss - entropy_weight * mean_entropy if entropy_weight else pg_loss
    metrics = {**metrics, "pg_loss": pg_loss.item(), "entropy": mean_entropy.item()}
    if ref_logprobs is not None:
        mean_kl = aggregate(kl(logprobs, ref_logprobs, kl_estimator), mask, aggregation, max_len)
        loss = loss + kl_coef * mean_kl
        metrics["kl"] = mean_kl.item()
    return loss, metrics


def batch_count(mask: Tensor, aggregation: str) -> float:
    """What an aggregation divides by, for the rows of ``mask`` (M, T): their tokens (token_mean), non-empty rows
    (sequence_mean) or rows (constant)."""
    if aggregation == "token_mean":
        return float(mask.sum().item())
    if aggregation == "sequence_mean":
        return float((mask.sum(-1) > 0).sum().item())
    return float(mask.shape[0])


def micro_batch_share(rows_mask: Tensor, batch_mask: Tensor, aggregation: str, total: float | None = None) -> float:
    """The weight of one micro-batch's aggregated loss so that the weighted sum equals the full batch's loss.

        token_mean:     tokens(micro) / tokens(batch)
        sequence_mean:  non-empty rows(micro) / non-empty rows(batch)
        constant:       rows(micro) / rows(batch)

    Averaging micro-batch losses with equal weights would make a token's weight depend on which micro-batch it
    landed in; with these weights gradient accumulation gives exactly the full-batch gradient. ``total`` is the
    batch's count (:func:`batch_count`) when the batch is more than ``batch_mask``: every rank's rows.
    """
    total = batch_count(batch_mask, aggregation) if total is None else total
    return batch_count(rows_mask, aggregation) / max(total, 1.0)


def update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    advantages: Tensor,
    ref_logprobs: Tensor | None,
    entropy_weight: float,
    config: GRPOConfig,
    autocast_dtype: torch.dtype | None = None,
    world: World | None = None,
    kl_coef: float | None = None,
    is_weights: Tensor | None = None,
) -> dict[str, float]:
    """``config.updates_per_batch`` optimiser steps on one rollout, each accumulating gradients over micro-batches.
    ``kl_coef`` is this batch's beta (``config.kl_weight`` of its rewards); None takes ``config.kl_coef``.
    ``is_weights`` (N, T): the truncated importance weights of the sampled tokens (``tis_cap``), or None.

    Returns the metrics of the LAST optimiser step (weighted over its micro-batches), plus ``grad_norm`` (before
    clipping) and ``loss``; and ``skipped_updates`` = 1 when a non-finite loss or gradient norm stopped it before
    ``optimizer.step`` (earlier, finite updates of the same batch stay applied). With a data-parallel ``world``,
    ``rollout`` and ``advantages`` are this rank's rows and the gradients and metrics are the whole batch's.
    """
    world = world or World()
    sharded = fsdp.is_sharded(model)  # FSDP2: gradients reduce-scattered in the backward, averaged (so scaled by W)
    if sharded:  # the same passes on every rank: one whose completions are all 1 token would skip the second
        rollout, ref_logprobs, is_weights = fsdp.same_width(rollout, ref_logprobs, is_weights, world)
    device = rollout.completion_ids.device
    mask = rollout.completion_mask  # (N, T)
    n = mask.shape[0]
    total = world.sum(batch_count(mask, config.aggregation))  # the whole batch's, over every rank
    advantages = advantages.to(device=device, dtype=torch.float32)  # (N,)
    clipped = config.updates_per_batch > 1  # one step on fresh samples: ratio is 1, REINFORCE is the same gradient
    if clipped and rollout.logprobs is None:
        raise ValueError("several updates per batch need the sampling log-probs: sample(..., score_tokens=True)")
    scale = fsdp.loss_scale(model, world)
    metrics: dict[str, float] = {}
    for _ in range(config.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        metrics = {}
        for rows in micro_batches(n, config.micro_batch_size):
            share = micro_batch_share(mask[rows], mask, config.aggregation, total)
            if share == 0 and not sharded:
                continue  # no tokens that count (all-empty completions): nothing to learn from these rows
            with autocast_context(device, autocast_dtype), recomputing(model) as recompute:
                if recompute:
                    logprobs, entropies = unshared_logprobs(model, temperature=config.temperature, **rollout.rows(rows))
                else:  # FSDP: the embeddings looked up inside the forward passes (see completion_logprobs)
                    logprobs, entropies = completion_logprobs(
                        model, temperature=config.temperature, embed_once=not sharded, **rollout.rows(rows)
                    )  # (M, T) each, M rows in this micro-batch
            if share == 0:  # FSDP: the backward's reduce-scatters are collectives; a zero, finite gradient
                (logprobs.sum() * 0.0).backward()
                continue
            loss, micro = grpo_loss(
                logprobs,
                entropies,
                mask[rows],
                advantages[rows],
                old_logprobs=rollout.logprobs[rows] if clipped else None,
                ref_logprobs=ref_logprobs[rows] if ref_logprobs is not None else None,
                entropy_weight=entropy_weight,
                kl_coef=config.kl_coef if kl_coef is None else kl_coef,
                kl_estimator=config.kl_estimator,
                aggregation=config.aggregation,
                clip_eps_low=config.clip_eps_low,
                clip_eps_high=config.clip_eps_high,
                max_len=config.max_new_tokens,
                is_weights=is_weights[rows] if is_weights is not None else None,
            )
            (loss * (share * scale)).backward()
            micro["loss"] = loss.item()
            for key, value in micro.items():
                metrics[key] = metrics.get(key, 0.0) + share * value
        if not sharded:
            world.all_reduce_gradients(model.parameters())  # each rank's share of the batch gradient, summed
        metrics = world.sum_metrics(metrics)  # likewise the share-weighted metrics
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        metrics["grad_norm"] = fsdp.grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        # reliability (issue 6, docs/reliability.md): a non-finite loss or gradient never reaches the weights or
        # AdamW's moments; the loop counts skipped updates and stops after max_bad_steps in a row. Under torchrun
        # the gradient and the loss are the summed ones, so every rank takes the same decision.
        if not (math.isfinite(metrics["grad_norm"]) and math.isfinite(metrics.get("loss", 0.0))):
            optimizer.zero_grad(set_to_none=True)
            metrics["skipped_updates"] = 1.0
            break
        optimizer.step()
    if ref_logprobs is not None:
        metrics["kl_weight"] = float(config.kl_coef if kl_coef is None else kl_coef)  # beta, as the loss used it
    return metrics
