"""policygrad.lm.metrics: what a step logs."""

from __future__ import annotations

import doctest

import pytest
import torch

from policygrad.lm import metrics
from policygrad.lm.metrics import zero_spread_fraction

pytestmark = pytest.mark.exact

NAN = float("nan")


def test_docstrings_run():
    assert doctest.testmod(metrics).failed == 0


@pytest.mark.parametrize(
    "rewards, group_size, expected",
    [
        ([0.0, 0.0, 0.0, 0.0], 2, 1.0),  # every group flat
        ([0.0, 1.0, 1.0, 0.0], 2, 0.0),  # every group has a spread
        ([0.3, 0.3, 0.3, 0.3, 0.3, 0.9], 3, 0.5),  # groups of 3: the first flat, the second not
        ([1.0, NAN, 0.0, 1.0], 2, 0.5),  # one valid reward: no preference either
        ([NAN, NAN, 0.0, 0.0], 2, 1.0),
        ([0.1 + 0.2, 0.3, 0.5, 0.5], 2, 0.5),  # 0.30000000000000004 vs 0.3: a spread, however small
    ],
)
def test_zero_spread_fraction_by_hand(rewards, group_size, expected):
    assert zero_spread_fraction(torch.tensor(rewards, dtype=torch.float64), group_size) == expected


def test_a_flat_group_is_one_whose_grpo_advantages_are_all_zero():
    """The metric counts exactly the groups GRPO's advantages leave at 0."""
    from policygrad.advantages import group_advantages

    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (64 * 4,), generator=generator).double()  # binary rewards: many flat groups
    flat = (group_advantages(rewards, 4).view(-1, 4) == 0).all(-1)
    assert zero_spread_fraction(rewards, 4) == flat.double().mean().item()
