"""policygrad: policy-gradient reinforcement learning, from the estimator math to language models.

``import policygrad`` is cheap: the submodules (and torch) load on first use, e.g. ``policygrad.advantages``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_SUBMODULES = {"advantages", "losses", "regularizers", "natural_gradient", "bandit", "control", "lm", "errors"}

if TYPE_CHECKING:  # pragma: no cover
    from policygrad import advantages, bandit, control, errors, lm, losses, natural_gradient, regularizers  # noqa: F401


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"policygrad.{name}")
    raise AttributeError(f"module 'policygrad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SUBMODULES))
