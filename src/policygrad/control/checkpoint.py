"""Saved policies: a state_dict plus the facts needed to rebuild the network, in one torch file read back with
``weights_only=True`` (no arbitrary unpickling, so a downloaded file cannot run code). And training checkpoints for
``--resume`` (``checkpoints/step-N`` of a run folder, :func:`policygrad.runs.checkpoint_dir`): networks, optimisers,
random generators and the environments' state, written crash-safe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policygrad import checkpointing
from policygrad.control.policies import Policy
from policygrad.errors import UsageError, first_line

__all__ = ["save_policy", "load_policy", "env_state", "set_env_state", "save_training", "load_training"]

FORMAT = "policygrad.control.policy/1"


def save_policy(
    path: Path, policy: Policy, env_id: str, obs_size: int, action_size: int, hidden: tuple[int, ...], algo: str
) -> None:
    """Write the policy's weights and metadata (plain strings, ints and lists only) to ``path``."""
    metadata = {
        "format": FORMAT,
        "env": env_id,
        "algo": algo,
        "family": policy.family_name,
        "obs_size": obs_size,
        "action_size": action_size,
        "hidden": list(hidden),
    }
    torch.save(
        {"metadata": metadata, "state_dict": {k: v.detach().clone() for k, v in policy.state_dict().items()}}, path
    )


def load_policy(path: Path) -> tuple[Policy, dict]:
    """Rebuild a policy saved by :func:`save_policy`; any unreadable or foreign file is a ``--eval`` UsageError."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        metadata = saved["metadata"]
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format is {metadata.get('format')!r}, expected {FORMAT!r}")
        policy = Policy(
            int(metadata["obs_size"]),
            int(metadata["action_size"]),
            tuple(metadata["hidden"]),
            metadata["family"],
            dtype=torch.float32,
        )
        policy.load_state_dict(saved["state_dict"])
    except Exception as err:  # a truncated download, a different file: one line, not a traceback
        raise UsageError("--eval", f"{path} is not a policy saved by policygrad control ({first_line(err)})") from None
    return policy.eval(), metadata


# --------------------------------------------------------------------------------------------------------------
# Training checkpoints, for --resume (see docs/reliability.md)
# --------------------------------------------------------------------------------------------------------------

NETWORKS = "networks.safetensors"
TRAINER_STATE = "trainer_state.pt"
ENV_STATE = "env_state.json"

# attributes that describe an environment rather than hold its state (spaces, spec, wrappers' settings), or that
# are handled on their own (the random generator)
_NOT_STATE = {
    "env",
    "spec",
    "metadata",
    "render_mode",
    "action_space",
    "observation_space",
    "_action_space",
    "_observation_space",
    "_metadata",
    "_cached_spec",
    "_saved_kwargs",
    "_np_random",
    "_previous_data",
}


def _plain(value: Any) -> tuple[bool, Any]:
    """(True, a JSON form) for numbers, strings, None, NumPy arrays and lists/tuples/dicts of them; (False, None) for
    anything else (an object whose state we cannot see, such as a physics engine's)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True, value
    if isinstance(value, np.generic):
        return True, value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return True, {"__ndarray__": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return all(ok for ok, _ in items), {"__seq__": [v for _, v in items], "tuple": isinstance(value, tuple)}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {"__dict__": {k: v for k, (_, v) in items.items()}}
    return False, None


def _unplain(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"]).reshape(value["shape"])
        if "__seq__" in value:
            items = [_unplain(v) for v in value["__seq__"]]
            return tuple(items) if value["tuple"] else items
        return {k: _unplain(v) for k, v in value["__dict__"].items()}
    return value


def _layers(env: Any) -> list[Any]:
    layers = [env]
    while hasattr(layers[-1], "env"):
        layers.append(layers[-1].env)
    return layers


def env_state(envs: Any) -> dict[str, Any] | None:
    """The state of every copy of a ``SyncVectorEnv``: each wrapper's and the environment's own attributes and its
    random generator, as JSON values; None when some copy keeps state we cannot see (MuJoCo, Box2D: native objects),
    in which case a resume cannot continue its episodes exactly.

    Classic-control environments (CartPole, Pendulum, Acrobot, MountainCar) keep everything in plain attributes.
    """
    copies = []
    for env in envs.envs:
        layers = []
        for layer in _layers(env):
            attributes = {}
            for name, value in vars(layer).items():
                if name in _NOT_STATE:
                    continue
                ok, plain = _plain(value)
                if not ok:
                    return None
                attributes[name] = plain
            rng = getattr(layer, "_np_random", None)
            layers.append({"attributes": attributes, "rng": rng.bit_generator.state if rng is not None else None})
        copies.append(layers)
    return {"copies": copies}


def set_env_state(envs: Any, state: dict[str, Any]) -> None:
    """Put back what :func:`env_state` saved into freshly made copies of the same environment."""
    for env, layers in zip(envs.envs, state["copies"]):
        for layer, saved in zip(_layers(env), layers):
            for name, value in saved["attributes"].items():
                setattr(layer, name, _unplain(value))
            if saved["rng"] is not None:
                generator = getattr(layer, "_np_random", None)
                if generator is None:
                    generator = np.random.Generator(getattr(np.random, saved["rng"]["bit_generator"])())
                    layer._np_random = generator
                generator.bit_generator.state = saved["rng"]


def save_training(
    folder: Path,
    step: int,
    networks: dict[str, torch.Tensor],
    state: dict[str, Any],
    environments: dict[str, Any] | None,
) -> Path:
    """One crash-safe checkpoint (see :mod:`policygrad.checkpointing`): the networks' weights in safetensors, the
    optimisers, generators and counters in a torch file of tensors and plain values (``step``: the steps done), the
    environments in JSON."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().clone() for k, v in networks.items()}, str(tmp / NETWORKS))
        torch.save({**state, "step": step}, tmp / TRAINER_STATE)
        # plain writes: the folder itself goes into place atomically (checkpointing.save_atomic)
        (tmp / ENV_STATE).write_text(json.dumps({"exact": environments is not None, "state": environments}))

    return checkpointing.save_atomic(folder, write, step)


def load_training(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """What :func:`save_training` wrote: (networks, state, environments or None). Nothing is unpickled: safetensors,
    ``torch.load(weights_only=True)`` and JSON."""
    from safetensors.torch import load_file

    try:
        networks = load_file(str(folder / NETWORKS))
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        environments = json.loads((folder / ENV_STATE).read_text())
    except Exception as err:  # checked by the manifest already; this is a foreign or tampered file
        raise UsageError("--resume", f"{folder} cannot be read safely ({first_line(err)})") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(environments, dict):
        raise UsageError("--resume", f"{folder} is not a policygrad control checkpoint (no step, or no environments)")
    return networks, state, environments["state"] if environments.get("exact") else None
