"""The one exception type for mistakes a user can make, reported by the CLI as a single line."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad argument, value or file. ``str(err)`` is the whole message: one line naming what is wrong.

    Args:
        field: the argument, config field or file the mistake is in, as the user wrote it (``--lr``).
        message: what is wrong and what is allowed.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a library's error can run to pages), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require(ok: bool, field: str, message: str) -> None:
    """Raise a UsageError naming ``field`` unless ``ok`` (NaN compares False, so range checks reject it too)."""
    if not ok:
        raise UsageError(field, message)
