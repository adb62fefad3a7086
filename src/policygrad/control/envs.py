"""Gymnasium environments: make and check them, turning every user mistake into one UsageError line.

The only module of ``control/`` besides the rollout that touches gymnasium directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.wrappers import FlattenObservation

from policygrad.errors import UsageError

__all__ = ["EnvSpec", "inspect_env", "make_vector_env", "make_env"]


@dataclass(frozen=True)
class EnvSpec:
    """What the networks need to know about an environment."""

    env_id: str
    obs_size: int
    action_size: int  # number of actions (Discrete) or action dimensions (Box)
    family: str  # "categorical" or "gaussian"
    action_low: np.ndarray | None  # Box bounds, to clip sampled actions; None for Discrete
    action_high: np.ndarray | None


def make_env(env_id: str, **kwargs) -> gym.Env:
    """``gymnasium.make`` with an unknown or broken id reported as ``--env: ...``; an environment whose observations
    are Discrete states (FrozenLake, Taxi, CliffWalking) is wrapped to give them one-hot, as a flat Box of 0s and 1s
    (``gymnasium.wrappers.FlattenObservation``), which the networks take like any other observation."""
    try:
        env = gym.make(env_id, **kwargs)
        return FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Discrete) else env
    except gym.error.Error as err:
        raise UsageError("--env", f"cannot make {env_id!r}: {str(err).splitlines()[0]}") from None
    except (ModuleNotFoundError, ImportError) as err:
        raise UsageError("--env", f"{env_id!r} needs a package that is not installed: {err}") from None


def inspect_env(env_id: str, policy: str = "auto") -> EnvSpec:
    """Check that the environment has flat Box (or Discrete, made one-hot) observations and actions ``policy`` can
    produce.

    Args:
        env_id: a Gymnasium id.
        policy: "auto", "categorical" or "gaussian" (the ``--policy`` flag).
    Raises:
        UsageError: unknown id, unsupported spaces, or a policy that cannot act in the action space (a categorical
            policy on continuous actions or a Gaussian on discrete ones).
    """
    env = make_env(env_id)
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise UsageError(
            "--env", f"{env_id} has observations {obs_space}; only flat Box and Discrete observations are supported"
        )
    if isinstance(act_space, gym.spaces.Discrete):
        kind, size, low, high = "categorical", int(act_space.n), None, None
    elif isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        kind, size, low, high = "gaussian", int(act_space.shape[0]), act_space.low, act_space.high
    else:
        raise UsageError("--env", f"{env_id} has actions {act_space}; only Discrete and flat Box actions are supported")
    if policy not in ("auto", kind):
        needs = "Discrete" if policy == "categorical" else "Box (continuous)"
        raise UsageError("--policy", f"{policy} needs {needs} actions, but {env_id} has {act_space}; use --policy auto")
    return EnvSpec(env_id, int(obs_space.shape[0]), size, kind, low, high)


def make_vector_env(env_id: str, num_envs: int) -> SyncVectorEnv:
    """``num_envs`` copies stepped in this process (reset them with ``reset(seed=...)`` before use).

    Same-step autoreset: when an episode ends, ``step`` returns the first observation of the next episode and puts the
    last observation of the finished one in ``info["final_obs"]``, which a truncated episode needs for its bootstrap
    value. Synchronous stepping beats subprocesses for environments as cheap as CartPole (no pickling per step).
    """
    return SyncVectorEnv([lambda: make_env(env_id) for _ in range(num_envs)], autoreset_mode=AutoresetMode.SAME_STEP)
