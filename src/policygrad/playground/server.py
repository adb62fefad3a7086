"""``policygrad playground``: bind the port, print the address, serve the app with uvicorn until Ctrl+C."""

from __future__ import annotations

import contextlib
import socket
import sys
import webbrowser

from policygrad.errors import UsageError
from policygrad.net import listen
from policygrad.playground.config import LOOPBACK_HOSTS, PlaygroundConfig


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    return f"http://[{shown}]:{port}/" if ":" in shown and not shown.startswith("[") else f"http://{shown}:{port}/"


def run_playground(config: PlaygroundConfig) -> int:
    """Serve :func:`policygrad.playground.app.create_app` on ``config.host:config.port`` until Ctrl+C (exit 0)."""
    import torch

    try:
        import uvicorn

        from policygrad.playground.app import create_app
    except ImportError as err:
        raise UsageError(
            "playground", f"needs starlette and uvicorn ({err.name} is missing): pip install 'policygrad[playground]'"
        ) from None
    from policygrad.playground.session import Sessions

    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and leaves the machine to its user
    sock = listen(config.host, config.port)
    sessions = Sessions(config.max_sessions, config.session_minutes * 60)
    # against DNS rebinding, a loopback server answers only its own names (Starlette cannot parse an IPv6 Host header)
    app = create_app(sessions, allowed_hosts=list(LOOPBACK_HOSTS) if config.local_only else None)
    url = url_of(sock, config.host)
    print(f"policygrad playground: serving on {url} (Ctrl+C to stop)", flush=True)
    if not config.local_only:
        print(
            f"policygrad playground: listening on {config.host}: anyone who can reach it can use it (no login)",
            file=sys.stderr,
        )
    if config.open:
        webbrowser.open(url)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn stops gracefully on Ctrl+C, then raises it: the way out
        server.run(sockets=[sock])
    print("policygrad playground: stopped", flush=True)
    return 0
