"""Saved policies: a state_dict plus the facts needed to rebuild the network, in one torch file read back with
``weights_only=True`` (no arbitrary unpickling, so a downloaded file cannot run code)."""

from __future__ import annotations

from pathlib import Path

import torch

from policygrad.control.policies import Policy
from policygrad.errors import UsageError

__all__ = ["save_policy", "load_policy"]

FORMAT = "policygrad.control.policy/1"


def save_policy(path: Path, policy: Policy, env_id: str, obs_size: int, action_size: int, hidden: tuple[int, ...], algo: str) -> None:
    """Write the policy's weights and metadata (plain strings, ints and lists only) to ``path``."""
    metadata = {"format": FORMAT, "env": env_id, "algo": algo, "family": policy.family_name,
                "obs_size": obs_size, "action_size": action_size, "hidden": list(hidden)}
    torch.save({"metadata": metadata, "state_dict": {k: v.detach().clone() for k, v in policy.state_dict().items()}}, path)


def load_policy(path: Path) -> tuple[Policy, dict]:
    """Rebuild a policy saved by :func:`save_policy`; any unreadable or foreign file is a ``--eval`` UsageError."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        metadata = saved["metadata"]
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format is {metadata.get('format')!r}, expected {FORMAT!r}")
        policy = Policy(int(metadata["obs_size"]), int(metadata["action_size"]), tuple(metadata["hidden"]), metadata["family"]).float()
        policy.load_state_dict(saved["state_dict"])
    except Exception as err:  # a truncated download, a different file: one line, not a traceback
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError("--eval", f"{path} is not a policy saved by policygrad control ({message})") from None
    return policy.eval(), metadata
