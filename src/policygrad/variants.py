"""Every choice made by name, one registry per kind: the single source of the names that configs accept (their
``Literal`` types are built from :attr:`Registry.names`), that ``--help`` lists and that the code dispatches on.

A registry maps a name to ``"module:attribute"``, imported on first use, so this module (and every config that
builds its types from it) imports nothing heavy: ``policygrad --help`` never loads torch. Adding a variant is its
function (or class) in the math module, one line here, and its test.

>>> AGGREGATIONS.names
('token_mean', 'sequence_mean', 'constant')
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

from policygrad.errors import UsageError

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "BANDIT_BASELINES",
    "ENTROPY_WEIGHTS",
    "KL_ESTIMATORS",
    "KL_WEIGHTS",
    "REWARD_MODES",
    "REWARD_SCALES",
    "Registry",
    "TASKS",
    "build",
]


class Registry(Mapping[str, Any]):
    """Variants of one kind, by name: ``registry[name]`` is the function or class, imported on first use."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._targets = dict(entries)
        self._loaded: dict[str, Any] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._targets)

    def __getitem__(self, name: str) -> Any:
        if name not in self._targets:
            raise KeyError(f"{self.kind} must be one of {', '.join(self._targets)}, got {name!r}")
        if name not in self._loaded:
            module, attribute = self._targets[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def check(self, field: str, name: Any) -> None:
        """Refuse a name this registry does not hold, in one line naming ``field`` and the allowed names."""
        if not isinstance(name, str) or name not in self._targets:
            text = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
            raise UsageError(field, f"must be one of {', '.join(self._targets)}, got {text}")


def build(registry: Registry, name: str, settings: Any) -> Any:
    """An instance of the class ``registry[name]``, each constructor argument taken from the field of ``settings``
    (a config) with the same name: one name per concept, in the config and in the math."""
    cls = registry[name]
    parameters = inspect.signature(cls).parameters
    return cls(**{key: getattr(settings, key) for key in parameters if hasattr(settings, key)})


ADVANTAGES = Registry(
    "advantage",
    {
        "grpo": "policygrad.advantages:GroupNormalized",
        "rloo": "policygrad.advantages:LeaveOneOut",
        "reinforce": "policygrad.advantages:MovingAverageBaseline",
    },
)
"""Advantage estimators of ``policygrad train``: classes built from the config (:func:`build`), called on the
rewards (N,), with ``state()``/``restore()`` for checkpoints."""

BANDIT_BASELINES = Registry(
    "baseline",
    {
        "none": "policygrad.advantages:NoBaseline",
        "mean": "policygrad.advantages:MovingAverageBaseline",
        "loo": "policygrad.advantages:LeaveOneOut",
        "group": "policygrad.advantages:GroupMean",
        "grpo": "policygrad.advantages:GroupNormalized",
    },
)
"""Baselines of the bandit playground: the same estimator classes, each sample row one group."""

REWARD_SCALES = Registry(
    "scale_rewards",
    {
        "group": "policygrad.advantages:scale_by_group_std",
        "batch": "policygrad.advantages:scale_by_batch_std",
        "none": "policygrad.advantages:no_scale",
    },
)
"""The divisors of :func:`policygrad.advantages.group_advantages` (``scale=``)."""

AGGREGATIONS = Registry(
    "aggregation",
    {
        "token_mean": "policygrad.losses:token_mean",
        "sequence_mean": "policygrad.losses:sequence_mean",
        "constant": "policygrad.losses:constant_length_mean",
    },
)
"""The reductions of per-token values of :func:`policygrad.losses.aggregate`."""

KL_ESTIMATORS = Registry(
    "kl_estimator",
    {"k1": "policygrad.regularizers:k1", "k2": "policygrad.regularizers:k2", "k3": "policygrad.regularizers:k3"},
)
"""Per-token KL estimators of :func:`policygrad.regularizers.kl`."""

ENTROPY_WEIGHTS = Registry(
    "entropy_weight",
    {
        "constant": "policygrad.regularizers:ConstantEntropyWeight",
        "dynamic": "policygrad.regularizers:DynamicEntropyWeight",
    },
)
"""The weight of the entropy bonus for a batch: classes built from the config, called on the rewards (N,)."""

KL_WEIGHTS = Registry(
    "kl_weight",
    {
        "constant": "policygrad.regularizers:ConstantKLWeight",
        "dynamic": "policygrad.regularizers:DynamicKLWeight",
    },
)
"""The coefficient beta of the KL penalty for a batch: classes built from the config, called on the rewards (N,)."""

REWARD_MODES = Registry(
    "reward mode",
    {
        "binary": "policygrad.lm.tasks:binary",
        "joint": "policygrad.lm.tasks:joint",
        "shaped": "policygrad.lm.tasks:shaped",
        "sharp": "policygrad.lm.tasks:sharp",
    },
)
"""The built-in rewards of the length_digits task, one completion at a time (``--rewards binary`` etc.)."""

TASKS = Registry("task", {"length_digits": "policygrad.lm.tasks:LENGTH_DIGITS"})
"""Tasks by name (:class:`policygrad.lm.task.Task`): their rates and summary rows."""
