"""Configuration of ``policygrad playground``. Imports nothing heavy, so ``--help`` and argument errors are instant."""

from __future__ import annotations

import dataclasses

from policygrad.errors import require as _require

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
"""The addresses that reach this machine only, which are also the Host headers a page served on them may carry (the
app refuses any other, against DNS rebinding). IPv6 loopback is refused: Starlette's host check cannot read an IPv6
Host header, so ``::1`` would be served without that defence."""


@dataclasses.dataclass
class PlaygroundConfig:
    """Serve the bandit playground on a local web page: set the arms, watch REINFORCE learn with and without a
    baseline, and compare the estimators on the same draws. Stop it with Ctrl+C."""

    host: str = "127.0.0.1"
    """address to listen on; the default reaches this machine only (give 0.0.0.0 to let others in: no login)"""
    port: int = 8765
    """port to listen on (0 picks a free one)"""
    open: bool = False
    """open the page in the default web browser"""
    max_sessions: int = 32
    """browser tabs served at once; the least recently used beyond this is forgotten"""
    session_minutes: float = 60.0
    """minutes after which an idle tab's session is forgotten"""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.host, str) and self.host.strip() != "" and self.host.isprintable(),
            "--host",
            f"give an address such as 127.0.0.1, got {self.host!r}",
        )
        _require(
            self.host.strip("[]") != "::1",
            "--host",
            "::1 is not supported (its Host header cannot be checked); use 127.0.0.1 or localhost",
        )
        _require(0 <= self.port <= 65535, "--port", f"must be in [0, 65535], got {self.port}")
        _require(1 <= self.max_sessions <= 10_000, "--max-sessions", f"must be in [1, 10000], got {self.max_sessions}")
        _require(
            0 < self.session_minutes <= 7 * 24 * 60,
            "--session-minutes",
            f"must be in (0, 10080] (a week), got {self.session_minutes}",
        )

    @property
    def local_only(self) -> bool:
        """Whether only this machine can reach the server."""
        return self.host in LOOPBACK_HOSTS
