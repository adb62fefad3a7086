"""GAE on hand-computed episodes, and the rollout's handling of termination versus time-limit truncation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("gymnasium")

from policygrad.advantages import gae  # noqa: E402
from policygrad.control.envs import inspect_env, make_vector_env  # noqa: E402
from policygrad.control.policies import Policy  # noqa: E402
from policygrad.control.rollout import Collector  # noqa: E402

CHAIN_ID = "PolicygradTestChain-v0"  # registered by conftest.py: terminates after 2 steps, then truncated after 3
GAMMA, LAM = 0.9, 0.8


class ObsValue(nn.Module):
    """V(s) = obs[0]: a known baseline so every number below can be worked out by hand."""

    def forward(self, obs):
        return obs[:, 0]


def _collect(num_steps: int):
    spec = inspect_env(CHAIN_ID)
    envs = make_vector_env(CHAIN_ID, num_envs=1)
    collector = Collector(envs, spec, GAMMA, seed=0)
    policy = Policy(spec.obs_size, spec.action_size, (4,), spec.family)
    rollout = collector.collect(policy, ObsValue(), num_steps, torch.Generator().manual_seed(0))
    envs.close()
    return rollout


@pytest.mark.exact
def test_rollout_marks_termination_and_bootstraps_truncation():
    # steps: episode 0 states 0, 1 (terminated after the 2nd step); episode 1 states 10, 11, 12 (cut by the time
    # limit after the 3rd; the state it stopped in is 13); episode 2 state 20
    rollout = _collect(6)
    assert rollout.obs[0, :, 0].tolist() == [0, 1, 10, 11, 12, 20]
    assert rollout.values[0].tolist() == [0, 1, 10, 11, 12, 20]
    assert rollout.dones[0].tolist() == [0, 1, 0, 0, 1, 0]
    # the truncated step's reward carries gamma * V(s_truncated) = 0.9 * 13; the terminated one carries nothing
    assert torch.allclose(rollout.rewards[0], torch.tensor([1, 1, 1, 1, 1 + GAMMA * 13, 1.0]))
    assert rollout.last_value.tolist() == [21.0]  # the observation after the last step
    assert rollout.episode_returns == [2.0, 3.0] and rollout.episode_lengths == [2, 3]


@pytest.mark.exact
def test_gae_on_the_collected_episodes_matches_hand_computation():
    rollout = _collect(6)
    advantages, returns = gae(rollout.rewards, rollout.values, rollout.dones, rollout.last_value, GAMMA, LAM)
    g, gl = GAMMA, GAMMA * LAM
    # TD errors delta_t = r_t + gamma * (1 - d_t) * V_{t+1} - V_t, worked out per episode
    d0 = 1 + g * 1 - 0  # episode 0, state 0 -> 1
    d1 = 1 - 1  # terminated: no future value
    d2 = 1 + g * 11 - 10
    d3 = 1 + g * 12 - 11
    d4 = 1 + g * 13 - 12  # truncated: bootstrapped from V(13), not from the next episode's V(20)
    d5 = 1 + g * 21 - 20  # unfinished: bootstrapped from last_value
    expected = torch.tensor([d0 + gl * d1, d1, d2 + gl * (d3 + gl * d4), d3 + gl * d4, d4, d5])
    assert torch.allclose(advantages[0], expected, atol=1e-5)
    assert torch.allclose(returns[0], expected + rollout.values[0], atol=1e-5)


@pytest.mark.exact
def test_gae_with_lambda_one_is_the_discounted_return_minus_the_baseline():
    rollout = _collect(6)
    advantages, returns = gae(rollout.rewards, rollout.values, rollout.dones, rollout.last_value, GAMMA, 1.0)
    g = GAMMA
    # Monte Carlo returns per episode: the truncated episode ends in g * V(13), the unfinished one in g * V(21)
    mc = torch.tensor([1 + g, 1, 1 + g + g**2 * (1 + g * 13), 1 + g * (1 + g * 13), 1 + g * 13, 1 + g * 21])
    assert torch.allclose(returns[0], mc, atol=1e-4)
    assert torch.allclose(advantages[0], mc - rollout.values[0], atol=1e-4)


@pytest.mark.exact
def test_truncation_bootstrap_is_per_environment():
    # two copies in lockstep see the same episodes; each must bootstrap its own truncated step
    spec = inspect_env(CHAIN_ID)
    envs = make_vector_env(CHAIN_ID, num_envs=2)
    rollout = Collector(envs, spec, GAMMA, seed=0).collect(
        Policy(1, 2, (4,), "categorical"), ObsValue(), 6, torch.Generator()
    )
    envs.close()
    assert rollout.rewards.shape == (2, 6) and rollout.obs.shape == (2, 6, 1) and rollout.actions.shape == (2, 6)
    assert torch.allclose(rollout.rewards[0], rollout.rewards[1])
    assert torch.allclose(rollout.rewards[:, 4], torch.full((2,), 1 + GAMMA * 13))
