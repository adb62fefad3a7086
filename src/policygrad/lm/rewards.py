"""Reward functions: the public interface, loading them from a command-line spec, and combining several.

The interface is one plain function per reward:

    reward(prompts: list[str], completions: list[str], **fields) -> list[float]

called once per batch with N = B * G completions (``prompts[i]`` is the prompt ``completions[i]`` answers, so each
prompt appears G times in a row). ``fields`` are the prompt records' other columns, each a list of N values aligned
with ``completions`` (for the built-in task: ``target_length``, ``target_digit_sum``, ``tolerance``); a function
takes the fields it needs by name and should accept ``**fields`` for the rest. It returns N numbers; NaN means "could
not score this one" and is let through: :func:`policygrad.advantages.group_advantages` leaves NaN rewards out of
the statistics and gives them advantage 0, and :func:`score` counts them.

A spec names a function, optionally with a weight after ``=``:

    shaped                       a built-in (see :data:`BUILTIN`)
    mypackage.rewards:format     module:function, imported
    path/to/my_rewards.py:score  a file, loaded by path
    shaped=0.5                   any of the above, weighted (default 1)

Several specs combine into one reward per completion, the weighted sum ``r_i = sum_k w_k * r_k,i``; NaN from any
function makes the sum NaN.

Example, a reward written for this interface:

>>> def short(prompts, completions, **fields):
...     return [1.0 if len(c) < 5 else 0.0 for c in completions]
>>> combined = RewardSet([RewardFunction("short", short, 2.0)])
>>> combined.score(["p", "p"], ["hi", "hello there"], {}).rewards
[2.0, 0.0]
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policygrad.errors import UsageError
from policygrad.lm import tasks

__all__ = ["BUILTIN", "RewardError", "RewardFunction", "RewardSet", "Scores", "load_reward", "load_rewards"]

RewardFn = Callable[..., Sequence[Any]]

BUILTIN: dict[str, RewardFn] = {"binary": tasks.binary_reward, "shaped": tasks.shaped_reward}
"""Reward functions available by bare name: the ``length_digits`` task's two modes."""


class RewardError(UsageError):
    """A reward function failed or broke the interface. ``str(err)`` is one line naming the function and sample."""


@dataclass(frozen=True)
class RewardFunction:
    """One loaded reward function and its weight in the sum."""

    name: str  # the spec as the user wrote it, without the weight: what error messages call it
    fn: RewardFn
    weight: float = 1.0


@dataclass
class Scores:
    """The rewards of one batch: the weighted sum and what went into it."""

    rewards: list[float]  # (N,) combined, NaN where any function gave NaN
    per_function: dict[str, list[float]] = field(default_factory=dict)  # name -> (N,) unweighted
    nan_count: int = 0  # completions whose combined reward is NaN


@dataclass(frozen=True)
class RewardSet:
    """Several reward functions combined into one reward per completion (see the module docstring)."""

    functions: list[RewardFunction]

    def score(self, prompts: Sequence[str], completions: Sequence[str], fields: Mapping[str, Sequence[Any]]) -> Scores:
        """Call every function once on the batch, check what it returned, and sum with the weights."""
        per_function = {f.name: _call(f, prompts, completions, fields) for f in self.functions}
        rewards = [
            sum(f.weight * per_function[f.name][i] for f in self.functions) for i in range(len(completions))
        ]
        return Scores(rewards, per_function, sum(math.isnan(r) for r in rewards))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]


def _call(
    function: RewardFunction, prompts: Sequence[str], completions: Sequence[str], fields: Mapping[str, Sequence[Any]]
) -> list[float]:
    """One reward function on one batch, every way it can break turned into a one-line :class:`RewardError`."""
    n = len(completions)
    try:
        values = function.fn(list(prompts), list(completions), **{k: list(v) for k, v in fields.items()})
    except Exception as exc:  # a user's function can raise anything; say which one and where
        index = _first_failing_sample(function, prompts, completions, fields)
        where = f" on sample {index} (prompt {_excerpt(prompts[index])})" if index is not None else ""
        raise RewardError(
            f"reward {function.name}", f"raised {type(exc).__name__}{where}: {_one_line(exc)}"
        ) from exc
    if values is None:
        raise RewardError(f"reward {function.name}", f"returned None; it must return a list of {n} numbers")
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"reward {function.name}", f"returned a {type(values).__name__}; it must return a list of {n} numbers"
        ) from None
    if len(values) != n:
        raise RewardError(f"reward {function.name}", f"returned {len(values)} rewards for {n} completions")
    checked = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward {function.name}",
                f"sample {i} (prompt {_excerpt(prompts[i])}): got {type(value).__name__} {value!r:.40}, not a number",
            )
        value = float(value)
        if math.isinf(value):
            raise RewardError(
                f"reward {function.name}",
                f"sample {i} (prompt {_excerpt(prompts[i])}): got {value}; rewards must be finite (NaN means unscored)",
            )
        checked.append(value)
    return checked


def _first_failing_sample(
    function: RewardFunction, prompts: Sequence[str], completions: Sequence[str], fields: Mapping[str, Sequence[Any]]
) -> int | None:
    """Re-run a function that raised on the batch one sample at a time, to name the sample that breaks it.

    Only on the error path, so the cost does not matter; None if every single sample passes (the failure depends on
    the batch as a whole).
    """
    for i in range(len(completions)):
        try:
            function.fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in fields.items()})
        except Exception:
            return i
    return None


def _excerpt(text: str, width: int = 40) -> str:
    flat = " ".join(str(text).split())
    return repr(flat if len(flat) <= width else flat[: width - 3] + "...")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------------------------
# Loading from specs
# --------------------------------------------------------------------------------------------------------------


def load_rewards(specs: Sequence[str]) -> RewardSet:
    """Load several specs (``name[=weight]``, see the module docstring) into one :class:`RewardSet`."""
    if not specs:
        raise UsageError("--rewards", "give at least one reward function, e.g. shaped or my_module:my_reward")
    functions = [load_reward(spec) for spec in specs]
    names = [f.name for f in functions]
    for name in names:
        if names.count(name) > 1:
            raise UsageError("--rewards", f"{name} is listed twice; give it once with the summed weight")
    return RewardSet(functions)


def load_reward(spec: str) -> RewardFunction:
    """Load one spec: ``builtin``, ``module:function`` or ``path/file.py:function``, each with optional ``=weight``.

    >>> load_reward("shaped=0.5").weight
    0.5
    >>> load_reward("policygrad.lm.tasks:binary_reward").fn is tasks.binary_reward
    True
    """
    name, weight = _split_weight(spec)
    if name in BUILTIN:
        return RewardFunction(name, BUILTIN[name], weight)
    target, sep, attribute = name.rpartition(":")
    if not sep or not target or not attribute:
        raise UsageError(
            "--rewards",
            f"{spec!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) nor module:function nor file.py:function",
        )
    module = _load_file(target, spec) if target.endswith(".py") else _import(target, spec)
    fn = getattr(module, attribute, None)
    if fn is None:
        raise UsageError("--rewards", f"{target} has no attribute {attribute!r}")
    if not callable(fn):
        raise UsageError("--rewards", f"{name} is a {type(fn).__name__}, not a function")
    return RewardFunction(name, fn, weight)


def _split_weight(spec: str) -> tuple[str, float]:
    """``name=0.5`` -> ("name", 0.5); no ``=`` -> weight 1. The weight must be a finite number."""
    name, sep, weight_text = spec.strip().rpartition("=")
    if not sep:
        return spec.strip(), 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        raise UsageError("--rewards", f"{spec!r}: the weight after '=' must be a number, got {weight_text!r}") from None
    if not math.isfinite(weight):
        raise UsageError("--rewards", f"{spec!r}: the weight must be finite")
    return name.strip(), weight


def _import(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError("--rewards", f"{spec!r}: cannot import {module_name}: {_one_line(exc)}") from None


def _load_file(path_text: str, spec: str) -> Any:
    """Import a Python file by path under a private module name (it need not be on sys.path or in a package)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UsageError("--rewards", f"{spec!r}: no such file {path_text}")
    module_name = f"policygrad_user_reward_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UsageError("--rewards", f"{spec!r}: cannot load {path_text} as Python")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # so pickling and dataclasses inside the file work
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise UsageError(
            "--rewards", f"{spec!r}: importing {path_text} raised {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    return module
