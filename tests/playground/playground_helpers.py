"""What the playground tests share besides fixtures: the `policygrad bandit --json` reference, Chromium's path and
flags, and the real app served in a thread (a module of its own name, so ``from playground_helpers import ...`` is not
confused with another folder's conftest)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

POLICYGRAD = str(Path(sys.executable).with_name("policygrad"))


def bandit_json(settings: dict, steps: int) -> dict:
    """`policygrad bandit --json` with the page's settings as flags: the terminal's run, in a subprocess."""
    args = [POLICYGRAD, "bandit", "--steps", str(steps), "--json"]
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        args += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; CI installs it (playwright's own browser download is not used)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def serving():
    """The real app under uvicorn, in a thread, on a free localhost port: its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    from policygrad.playground.app import create_app
    from policygrad.playground.config import LOOPBACK_HOSTS
    from policygrad.playground.session import Sessions

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    app = create_app(Sessions(limit=8, idle_seconds=600), allowed_hosts=list(LOOPBACK_HOSTS))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the playground server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
