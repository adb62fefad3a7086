"""Reward functions: the public interface, loading them from a command-line spec, and combining several.

The interface is one plain function per reward:

    reward(prompts: list[str], completions: list[str], **fields) -> list[float]

called once per batch with N = B * G completions (``prompts[i]`` is the prompt ``completions[i]`` answers, so each
prompt appears G times in a row). ``fields`` are the prompt records' other columns, each a list of N values aligned
with ``completions`` (for the built-in task: ``target_length``, ``target_digit_sum``, ``tolerance``); a function
takes the fields it needs by name and should accept ``**fields`` for the rest. It returns N numbers; NaN means "could
not score this one": :func:`policygrad.advantages.group_advantages` leaves NaN rewards out of the statistics and
gives them advantage 0, and :meth:`RewardSet.score` counts them.

Faults. A function that raises, hangs past a timeout, returns None, something whose iteration fails, the wrong
count, a non-number, inf or a number beyond float's range (an int such as 10**400) breaks the interface (the calls
and these checks are :mod:`policygrad.lm.reward_calls`); so do finite rewards whose weighted sum overflows to inf
(1e308 + 1e308), named as the sum of the functions concerned. :meth:`RewardSet.score` either raises a one-line
:class:`RewardError` naming the function, the prompt and the completion (``on_fault="error"``), or gives the samples
concerned NaN, hence advantage 0, and returns the faults (``"skip"``). The trainer also counts NaN as a fault
(``allow_nan=False``): a run should not quietly lose its signal to a 0/0, so ``--reward-fault skip`` is the way to
say "unscored samples are expected".

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
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policygrad.errors import UsageError
from policygrad.lm import reward_calls, tasks
from policygrad.lm.reward_calls import FAULT_KINDS, MAX_ABANDONED_CALLS, RewardFault, describe_sample, one_line

__all__ = [
    "BUILTIN",
    "FAULT_KINDS",
    "FAULT_POLICIES",
    "MAX_ABANDONED_CALLS",
    "RewardError",
    "RewardFault",
    "RewardFunction",
    "RewardSet",
    "Scores",
    "load_reward",
    "load_rewards",
]

RewardFn = Callable[..., Sequence[Any]]

BUILTIN: dict[str, RewardFn] = {
    "binary": tasks.binary_reward,
    "joint": tasks.joint_reward,
    "shaped": tasks.shaped_reward,
    "sharp": tasks.sharp_reward,
}
"""Reward functions available by bare name: the ``length_digits`` task's modes."""


class RewardError(UsageError):
    """A reward function failed or broke the interface. ``str(err)`` is one line naming the function and sample."""


@dataclass(frozen=True)
class RewardFunction:
    """One loaded reward function and its weight in the sum."""

    name: str  # the spec as the user wrote it, without the weight: what error messages call it
    fn: RewardFn
    weight: float = 1.0


FAULT_POLICIES = ("error", "skip")
"""What :meth:`RewardSet.score` does on a fault: raise a :class:`RewardError` (error), or give the samples concerned
the reward NaN, which :func:`policygrad.advantages.group_advantages` turns into advantage 0, and report the fault
in :attr:`Scores.faults` (skip)."""


@dataclass
class Scores:
    """The rewards of one batch: the weighted sum and what went into it."""

    rewards: list[float]  # (N,) combined, NaN where any function gave NaN or faulted
    per_function: dict[str, list[float]] = field(default_factory=dict)  # name -> (N,) unweighted
    nan_count: int = 0  # completions whose combined reward is NaN
    faults: list[RewardFault] = field(default_factory=list)  # skipped faults (policy "skip"), in call order

    @property
    def faulted_samples(self) -> int:
        """Completions given NaN because a function faulted on them (a whole-batch fault counts every one)."""
        rows: set[int] = set()
        for fault in self.faults:
            rows.update(range(len(self.rewards)) if fault.sample is None else (fault.sample,))
        return len(rows)


@dataclass(frozen=True)
class RewardSet:
    """Several reward functions combined into one reward per completion (see the module docstring)."""

    functions: list[RewardFunction]
    _abandoned: list[threading.Thread] = field(default_factory=list, compare=False, repr=False)

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        fields: Mapping[str, Sequence[Any]],
        on_fault: str = "error",
        timeout: float | None = None,
        allow_nan: bool = True,
    ) -> Scores:
        """Call every function once on the batch, check what it returned, and sum with the weights.

        Args:
            on_fault:  "error" raises a one-line :class:`RewardError` at the first fault; "skip" gives the samples
                       concerned NaN and lists the faults in the result (see :data:`FAULT_POLICIES`).
            timeout:   seconds one call may take (None or 0: no limit); a slower call is a "timeout" fault.
            allow_nan: NaN is the documented "could not score this one" and passes through by default; False
                       makes it a fault like inf (the trainer's choice: a 0/0 should not go unnoticed).
        """
        if on_fault not in FAULT_POLICIES:
            raise ValueError(f"on_fault must be one of {FAULT_POLICIES}, got {on_fault!r}")
        per_function, faults = {}, []
        for function in self.functions:
            refusal = reward_calls.refuse_call(self._abandoned)
            if refusal is not None:
                raise RewardError(f"reward {function.name}", refusal)
            values, found = reward_calls.call(
                function.name,
                function.fn,
                prompts,
                completions,
                fields,
                timeout,
                allow_nan,
                salvage=on_fault == "skip",
                abandoned=self._abandoned,
            )
            if found and on_fault == "error":
                first = found[0]
                raise RewardError(f"reward {function.name}", first.message) from first.cause
            per_function[function.name], faults = values, faults + found
        rewards, found = self._weighted_sums(per_function, prompts, completions)
        if found and on_fault == "error":
            raise RewardError(f"reward {found[0].function}", found[0].message)
        return Scores(rewards, per_function, sum(math.isnan(r) for r in rewards), faults + found)

    def _weighted_sums(
        self, per_function: dict[str, list[float]], prompts: Sequence[str], completions: Sequence[str]
    ) -> tuple[list[float], list[RewardFault]]:
        """``r_i = sum_k w_k * r_k,i`` for every sample, and an "inf" fault for each sample whose finite parts sum
        (or scale) past float's range: 1e308 + 1e308 is inf, and inf would reach the advantages as NaN."""
        name = "+".join(self.names)
        rewards, faults = [], []
        for i in range(len(completions)):
            parts = [per_function[f.name][i] for f in self.functions]
            total = sum(f.weight * part for f, part in zip(self.functions, parts))
            if not math.isfinite(total) and not any(math.isnan(part) for part in parts):
                terms = " + ".join(f"{f.weight:g} * {part:g}" for f, part in zip(self.functions, parts))
                message = (
                    f"{describe_sample(i, prompts[i], completions[i])}: the weighted sum {terms} overflows to {total}"
                )
                faults.append(RewardFault(name, "inf", i, message))
                total = math.nan
            rewards.append(total)
        return rewards, faults

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]


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
        raise UsageError("--rewards", f"{spec!r}: cannot import {module_name}: {one_line(exc)}") from None


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
            "--rewards", f"{spec!r}: importing {path_text} raised {type(exc).__name__}: {one_line(exc)}"
        ) from None
    return module
