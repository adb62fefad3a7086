"""The advantage estimators and entropy weights of policygrad.variants built from a GRPOConfig: the
formulas, how the moving average starts (the same in the bandit), one source of the names."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from policygrad.advantages import group_advantages
from policygrad.lm.config import GRPOConfig
from policygrad.variants import (
    ADVANTAGES,
    AGGREGATIONS,
    BANDIT_BASELINES,
    ENTROPY_WEIGHTS,
    KL_ESTIMATORS,
    REWARD_SCALES,
    build,
)

pytestmark = pytest.mark.exact

LOGPROBS = [[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0], [-1.5, -0.2, -0.7], [-2.0, -1.0, -9.0]]
MASK = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
REWARDS = [1.0, 0.0, 0.0, 1.0]  # one group of G = 4


def test_group_advantages_by_hand():
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # mean 0.5, Bessel std sqrt(4 * 0.25 / 3)
    advantages = group_advantages(torch.tensor(REWARDS), 4)
    assert torch.allclose(advantages, torch.tensor([a, -a, -a, a]), atol=1e-6)


def test_advantage_variants_by_name():
    config = GRPOConfig(group_size=2, baseline_decay=0.5)
    rewards = torch.tensor([1.0, 0.0, 3.0, float("nan")])
    grpo = build(ADVANTAGES, "grpo", config)(rewards)
    assert torch.allclose(grpo, torch.tensor([0.5 / (0.5**0.5 + 1e-4), -0.5 / (0.5**0.5 + 1e-4), 0, 0]))
    # the options reach the formula: (r - group mean) / (std + eps), std over the group, the batch or nothing
    four = torch.tensor([1.0, 0.0, 3.0, 1.0])  # batch std sqrt(19/12), group stds sqrt(1/2) and sqrt(2)
    for scale, divisor in (
        ("group", [0.5**0.5 + 0.5] * 2 + [2**0.5 + 0.5] * 2),
        ("batch", [(19 / 12) ** 0.5 + 0.5] * 4),
        ("none", [1.0] * 4),
    ):
        options = GRPOConfig(group_size=2, scale_rewards=scale, advantage_eps=0.5)
        advantages = build(ADVANTAGES, "grpo", options)(four)
        assert torch.allclose(advantages, torch.tensor([0.5, -0.5, 1.0, -1.0]) / torch.tensor(divisor)), scale
    rloo = build(ADVANTAGES, "rloo", config)(rewards)
    assert torch.allclose(rloo, torch.tensor([1.0, -1.0, 0.0, 0.0]))  # a group with one valid reward gives 0
    reinforce = build(ADVANTAGES, "reinforce", config)
    reinforce.restore({"mean": torch.tensor(1.0)})
    assert torch.allclose(reinforce(rewards), torch.tensor([0.0, -1.0, 2.0, 0.0]))  # against the OLD baseline
    assert reinforce.state()["mean"].item() == pytest.approx(0.5 * 1.0 + 0.5 * (4.0 / 3))
    dynamic = GRPOConfig(entropy_weight="dynamic", entropy_coef=1e-3, entropy_max_weight=1.0)
    assert build(ENTROPY_WEIGHTS, "dynamic", dynamic)(torch.tensor([0.0, 1.0])) == pytest.approx(1e-3 / (0.5 + 0.01))
    assert build(ENTROPY_WEIGHTS, "constant", dynamic)(torch.tensor([0.0, 1.0])) == 1e-3


def test_the_moving_average_baseline_starts_from_the_first_batch_mean_in_the_bandit_and_the_trainer():
    """One estimator class serves both (policygrad.variants): the first batch is centred on its own mean, later
    batches on the moving average of past batches only."""
    config = GRPOConfig(group_size=2, advantage="reinforce", baseline_decay=0.5)
    lm = build(ADVANTAGES, "reinforce", config)
    bandit = build(BANDIT_BASELINES, "mean", config)
    first, second = torch.tensor([1.0, 3.0, 5.0, 7.0]), torch.tensor([0.0, 0.0, 8.0, 8.0])
    for estimator in (lm, bandit):
        assert torch.equal(estimator(first), torch.tensor([-3.0, -1.0, 1.0, 3.0]))  # b_0 = mean(first) = 4
        assert torch.equal(estimator(second), torch.tensor([-4.0, -4.0, 4.0, 4.0]))  # b_1 = 0.5 * 4 + 0.5 * 4 = 4
        assert estimator.state()["mean"].item() == 0.5 * 4 + 0.5 * 4
    rows = build(BANDIT_BASELINES, "mean", config)(torch.stack([first, first + 1]))  # (S, N): one baseline per row
    assert torch.equal(rows, torch.tensor([[-3.0, -1.0, 1.0, 3.0]] * 2))


def test_variant_names_have_one_source():
    """The config's choices are the registries' names: a variant added to policygrad.variants is a valid choice."""
    hints = typing.get_type_hints(GRPOConfig)
    for field, registry in (
        ("advantage", ADVANTAGES),
        ("entropy_weight", ENTROPY_WEIGHTS),
        ("scale_rewards", REWARD_SCALES),
        ("aggregation", AGGREGATIONS),
        ("kl_estimator", KL_ESTIMATORS),
    ):
        assert typing.get_args(hints[field]) == registry.names, field
        for name in registry.names:
            assert callable(registry[name]), (field, name)  # every entry imports
