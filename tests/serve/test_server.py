"""policygrad serve: the limits, timeouts and errors of the app (against a stand-in engine, so that timing is
exact), then the real thing: a tiny run exported to 8 bits, served by transformers' engine on a free port, answering
chat and text completions, streamed and not, and refusing malformed requests with OpenAI-style errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from policygrad.serve.server import ServeConfig, build_app, served_name, vllm_command

# ---- the app against a stand-in engine ------------------------------------------------------------------------------


class StandIn:
    """What build_app needs of an engine, answering after ``delay`` seconds (streams: a chunk every ``every``)."""

    model_id = path = "/models/policy"
    context_length = 64

    def __init__(self, delay: float = 0.0, every: float = 0.0, fail: Exception | None = None):
        self.delay, self.every, self.fail = delay, every, fail
        self.bodies: list[dict] = []
        self.cancelled: list[str] = []

    def healthy(self) -> bool:
        return True

    def chat_prompt_tokens(self, body: dict) -> int:
        return sum(len(m["content"]) for m in body["messages"])

    def text_prompt_tokens(self, prompt: str) -> int:
        return len(prompt)

    def own_sampling(self, body: dict) -> bool:
        return False

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def handle(self, kind: str, body: dict, request_id: str, own_sampling: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        self.bodies.append(body)
        if self.fail is not None:
            raise self.fail
        await asyncio.sleep(self.delay)
        if body.get("stream"):

            async def chunks():
                for i in range(3):
                    await asyncio.sleep(self.every)
                    yield f'data: {{"model":"/models/policy","i":{i}}}\n\n'

            return StreamingResponse(chunks(), media_type="text/event-stream")
        return JSONResponse({"model": "/models/policy", "choices": [{"message": {"content": "ok"}}]})


def _app(engine: StandIn, **settings):
    values = dict(max_prompt_tokens=32, max_tokens=8, max_concurrent_requests=1, request_timeout=5.0)
    values.update(settings)
    return build_app(engine, ServeConfig("unused", **values), "policy")


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.exact
def test_requests_over_the_concurrency_limit_get_429_and_the_server_recovers():
    engine = StandIn(delay=0.3)

    async def scenario():
        async with _client(_app(engine)) as client:
            first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
            await asyncio.sleep(0.05)
            second = await client.post("/v1/chat/completions", json=CHAT)
            third = await client.post("/v1/completions", json={"prompt": "x"})  # still over: the first holds the slot
            done = await first
            after = await client.post("/v1/chat/completions", json=CHAT)
            health = await client.get("/health")
            return second, third, done, after, health

    second, third, done, after, health = asyncio.run(scenario())
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert third.status_code == 429
    assert done.status_code == 200 and done.json()["model"] == "policy"  # the engine's path renamed
    assert after.status_code == 200
    assert health.json()["in_flight"] == 0


@pytest.mark.exact
def test_a_request_past_its_timeout_is_504_and_cancelled():
    engine = StandIn(delay=2.0)

    async def scenario():
        async with _client(_app(engine, request_timeout=0.2)) as client:
            late = await client.post("/v1/chat/completions", json=CHAT)
            return late, await client.get("/health")

    late, health = asyncio.run(scenario())
    assert late.status_code == 504
    assert late.json()["error"]["code"] == "timeout" and "--request-timeout 0.2 s" in late.json()["error"]["message"]
    assert engine.cancelled == [late.headers["x-request-id"]]
    # the engine is still at it (a one-at-a-time generation cannot be cancelled): its slot stays taken until it ends,
    # so timed-out work cannot pile up past --max-concurrent-requests
    assert health.status_code == 200 and health.json()["in_flight"] == 1


@pytest.mark.exact
def test_a_timed_out_requests_slot_comes_back_when_the_engine_stops():
    engine = StandIn(delay=0.5)

    async def scenario():
        async with _client(_app(engine, request_timeout=0.1)) as client:
            late = await client.post("/v1/chat/completions", json=CHAT)
            busy = await client.post("/v1/chat/completions", json=CHAT)  # the slot is still the engine's
            await asyncio.sleep(0.8)
            return late, busy, await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})

    late, busy, later = asyncio.run(scenario())
    assert (late.status_code, busy.status_code) == (504, 429)
    assert later.status_code == 504  # the slot came back: the request was taken (and timed out in its turn)


@pytest.mark.exact
def test_a_body_that_trickles_or_overflows_does_not_hold_a_slot():
    from policygrad.serve.server import MAX_BODY_BYTES

    async def trickle():
        yield b'{"messages": '
        await asyncio.sleep(5)  # never finishes within the request's time
        yield b"[]}"

    async def flood():
        for _ in range(MAX_BODY_BYTES // 65536 + 2):  # chunked: no Content-Length to refuse it by
            yield b" " * 65536

    async def scenario():
        async with _client(_app(StandIn(), request_timeout=0.2)) as client:
            slow = await client.post("/v1/chat/completions", content=trickle())
            big = await client.post("/v1/chat/completions", content=flood())
            return slow, big, await client.post("/v1/chat/completions", json=CHAT)

    slow, big, after = asyncio.run(scenario())
    assert slow.status_code == 408 and slow.json()["error"]["message"].startswith("body: not received within")
    assert big.status_code == 413 and big.json()["error"]["message"].startswith("body: more than the")
    assert after.status_code == 200  # the one slot is free again


@pytest.mark.exact
def test_a_stream_past_its_timeout_ends_with_an_error_event_and_done():
    engine = StandIn(every=0.15)

    async def scenario():
        async with _client(_app(engine, request_timeout=0.4)) as client:
            stream = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            return stream, await client.get("/health")

    stream, health = asyncio.run(scenario())
    events = [line[len("data: ") :] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert [json.loads(e)["i"] for e in events[:2]] == [0, 1]
    assert json.loads(events[-2])["error"]["code"] == "timeout"
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["model"] == "policy"
    assert health.json()["in_flight"] == 0


@pytest.mark.exact
def test_engine_failures_are_json_errors_and_the_server_stays_up():
    from starlette.exceptions import HTTPException

    async def post(engine):
        async with _client(_app(engine)) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
            return response, await client.get("/health")

    crashed, health = asyncio.run(post(StandIn(fail=RuntimeError("boom\nsecond line"))))
    assert crashed.status_code == 500
    assert crashed.json()["error"] == {
        "message": "engine: RuntimeError: boom",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert health.status_code == 200
    refused, _ = asyncio.run(post(StandIn(fail=HTTPException(422, "Unexpected fields in the request: {'x'}"))))
    assert refused.status_code == 400 and "Unexpected fields" in refused.json()["error"]["message"]


@pytest.mark.exact
def test_the_engine_gets_the_servers_defaults_and_the_limit():
    engine = StandIn()

    async def scenario():
        async with _client(_app(engine, temperature=0.0)) as client:
            await client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 3, "model": "policy"})
            await client.post("/v1/completions", json={"prompt": ["once"]})

    asyncio.run(scenario())
    chat, text = engine.bodies
    assert chat["max_tokens"] == 3 and "max_completion_tokens" not in chat
    assert chat["temperature"] == 0.0 and chat["top_p"] == 1.0 and chat["model"] == "/models/policy"
    assert text["prompt"] == "once" and text["max_tokens"] == 8


@pytest.mark.exact
def test_routes_and_methods_that_do_not_exist_are_json():
    async def scenario():
        async with _client(_app(StandIn())) as client:
            return await client.get("/v1/nothing"), await client.get("/v1/chat/completions")

    missing, wrong_method = asyncio.run(scenario())
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


@pytest.mark.exact
def test_served_name_and_the_vllm_command():
    assert served_name(Path("out/policy-int8")) == "policy-int8"
    assert served_name(Path("runs/exp/final"), "mine") == "mine"
    command = vllm_command(
        Path("out"), ServeConfig("out", port=9000, max_prompt_tokens=100, max_tokens=28, prefix_caching=False), "p"
    )
    assert command[:3] == ["vllm", "serve", "out"]
    flags = dict(zip(command[3::2], command[4::2]))
    assert flags["--max-model-len"] == "128" and flags["--port"] == "9000" and flags["--served-model-name"] == "p"
    assert command[-1] == "--no-enable-prefix-caching"


# ---- the real engine on a free port ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    from policygrad.serve.export import ExportConfig, export

    out = tmp_path_factory.mktemp("served") / "tiny-int8"
    export(ExportConfig(source=str(tiny_run), output=out, quantize="int8", verify=False, threads=1))
    return out


@pytest.fixture(scope="module")
def server(exported):
    """The int8 export served by transformers' engine (continuous batching, greedy by default) under uvicorn, in a
    thread, on a free port: (base url, engine)."""
    import uvicorn

    from policygrad.net import listen
    from policygrad.serve.server import Engine

    config = ServeConfig(
        str(exported), max_prompt_tokens=200, max_tokens=16, max_concurrent_requests=4, temperature=0.0
    )
    engine = Engine(exported, config)
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(build_app(engine, config, "tiny"), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", engine
    uv.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()
    sock.close()


def _events(response: httpx.Response) -> list:
    data = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


@pytest.mark.smoke
def test_health_and_models(server):
    url, _ = server
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 216


@pytest.mark.smoke
def test_chat_and_text_completions_answer(server):
    url, _ = server
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", **CHAT, "max_tokens": 5}, timeout=30)
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["prompt_tokens"] == len("<|user|>hi<|assistant|>") - len("<|user|><|assistant|>") + 2
    assert body["usage"]["completion_tokens"] <= 5
    text = httpx.post(f"{url}/v1/completions", json={"prompt": "Once", "max_tokens": 4}, timeout=30)
    assert text.status_code == 200 and text.json()["object"] == "text_completion"


@pytest.mark.smoke
def test_streams_are_server_sent_events_ending_in_done(server):
    url, _ = server
    chat = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 6, "stream": True}, timeout=30)
    assert chat.status_code == 200 and chat.headers["content-type"].startswith("text/event-stream")
    chunks = _events(chat)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    whole = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 6}, timeout=30).json()
    assert streamed == whole["choices"][0]["message"]["content"]  # greedy: the same answer, streamed or not
    text = httpx.post(f"{url}/v1/completions", json={"prompt": "Once", "max_tokens": 3, "stream": True}, timeout=30)
    assert _events(text)[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("content", "body", "status", "param"),
    [
        ("{bad json", None, 400, None),
        (None, {"model": "tiny"}, 400, "messages"),
        (None, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
        (None, {**CHAT, "max_tokens": 17}, 400, "max_tokens"),
        (None, {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),
        (None, {**CHAT, "model": "gpt-4o"}, 404, "model"),
        (None, {**CHAT, "temperature": -1}, 400, "temperature"),
        (None, {**CHAT, "unknown_field": 1}, 400, None),
    ],
)
def test_malformed_requests_get_openai_errors(server, content, body, status, param):
    url, _ = server
    kwargs = {"content": content, "headers": {"content-type": "application/json"}} if content else {"json": body}
    response = httpx.post(f"{url}/v1/chat/completions", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "\n" not in error["message"]
    if body and "x" * 300 in json.dumps(body):
        assert error["code"] == "context_length_exceeded"
    assert httpx.get(f"{url}/health").status_code == 200  # still up


@pytest.mark.smoke
def test_concurrent_requests_are_batched_and_own_sampling_is_honoured(server):
    url, _ = server

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            requests = [
                client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"q{i}"}]})
                for i in range(4)
            ]
            sampled = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0.8, "seed": 1})
            return await asyncio.gather(*requests), await sampled

    answers, sampled = asyncio.run(scenario())
    assert all(a.status_code == 200 for a in answers)
    assert sampled.status_code == 200  # its own temperature: the engine's sequential path


@pytest.mark.smoke
def test_served_greedy_answers_match_policygrads_own_sampler(server, exported):
    """Serving must not change what the policy says: greedy completions through the API equal those of
    policygrad's rollout sampler (the path of training and evaluation) on the same folder, one prompt at a time."""
    from policygrad.lm.models import load_model
    from policygrad.lm.rollout import sample

    url, _ = server
    model, tokenizer = load_model(str(exported))
    for prompt in ("Reply with 8 characters.", "abc", "The digits must add up to 5."):
        served = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 12},
            timeout=30,
        ).json()["choices"][0]["message"]["content"]
        own = sample(model, tokenizer, [prompt], 1, 12, 1.0, 1.0, greedy=True, score_tokens=False).completions[0]
        assert served == own, prompt


# ---- the command ----------------------------------------------------------------------------------------------------


@pytest.mark.exact
def test_cli_wrong_folder_is_one_line(policygrad_cli, capsys, tmp_path):
    assert policygrad_cli("serve", [str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("policygrad serve: error: DIR: no such folder")
    assert policygrad_cli("serve", [str(tmp_path), "--max-tokens", "0"]) == 2
    assert "--max-tokens" in capsys.readouterr().err


@pytest.mark.smoke
def test_cli_serves_on_a_free_port_and_stops_cleanly_on_sigterm(exported):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "policygrad.serve.server", str(exported), "--port", "0", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving tiny-int8"), line + process.stderr.read()
        url = line.split(" at ")[1].split()[0].removesuffix("/v1")
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        answer = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=30)
        assert answer.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0
    assert "policygrad serve: stopped" in process.stderr.read()
