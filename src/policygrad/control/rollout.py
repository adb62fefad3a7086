"""Sampling: step N vectorised environments T times with the current policy and keep what the update needs.

Letters: N environments, T steps per environment, O observation size; actions are (N, T) integers or (N, T, D) reals.
Rows first and time last, the layout of :func:`policygrad.advantages.gae` and of the language-model rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from policygrad.control.envs import EnvSpec, make_env

__all__ = ["Rollout", "Collector", "evaluate_policy"]


@dataclass
class Rollout:
    """One batch of experience, one row per environment, time last. ``rewards`` already include the truncation
    bootstrap (see Collector)."""

    obs: Tensor  # (N, T, O)
    actions: Tensor  # (N, T) or (N, T, D)
    logprobs: Tensor  # (N, T) log pi_old(a_t | s_t) when sampled
    values: Tensor  # (N, T) V(s_t) when sampled
    rewards: Tensor  # (N, T)
    dones: Tensor  # (N, T) 1 where the episode ended (terminated or truncated) after step t
    last_value: Tensor  # (N,) V of the observation after the last step
    episode_returns: list[float] = field(default_factory=list)  # undiscounted returns of episodes finished here
    episode_lengths: list[int] = field(default_factory=list)


class Collector:
    """Keeps the vectorised environment's current observations and running episode sums between batches."""

    def __init__(self, envs, spec: EnvSpec, gamma: float, seed: int):
        self.envs, self.spec, self.gamma = envs, spec, gamma
        self.obs, _ = envs.reset(seed=seed)  # seeds seed, seed + 1, ... one per copy
        self.running_return = np.zeros(envs.num_envs)
        self.running_length = np.zeros(envs.num_envs, dtype=np.int64)

    @torch.no_grad()
    def collect(self, policy, value_net, num_steps: int, generator: torch.Generator) -> Rollout:
        """Run ``num_steps`` steps in every environment.

        Termination versus truncation (Pardo et al. 2018, "Time Limits in Reinforcement Learning"): a terminated
        episode has no future, but one cut by a time limit does, so for a truncated step ``t`` we add
        ``gamma * V(s_{t+1})`` (the value of the final observation) to its reward and still mark it done. Then
        :func:`policygrad.advantages.gae` bootstraps it exactly without peeking into the next, unrelated episode.
        """
        n, family = self.envs.num_envs, policy.family
        dtype = next(policy.parameters()).dtype  # observations follow the networks (float32, or float64 in tests)
        obs_buf = torch.empty((n, num_steps, self.spec.obs_size), dtype=dtype)
        logp_buf, val_buf = torch.empty((n, num_steps), dtype=dtype), torch.empty((n, num_steps), dtype=dtype)
        rew_buf, done_buf = torch.empty((n, num_steps), dtype=dtype), torch.empty((n, num_steps), dtype=dtype)
        act_buf, episode_returns, episode_lengths = [], [], []
        for t in range(num_steps):
            obs = torch.as_tensor(self.obs, dtype=dtype)  # (N, O)
            params = policy(obs)
            actions = family.sample(params, generator)
            obs_buf[:, t], logp_buf[:, t], val_buf[:, t] = obs, family.log_prob(params, actions), value_net(obs)
            act_buf.append(actions)
            env_actions = actions.numpy()
            if self.spec.action_low is not None:  # the Gaussian is unbounded; the environment is not
                env_actions = np.clip(env_actions, self.spec.action_low, self.spec.action_high)
            self.obs, rewards, terminated, truncated, info = self.envs.step(env_actions)
            rew_buf[:, t] = torch.as_tensor(rewards, dtype=dtype)
            done = terminated | truncated
            done_buf[:, t] = torch.as_tensor(done, dtype=dtype)

            cut = truncated & ~terminated  # time limit reached: bootstrap from the state it stopped in
            if cut.any():
                final_obs = torch.as_tensor(np.stack(info["final_obs"][cut]), dtype=dtype)
                rew_buf[torch.as_tensor(cut), t] += self.gamma * value_net(final_obs)

            self.running_return += rewards
            self.running_length += 1
            if done.any():
                episode_returns += self.running_return[done].tolist()
                episode_lengths += self.running_length[done].tolist()
                self.running_return[done] = 0.0
                self.running_length[done] = 0
        last_value = value_net(torch.as_tensor(self.obs, dtype=dtype))  # (N,)
        return Rollout(
            obs_buf,
            torch.stack(act_buf, dim=1),  # (N, T) or (N, T, D)
            logp_buf,
            val_buf,
            rew_buf,
            done_buf,
            last_value,
            episode_returns,
            episode_lengths,
        )


@torch.no_grad()
def evaluate_policy(policy, spec: EnvSpec, episodes: int, seed: int) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes of the deterministic policy (argmax or mean action).

    Uses a fresh environment seeded ``seed, seed + 1, ...`` so the training environments' state is untouched.
    """
    env = make_env(spec.env_id)
    dtype = next(policy.parameters()).dtype
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            action = policy.family.mode(policy(torch.as_tensor(obs, dtype=dtype).unsqueeze(0)))[0].numpy()
            if spec.action_low is not None:
                action = np.clip(action, spec.action_low, spec.action_high)
            obs, reward, terminated, truncated, _ = env.step(action if spec.action_low is not None else int(action))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns
