"""Shared fixtures of the control tests: a tiny deterministic environment whose episodes end by termination and by
a time limit in a known pattern, registered with Gymnasium under ``PolicygradTestChain-v0``."""

from __future__ import annotations

import importlib.util

CHAIN_ID = "PolicygradTestChain-v0"
CHAIN_TIME_LIMIT = 3

if importlib.util.find_spec("gymnasium") is not None:  # without it the tests that need it skip themselves
    import gymnasium as gym
    import numpy as np

    class ChainEnv(gym.Env):
        """Reward 1 per step whatever the action; observation [10 * episode + step].

        Even-numbered episodes (0, 2, ...) terminate after 2 steps; odd ones would run forever, so the time limit
        (3 steps) truncates them. V(s) = obs[0] then gives every state a distinct, known value.
        """

        observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
        action_space = gym.spaces.Discrete(2)

        def __init__(self):
            self.episode, self.t = -1, 0

        def _obs(self):
            return np.array([10.0 * self.episode + self.t], dtype=np.float32)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.episode, self.t = self.episode + 1, 0
            return self._obs(), {}

        def step(self, action):
            self.t += 1
            terminated = self.episode % 2 == 0 and self.t == 2
            return self._obs(), 1.0, terminated, False, {}

    if CHAIN_ID not in gym.registry:
        gym.register(id=CHAIN_ID, entry_point=ChainEnv, max_episode_steps=CHAIN_TIME_LIMIT)
