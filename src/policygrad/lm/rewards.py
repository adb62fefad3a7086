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
count, a non-number, inf or a number beyond float's range (an int such as 10**400) breaks the interface; so do finite
rewards whose weighted sum overflows to inf (1e308 + 1e308), named as the sum of the functions concerned. :meth:`RewardSet.score` either raises a one-line :class:`RewardError` naming the function, the prompt and
the completion (``on_fault="error"``), or gives the samples concerned NaN, hence advantage 0, and returns the faults
(``"skip"``). The trainer also counts NaN as a fault (``allow_nan=False``): a run should not quietly lose its signal
to a 0/0, so ``--reward-fault skip`` is the way to say "unscored samples are expected".

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
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policygrad.errors import UsageError
from policygrad.lm import tasks

__all__ = [
    "BUILTIN",
    "FAULT_KINDS",
    "FAULT_POLICIES",
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
    "shaped": tasks.shaped_reward,
    "sharp": tasks.sharp_reward,
}
"""Reward functions available by bare name: the ``length_digits`` task's two modes."""


class RewardError(UsageError):
    """A reward function failed or broke the interface. ``str(err)`` is one line naming the function and sample."""


@dataclass(frozen=True)
class RewardFunction:
    """One loaded reward function and its weight in the sum."""

    name: str  # the spec as the user wrote it, without the weight: what error messages call it
    fn: RewardFn
    weight: float = 1.0


@dataclass(frozen=True)
class RewardFault:
    """One way a reward function broke the interface on one batch: on one completion (``sample`` its row), or on
    the whole batch (``sample`` None: it raised for the batch as a whole, hung, returned None or the wrong count)."""

    function: str  # the function's name as the user wrote it
    kind: str  # one of FAULT_KINDS
    sample: int | None
    message: str  # one line naming the sample's prompt and completion
    cause: BaseException | None = field(default=None, compare=False, repr=False)

    def line(self) -> str:
        return f"reward {self.function}: {self.message}"


FAULT_KINDS = ("raised", "timeout", "count", "none", "type", "inf", "nan")
FAULT_POLICIES = ("error", "skip")
"""What :meth:`RewardSet.score` does on a fault: raise a :class:`RewardError` (error), or give the samples concerned
the reward NaN, which :func:`policygrad.advantages.group_advantages` turns into advantage 0, and report the fault
in :attr:`Scores.faults` (skip)."""

MAX_ABANDONED_CALLS = 3
"""A call that outlives its timeout cannot be killed (Python has no way to stop a thread), so it is left running in
a daemon thread. When this many are still running, scoring stops with a :class:`RewardError` whatever the policy,
rather than let stuck threads pile up."""


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
            self._check_abandoned(function)
            values, found = _call(
                function,
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
                message = f"{_sample(i, prompts[i], completions[i])}: the weighted sum {terms} overflows to {total}"
                faults.append(RewardFault(name, "inf", i, message))
                total = math.nan
            rewards.append(total)
        return rewards, faults

    def _check_abandoned(self, function: RewardFunction) -> None:
        self._abandoned[:] = [thread for thread in self._abandoned if thread.is_alive()]
        if len(self._abandoned) >= MAX_ABANDONED_CALLS:
            raise RewardError(
                f"reward {function.name}",
                f"{len(self._abandoned)} reward calls that timed out are still running in the background; stopping "
                "rather than piling up stuck threads (fix the function or raise --reward-timeout)",
            )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]


class _TimedOut(Exception):
    def __init__(self, thread: threading.Thread):
        super().__init__()
        self.thread = thread


def _run(
    function: RewardFunction,
    prompts: list[str],
    completions: list[str],
    fields: dict[str, list[Any]],
    timeout: float | None,
) -> Any:
    """Call the function, in a daemon thread when there is a timeout (the only portable way to stop waiting: a
    subprocess would have to pickle the user's function and its closures, which many cannot be)."""
    if not timeout:
        return function.fn(prompts, completions, **fields)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = function.fn(prompts, completions, **fields)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as is
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"reward {function.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise _TimedOut(thread)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _call(
    function: RewardFunction,
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Mapping[str, Sequence[Any]],
    timeout: float | None = None,
    allow_nan: bool = True,
    salvage: bool = False,
    abandoned: list[threading.Thread] | None = None,
) -> tuple[list[float], list[RewardFault]]:
    """One reward function on one batch: the N rewards (NaN where it faulted) and its faults, each a one-line
    description naming the sample's prompt and completion.

    When the batch call raises, the function is called again one sample at a time: all of them with ``salvage`` (so
    only the samples that break it lose their reward), else until the first that raises (to name it).
    """
    n = len(completions)
    name = function.name
    nan = [math.nan] * n
    where_batch = _on_batch(prompts, completions)
    args = (list(prompts), list(completions), {k: list(v) for k, v in fields.items()})
    try:
        values = _run(function, *args, timeout)
    except _TimedOut as timed_out:
        if abandoned is not None:
            abandoned.append(timed_out.thread)
        return nan, [RewardFault(name, "timeout", None, f"did not return within {timeout:g} s {where_batch}")]
    except Exception as exc:  # a user's function can raise anything; say which one and where
        return _one_by_one(function, prompts, completions, fields, timeout, allow_nan, salvage, abandoned, exc)
    if values is None:
        message = f"returned None {where_batch}; it must return a list of {n} numbers"
        return nan, [RewardFault(name, "none", None, message)]
    try:
        values = list(values)
    except Exception:  # not iterable, or a generator that raised on the way
        return nan, [
            RewardFault(
                name,
                "type",
                None,
                f"returned a {type(values).__name__} {where_batch}; it must return a list of {n} numbers",
            )
        ]
    if len(values) != n:
        message = f"returned {len(values)} rewards for {n} completions {where_batch}"
        return nan, [RewardFault(name, "count", None, message)]
    checked, faults = [], []
    for i, value in enumerate(values):
        value, fault = _check_value(name, value, i, prompts[i], completions[i], allow_nan)
        checked.append(value)
        if fault is not None:
            faults.append(fault)
    return checked, faults


def _check_value(
    name: str, value: Any, i: int, prompt: str, completion: str, allow_nan: bool
) -> tuple[float, RewardFault | None]:
    """One returned reward: (the float, None) when it is a real number, else (NaN, the fault)."""
    sample = _sample(i, prompt, completion)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        message = f"{sample}: got {type(value).__name__} {_repr(value)}, not a number"
        return math.nan, RewardFault(name, "type", i, message)
    try:
        value = float(value)
    except OverflowError:  # an int (or Fraction) beyond float's range, about 1.8e308
        return math.nan, RewardFault(
            name, "inf", i, f"{sample}: got a number too large for a float; rewards must be finite"
        )
    except Exception as exc:  # a numbers.Real of the user's own whose __float__ fails
        message = f"{sample}: converting {type(value).__name__} to float raised {type(exc).__name__}: {_one_line(exc)}"
        return math.nan, RewardFault(name, "type", i, message, exc)
    if math.isinf(value):
        return math.nan, RewardFault(name, "inf", i, f"{sample}: got {value}; rewards must be finite")
    if math.isnan(value) and not allow_nan:
        return math.nan, RewardFault(
            name, "nan", i, f"{sample}: got NaN; with --reward-fault skip such samples train with advantage 0"
        )
    return value, None


def _one_by_one(function, prompts, completions, fields, timeout, allow_nan, salvage, abandoned, batch_error):
    """After the batch call raised: each sample on its own, to find (and, salvaging, keep apart) the ones that break
    the function. A failure that depends on the batch as a whole, or a hang, faults the whole batch."""
    n, name = len(completions), function.name
    values, faults = [math.nan] * n, []
    batch = _on_batch(prompts, completions)
    for i in range(n):
        where = _sample(i, prompts[i], completions[i])
        try:
            result = _run(function, [prompts[i]], [completions[i]], {k: [v[i]] for k, v in fields.items()}, timeout)
        except _TimedOut as timed_out:
            if abandoned is not None:
                abandoned.append(timed_out.thread)
            # calling a hanging function n more times would only pile up threads
            return [math.nan] * n, [RewardFault(name, "timeout", None, f"did not return within {timeout:g} s {batch}")]
        except Exception as exc:
            message = f"raised {type(exc).__name__} on {where}: {_why(exc, timeout)}"
            faults.append(RewardFault(name, "raised", i, message, exc))
        else:
            try:
                single = list(result)
            except Exception:  # not iterable, or its iteration raised
                single = []
            if len(single) == 1:
                values[i], fault = _check_value(name, single[0], i, prompts[i], completions[i], allow_nan)
                faults += [fault] if fault is not None else []
            else:
                faults.append(RewardFault(name, "count", i, f"on {where} alone did not return one reward"))
        if faults and not salvage:
            return values, faults
    if not faults:  # every sample passes alone: it is the batch that breaks it
        values = [math.nan] * n
        message = f"raised {type(batch_error).__name__} {batch}: {_why(batch_error, timeout)}"
        faults.append(RewardFault(name, "raised", None, message, batch_error))
    return values, faults


def _why(exc: BaseException, timeout: float | None) -> str:
    """The exception as one line, with a hint where the worker thread of the timeout is the likely cause."""
    text = _one_line(exc)
    if timeout and "main thread" in text:  # signal.signal / signal.alarm only work in the main thread
        text += " (with a timeout, reward functions run in a worker thread; --reward-timeout 0 runs them in the main)"
    return text


def _on_batch(prompts: Sequence[str], completions: Sequence[str]) -> str:
    if not completions:
        return "on an empty batch"
    first = f"first prompt {_excerpt(prompts[0])}, completion {_excerpt(completions[0])}"
    return f"on a batch of {len(completions)} ({first})"


def _sample(i: int, prompt: str, completion: str) -> str:
    return f"sample {i} (prompt {_excerpt(prompt)}, completion {_excerpt(completion)})"


def _repr(value: Any, width: int = 40) -> str:
    """``repr(value)`` cut to ``width`` characters; a user's object whose ``__repr__`` raises gets its type name."""
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if len(text) <= width else text[: width - 3] + "..."


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
