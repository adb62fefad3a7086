"""Every random generator a training step may draw from, captured and restored as one value, and the seeds of a run.

A resumed run is bit for bit the run that was stopped only if every draw after the checkpoint is the same: torch's
CPU (and CUDA) generators, Python's ``random`` and NumPy's global generator (user reward functions may use either).
:func:`rng_state` returns them as plain tensors, lists and numbers, so a checkpoint holding it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["rng_state", "seed_everything", "set_rng_state", "step_seed"]


def seed_everything(seed: int) -> None:
    """Seed torch, Python's ``random`` and NumPy's global generator with ``seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def step_seed(seed: int, step: int, stream: int | None = None) -> int:
    """The seed of one step's sampling: a function of (seed, step) alone, so a resumed run draws what the run it
    continues would have drawn. Below 2**64 (torch's limit) for every seed < 2**32 and step < 2**32.

    ``stream`` names one of several independent generators of the same step (under torchrun: one per prompt of the
    step's batch, :mod:`policygrad.distributed`): the step's seed pushed through one step of Knuth's MMIX linear
    congruential generator with an increment per stream, so different streams get different seeds (the increment
    is odd-multiplied, hence distinct modulo 2**64 for distinct streams). Without it, the historical per-step seed.

    >>> step_seed(1, 2)
    1000005
    >>> len({step_seed(1, 2, stream) for stream in range(1000)})
    1000
    """
    base = seed * 1_000_003 + step
    if stream is None:
        return base
    return (base * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407 * (2 * stream + 1)) % 2**64


def rng_state() -> dict[str, Any]:
    """The state of every generator a step may draw from (see the module docstring)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (generators it did not save are left as they are)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
