"""Calling one reward function on one batch and finding out exactly how it broke the interface, if it did.

This module owns the fault machinery behind :meth:`policygrad.lm.rewards.RewardSet.score`: it calls a user's function
(in a daemon thread when there is a timeout, leaving a call that outlives it running and counting it against
:data:`MAX_ABANDONED_CALLS`), checks what came back (None, not iterable, the wrong count, a non-number, inf, a number
beyond float's range, NaN where it is not allowed), and, when the batch call raises, calls the function again one
sample at a time to name the sample that breaks it, or, salvaging, to keep the others' rewards. Each fault becomes a
:class:`RewardFault` whose message is one line naming the sample's prompt and completion. It knows nothing of
weights, specs or policies: that is :mod:`policygrad.lm.rewards`, which imports this module and never the reverse.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FAULT_KINDS", "MAX_ABANDONED_CALLS", "RewardFault", "call", "describe_sample", "one_line", "refuse_call"]


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
"""What :attr:`RewardFault.kind` can be: the ways a function breaks the interface (see :func:`call`)."""

MAX_ABANDONED_CALLS = 3
"""A call that outlives its timeout cannot be killed (Python has no way to stop a thread), so it is left running in
a daemon thread. When this many are still running, scoring stops with a :class:`~policygrad.lm.rewards.RewardError` whatever the policy,
rather than let stuck threads pile up."""


def refuse_call(abandoned: list[threading.Thread]) -> str | None:
    """Why no new call may start, or None: :data:`MAX_ABANDONED_CALLS` timed-out calls are still running. Calls that
    have finished since are forgotten here, so ``abandoned`` holds only live threads afterwards."""
    abandoned[:] = [thread for thread in abandoned if thread.is_alive()]
    if len(abandoned) >= MAX_ABANDONED_CALLS:
        return (
            f"{len(abandoned)} reward calls that timed out are still running in the background; stopping "
            "rather than piling up stuck threads (fix the function or raise --reward-timeout)"
        )
    return None


class _TimedOut(Exception):
    def __init__(self, thread: threading.Thread):
        super().__init__()
        self.thread = thread


def _run(
    name: str,
    fn: Callable[..., Any],
    prompts: list[str],
    completions: list[str],
    fields: dict[str, list[Any]],
    timeout: float | None,
) -> Any:
    """Call the function, in a daemon thread when there is a timeout (the only portable way to stop waiting: a
    subprocess would have to pickle the user's function and its closures, which many cannot be)."""
    if not timeout:
        return fn(prompts, completions, **fields)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(prompts, completions, **fields)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as is
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"reward {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise _TimedOut(thread)
    if "error" in box:
        raise box["error"]
    return box["value"]


def call(
    name: str,
    fn: Callable[..., Any],
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Mapping[str, Sequence[Any]],
    timeout: float | None = None,
    allow_nan: bool = True,
    salvage: bool = False,
    abandoned: list[threading.Thread] | None = None,
) -> tuple[list[float], list[RewardFault]]:
    """One reward function (``name`` as the user wrote it, ``fn`` the function) on one batch: the N rewards (NaN
    where it faulted) and its faults, each a one-line description naming the sample's prompt and completion.

    When the batch call raises, the function is called again one sample at a time: all of them with ``salvage`` (so
    only the samples that break it lose their reward), else until the first that raises (to name it).
    """
    n = len(completions)
    nan = [math.nan] * n
    where_batch = _on_batch(prompts, completions)
    args = (list(prompts), list(completions), {k: list(v) for k, v in fields.items()})
    try:
        values = _run(name, fn, *args, timeout)
    except _TimedOut as timed_out:
        if abandoned is not None:
            abandoned.append(timed_out.thread)
        return nan, [RewardFault(name, "timeout", None, f"did not return within {timeout:g} s {where_batch}")]
    except Exception as exc:  # a user's function can raise anything; say which one and where
        return _one_by_one(name, fn, prompts, completions, fields, timeout, allow_nan, salvage, abandoned, exc)
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
    sample = describe_sample(i, prompt, completion)
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
        message = f"{sample}: converting {type(value).__name__} to float raised {type(exc).__name__}: {one_line(exc)}"
        return math.nan, RewardFault(name, "type", i, message, exc)
    if math.isinf(value):
        return math.nan, RewardFault(name, "inf", i, f"{sample}: got {value}; rewards must be finite")
    if math.isnan(value) and not allow_nan:
        return math.nan, RewardFault(
            name, "nan", i, f"{sample}: got NaN; with --reward-fault skip such samples train with advantage 0"
        )
    return value, None


def _one_by_one(name, fn, prompts, completions, fields, timeout, allow_nan, salvage, abandoned, batch_error):
    """After the batch call raised: each sample on its own, to find (and, salvaging, keep apart) the ones that break
    the function. A failure that depends on the batch as a whole, or a hang, faults the whole batch."""
    n = len(completions)
    values, faults = [math.nan] * n, []
    batch = _on_batch(prompts, completions)
    for i in range(n):
        where = describe_sample(i, prompts[i], completions[i])
        try:
            result = _run(name, fn, [prompts[i]], [completions[i]], {k: [v[i]] for k, v in fields.items()}, timeout)
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
    text = one_line(exc)
    if timeout and "main thread" in text:  # signal.signal / signal.alarm only work in the main thread
        text += " (with a timeout, reward functions run in a worker thread; --reward-timeout 0 runs them in the main)"
    return text


def _on_batch(prompts: Sequence[str], completions: Sequence[str]) -> str:
    if not completions:
        return "on an empty batch"
    first = f"first prompt {_excerpt(prompts[0])}, completion {_excerpt(completions[0])}"
    return f"on a batch of {len(completions)} ({first})"


def describe_sample(i: int, prompt: str, completion: str) -> str:
    """How a fault message names one sample: its row, and excerpts of its prompt and completion."""
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


def one_line(exc: BaseException) -> str:
    """An exception's message with its whitespace (newlines too) collapsed, or its type name when it has none."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
