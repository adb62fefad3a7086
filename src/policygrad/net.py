"""The listening socket of the commands that serve HTTP (``policygrad playground``, ``policygrad serve``): bound
before any server starts, so that a taken port or an unknown host is one clear line. Standard library only."""

from __future__ import annotations

import socket

from policygrad.errors import UsageError

__all__ = ["listen"]


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), inheritable by a child server process; a host
    that does not resolve or a port that cannot be bound is a one-line :class:`UsageError`."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError("--host", f"cannot resolve {host!r} ({err})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        taken = f"port {port} is in use; pick another with --port (0 picks a free one)"
        raise UsageError("--port", taken if port else f"cannot listen on {host}: {err.strerror or err}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock
