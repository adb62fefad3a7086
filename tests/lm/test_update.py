"""policygrad.lm.update: the GRPO loss by hand, micro-batch shares, the update over micro-batches."""

from __future__ import annotations

import math

import pytest
import torch

from policygrad.advantages import group_advantages
from policygrad.lm.config import GRPOConfig
from policygrad.lm.rollout import sample
from policygrad.lm.update import grpo_loss, micro_batch_share

pytestmark = pytest.mark.exact

LOGPROBS = [[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0], [-1.5, -0.2, -0.7], [-2.0, -1.0, -9.0]]
MASK = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
REWARDS = [1.0, 0.0, 0.0, 1.0]  # one group of G = 4


def test_grpo_loss_by_hand():
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    mask = torch.tensor(MASK)
    advantages = group_advantages(torch.tensor(REWARDS), 4)
    entropies = torch.full((4, 3), 2.0)
    ref = torch.tensor(LOGPROBS) - 0.1  # d = logprobs - ref = 0.1 everywhere
    loss, metrics = grpo_loss(
        logprobs, entropies, mask, advantages, ref_logprobs=ref, entropy_weight=0.01, kl_coef=0.5, kl_estimator="k3"
    )
    tokens = sum(map(sum, MASK))
    pg = (
        -sum(advantages[i].item() * LOGPROBS[i][t] for i in range(4) for t in range(3) if MASK[i][t]) / tokens
    )  # token_mean REINFORCE
    k3 = math.expm1(-0.1) + 0.1
    assert metrics["pg_loss"] == pytest.approx(pg, rel=1e-6)
    assert metrics["entropy"] == pytest.approx(2.0)
    assert metrics["kl"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(pg - 0.01 * 2.0 + 0.5 * k3, rel=1e-6)
    loss.backward()
    # d loss / d logprob_it = -A_i / tokens + beta * (1 - exp(-d)) / tokens on counted tokens, 0 elsewhere
    for i in range(4):
        for t in range(3):
            grad = (-advantages[i].item() + 0.5 * (1 - math.exp(-0.1))) / tokens if MASK[i][t] else 0.0
            assert logprobs.grad[i, t].item() == pytest.approx(grad, abs=1e-7)


def test_clipped_loss_at_ratio_one_has_the_reinforce_gradient():
    advantages = group_advantages(torch.tensor(REWARDS), 4)
    mask = torch.tensor(MASK)
    grads = []
    for old in (None, torch.tensor(LOGPROBS)):
        logprobs = torch.tensor(LOGPROBS, requires_grad=True)
        loss, _ = grpo_loss(logprobs, torch.zeros(4, 3), mask, advantages, old_logprobs=old)
        loss.backward()
        grads.append(logprobs.grad)
    assert torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(aggregation):
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 7, requires_grad=True)  # (N, T, V)
    tokens = torch.randint(0, 7, (6, 5))
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    )  # one empty row
    advantages = torch.randn(6)

    def loss_of(rows):
        logprobs = torch.log_softmax(logits[rows], -1).gather(2, tokens[rows].unsqueeze(-1)).squeeze(-1)
        entropies = -(torch.softmax(logits[rows], -1) * torch.log_softmax(logits[rows], -1)).sum(-1)
        loss, _ = grpo_loss(
            logprobs, entropies, mask[rows], advantages[rows], entropy_weight=0.1, aggregation=aggregation, max_len=5
        )
        return loss

    full = torch.autograd.grad(loss_of(slice(0, 6)), logits)[0]
    accumulated = sum(
        micro_batch_share(mask[rows], mask, aggregation) * loss_of(rows) for rows in (slice(0, 4), slice(4, 6))
    )
    assert torch.allclose(torch.autograd.grad(accumulated, logits)[0], full, atol=1e-6)


def test_update_with_micro_batches_equals_one_full_batch(eager_eos_model):
    """Gradient accumulation in the trainer's update gives the full-batch step, for every aggregation."""
    import copy

    from policygrad.lm.update import update

    model, tokenizer = eager_eos_model
    torch.manual_seed(1)
    rollout = sample(model, tokenizer, ["hi", "a longer prompt"], group_size=3, max_new_tokens=10)
    assert len(set(rollout.completion_lengths.tolist())) > 1  # unequal lengths make the weighting matter
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5, 2.0])
    for aggregation in ("token_mean", "sequence_mean", "constant"):
        steps = []
        for micro in (2, 6):
            copy_ = copy.deepcopy(model)
            optimizer = torch.optim.SGD(copy_.parameters(), lr=1.0)
            config = GRPOConfig(
                micro_batch_size=micro,
                aggregation=aggregation,
                max_new_tokens=10,
                entropy_coef=0.01,
                max_grad_norm=0.0,
                group_size=3,
            )
            metrics = update(copy_, optimizer, rollout, advantages, None, 0.01, config)
            steps.append(([p.detach().clone() for p in copy_.parameters()], metrics))
        (params_micro, metrics_micro), (params_full, metrics_full) = steps
        for a, b in zip(params_micro, params_full):
            assert torch.allclose(a, b, atol=1e-5), aggregation
        assert metrics_micro["loss"] == pytest.approx(metrics_full["loss"], rel=1e-4, abs=1e-6)
        assert metrics_micro["grad_norm"] == pytest.approx(metrics_full["grad_norm"], rel=1e-4)
