"""The playground's HTTP API through Starlette's TestClient: the numbers are `policygrad bandit --json`'s, every
mistake is a 4xx with one line, and the server bounds what a request may cost."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess

import pytest
from playground_helpers import POLICYGRAD, bandit_json

from policygrad.bandit.config import BanditConfig
from policygrad.playground import app as app_module
from policygrad.playground.session import LIMITS, settings_json
from policygrad.variants import BANDIT_BASELINES

STEP_KEYS = ("step", "probs", "expected_reward", "gradient_estimate", "exact_gradient")  # `policygrad bandit --json`


def create(client, settings: dict | None = None) -> str:
    response = client.post("/api/sessions", json=settings or {})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.exact
def test_options_are_the_registry_and_the_defaults(client):
    data = client.get("/api/options").json()
    assert [b["name"] for b in data["baselines"]] == list(BANDIT_BASELINES.names)
    assert data["defaults"] == settings_json(BanditConfig())


@pytest.mark.exact
def test_the_page_offers_the_five_baselines(client):
    """None, moving average, leave-one-out, group mean and GRPO's group normalisation, as the issue lists them."""
    names = [b["name"] for b in client.get("/api/options").json()["baselines"]]
    assert names == ["none", "mean", "loo", "group", "grpo"], (
        'policygrad.variants.BANDIT_BASELINES needs "grpo": "policygrad.advantages:GroupNormalized"'
    )


@pytest.mark.exact
@pytest.mark.parametrize(
    "settings",
    [
        {"means": [1, 0, 0.5], "noise": 0.1, "baseline": "loo", "seed": 3},
        {"means": [3.2, 4, 3.6], "baseline": "mean", "samples": 6, "lr": 0.5, "entropy_coef": 0.05, "epochs": 3},
    ],
)
def test_the_page_takes_the_terminals_steps(client, settings):
    """The same seed and settings give the same numbers as `policygrad bandit --json`, float for float."""
    key = create(client, settings)
    records = []
    for steps in (1, 12, 17):  # several requests make one run
        response = client.post(f"/api/sessions/{key}/step", json={"steps": steps})
        assert response.status_code == 200, response.text
        records += response.json()["records"]
    reference = bandit_json(settings, steps=30)
    assert [{k: r[k] for k in STEP_KEYS} for r in records] == reference["steps"]
    state = client.get(f"/api/sessions/{key}").json()["state"]
    assert state["probs"] == reference["final_probs"] and state["expected_reward"] == reference["final_expected_reward"]
    assert state["replayable"] and state["command"].endswith("--steps 30 --json")


@pytest.mark.exact
def test_the_command_the_page_shows_replays_the_run(client):
    key = create(client, {"means": [0.2, 1], "baseline": "none", "clip_eps": 0.3, "epochs": 2})
    records = client.post(f"/api/sessions/{key}/step", json={"steps": 8}).json()["records"]
    command = client.get(f"/api/sessions/{key}").json()["state"]["command"].split()
    assert command[:2] == ["policygrad", "bandit"]
    result = subprocess.run([POLICYGRAD, *command[1:]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [{k: r[k] for k in STEP_KEYS} for r in records] == json.loads(result.stdout)["steps"]


@pytest.mark.exact
@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"noise": "-1"}, 400, "noise: must be a finite number >= 0, got -1.0"),
        ({"lr": "x"}, 400, "lr: must be a number, got 'x'"),
        ({"means": []}, 400, "means: give at least two arms, e.g. --means 1 0 0.5 (got 0)"),
        ([1, 2], 400, "settings: must be a JSON object, got list"),
        ("not json", 400, "request: is not valid JSON"),
        ('{"noise": NaN}', 400, "request: is not valid JSON"),
        ("[" * 10_000, 400, "request: is not valid JSON"),
        ('{"means": [' + "1," * 9000 + "1]}", 413, f"the request is larger than {app_module.MAX_BODY} bytes"),
    ],
)
def test_a_bad_request_is_a_4xx_with_one_line_and_changes_nothing(client, body, status, message):
    key = create(client, {"means": [1, 0]})
    before = client.get(f"/api/sessions/{key}").json()
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post(
        f"/api/sessions/{key}/settings", content=content, headers={"content-type": "application/json"}
    )
    assert (response.status_code, response.json()["error"]) == (status, message)
    assert client.get(f"/api/sessions/{key}").json() == before


@pytest.mark.exact
def test_what_else_a_request_can_get_wrong(client):
    key = create(client)
    limit = LIMITS["steps_per_request"]
    for steps in (0, limit + 1, "5", True, 2.5, None):
        response = client.post(f"/api/sessions/{key}/step", json={"steps": steps})
        assert response.status_code == 400
        assert re.fullmatch(rf"steps: must be a whole number from 1 to {limit}, got .*", response.json()["error"])
    assert client.get(f"/api/sessions/{key}").json()["state"]["step"] == 0
    response = client.post(f"/api/sessions/{key}/settings", content="noise=1")  # a form post, as a foreign site
    assert response.status_code == 415 and "application/json" in response.json()["error"]
    missing = client.post("/api/sessions/nosuchsession/step", json={"steps": 1})
    assert missing.status_code == 404 and "reload the page" in missing.json()["error"]
    for rate in ("0", "1e-320", "0.1", "1000", "abc", "nan"):
        response = client.get(f"/api/sessions/{key}/run?rate={rate}")
        assert response.status_code == 400 and response.json()["error"].startswith("rate: ")
    assert client.get("/api/options", headers={"host": "attacker.example"}).status_code == 400  # DNS rebinding
    assert client.delete(f"/api/sessions/{key}").status_code == 405
    assert client.get("/no/such/page").status_code == 404


@pytest.mark.exact
def test_the_page_and_its_headers(client):
    page = client.get("/")
    assert page.status_code == 200 and "policygrad playground" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("playground.js", "playground.css"):
        assert client.get(f"/{asset}").status_code == 200
    assert "default-src 'self'" in client.get("/api/options").headers["content-security-policy"]


@pytest.mark.exact
def test_a_run_streams_the_terminals_steps_until_its_limit(client, monkeypatch):
    monkeypatch.setattr(app_module, "MAX_RUN_STEPS", 12)
    settings = {"means": [1, 0, 0.5], "seed": 5}
    key = create(client, settings)
    response = client.get(f"/api/sessions/{key}/run?rate=100")  # 5 steps a frame; ends after 12 (3 frames)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
        for block in response.text.strip().split("\n\n")
    ]
    assert [name for name, _ in events] == ["frame", "frame", "frame", "done"]
    records = [record for name, data in events if name == "frame" for record in data["records"]]
    assert [{k: r[k] for k in STEP_KEYS} for r in records] == bandit_json(settings, steps=15)["steps"]
    assert events[-1][1] == {"reason": "the step limit of one run", "steps": 15}
    assert client.get(f"/api/sessions/{key}").json()["state"]["running"] is False


@pytest.mark.property
def test_sessions_are_bounded(client):
    keys = [create(client) for _ in range(6)]  # the fixture's app keeps 4
    assert [client.get(f"/api/sessions/{key}").status_code for key in keys[:2]] == [404, 404]
    assert all(client.get(f"/api/sessions/{key}").status_code == 200 for key in keys[2:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.smoke
def test_the_command_serves_and_stops_on_ctrl_c():
    """`policygrad playground --port P`: prints the address, serves the page and the API, exits 0 on Ctrl+C; a port
    in use is one line naming --port."""
    import httpx

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [POLICYGRAD, "playground", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = server.stdout.readline()
        assert line.strip() == f"policygrad playground: serving on http://127.0.0.1:{port}/ (Ctrl+C to stop)"
        assert httpx.get(f"http://127.0.0.1:{port}/api/options", timeout=10).status_code == 200
        taken = subprocess.run(
            [POLICYGRAD, "playground", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert taken.returncode == 2 and taken.stderr.strip() == (
            f"policygrad playground: error: --port: port {port} is in use; pick another with --port (0 picks a free one)"
        )
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    assert "Traceback" not in server.stderr.read()


@pytest.mark.exact
def test_the_command_refuses_what_it_cannot_serve_safely(monkeypatch, capsys):
    """IPv6 loopback (its Host header cannot be checked against DNS rebinding) and a missing extra: one line each."""
    import sys

    from policygrad.cli import main

    assert main(["playground", "--host", "::1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "policygrad playground: error: --host: ::1 is not supported (its Host header cannot be checked); use "
        "127.0.0.1 or localhost"
    )
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install policygrad` without [playground]
    assert main(["playground", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "policygrad playground: error: playground: needs starlette and uvicorn (uvicorn is missing): pip install "
        "'policygrad[playground]'"
    )
