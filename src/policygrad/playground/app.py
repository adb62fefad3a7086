"""The playground's web application (Starlette, an ASGI framework): a JSON API over :class:`~.session.Sessions` and
the static page. Every route answers a mistake with status 4xx and ``{"error": one line, "field": name}``.

    GET  /api/options                     baselines (name, label), defaults, limits
    POST /api/sessions                    settings (JSON object, partial)      -> 201 {id, settings, state}
    GET  /api/sessions/{id}                                                    -> {settings, state}
    POST /api/sessions/{id}/settings      settings (partial)                   -> {settings, state, reset}
    POST /api/sessions/{id}/step          {"steps": n}, 1 <= n <= limit        -> {records, state}
    POST /api/sessions/{id}/reset                                              -> {state}
    POST /api/sessions/{id}/pause                                              -> {state}
    GET  /api/sessions/{id}/run?rate=r    server-sent events: "frame" {records, state} about 20 times a second,
                                          r steps a second, until paused, reset, disconnected or the step limit;
                                          then "done" {reason}; a diverged step sends "failed" {error, field}

Safety: JSON only (a cross-site form cannot post it without a preflight this app does not answer), bodies of at most
:data:`MAX_BODY` bytes, a Host header check against DNS rebinding when bound to loopback, a strict Content Security
Policy, and the bounds of :data:`~.session.LIMITS`. The learner runs in a worker thread under the session's lock.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from policygrad.bandit.config import BanditConfig
from policygrad.errors import UsageError
from policygrad.playground.session import (
    LABELS,
    LIMITS,
    Session,
    Sessions,
    parse_settings,
    settings_json,
)
from policygrad.variants import BANDIT_BASELINES

MAX_BODY = 16_384  # bytes of one request's JSON
FRAMES_PER_SECOND = 20  # of a run stream
MAX_RATE = 100  # steps a second of a run stream
MAX_RUN_STEPS = 20_000  # steps of one run stream; the page's Run starts another
MIN_RATE = 0.5  # steps a second of a run stream: slower would hold a connection open for minutes per frame
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": f"{field}: {message}" if field else message, "field": field}, status_code=status)


def _usage(err: UsageError) -> JSONResponse:
    return JSONResponse({"error": str(err), "field": err.field}, status_code=400)


async def _json_body(request: Request) -> Any:
    """The request's JSON, at most MAX_BODY bytes. Raises HTTPException 413/415, or UsageError for bad JSON."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send JSON, with Content-Type: application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise HTTPException(413, f"the request is larger than {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"the request is larger than {MAX_BODY} bytes")
    if not body.strip():
        return {}
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise UsageError("request", "is not valid JSON") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _steps(data: Any) -> int:
    limit = LIMITS["steps_per_request"]
    value = data.get("steps", 1) if isinstance(data, dict) else data
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UsageError("steps", f"must be a whole number from 1 to {limit}, got {str(value)[:40]!r}")
    return value


def _rate(text: str | None) -> float:
    try:
        rate = float(text if text is not None else 20)
    except ValueError:
        raise UsageError("rate", f"must be a number of steps a second, got {text[:40]!r}") from None
    if not (math.isfinite(rate) and MIN_RATE <= rate <= MAX_RATE):
        raise UsageError("rate", f"must be in [{MIN_RATE:g}, {MAX_RATE}] steps a second, got {rate:g}")
    return rate


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n"


def create_app(sessions: Sessions, allowed_hosts: list[str] | None = None) -> Starlette:
    """The application over ``sessions``; ``allowed_hosts`` the Host headers it answers (None: any)."""

    def session_of(request: Request) -> Session:
        try:
            return sessions.get(request.path_params["key"])
        except KeyError:
            raise HTTPException(
                404, "no such session (forgotten after a while or when too many tabs are open); reload the page"
            ) from None

    async def options(request: Request) -> JSONResponse:
        baselines = [{"name": name, "label": LABELS.get(name, name)} for name in BANDIT_BASELINES.names]
        limits = {**LIMITS, "rate": MAX_RATE}
        return JSONResponse({"baselines": baselines, "defaults": settings_json(BanditConfig()), "limits": limits})

    async def create(request: Request) -> JSONResponse:
        settings = parse_settings(await _json_body(request))
        key, session = sessions.create(settings)
        state = await run_in_threadpool(session.state)
        return JSONResponse({"id": key, "settings": settings_json(settings), "state": state}, status_code=201)

    async def show(request: Request) -> JSONResponse:
        session = session_of(request)
        async with session.lock:
            state = await run_in_threadpool(session.state)
        return JSONResponse({"settings": settings_json(session.settings), "state": state})

    async def configure(request: Request) -> JSONResponse:
        session = session_of(request)
        data = await _json_body(request)
        async with session.lock:
            reset = session.configure(parse_settings(data, session.settings))
            state = await run_in_threadpool(session.state)
        return JSONResponse({"settings": settings_json(session.settings), "state": state, "reset": reset})

    async def step(request: Request) -> JSONResponse:
        session = session_of(request)
        steps = _steps(await _json_body(request))
        async with session.lock:
            records = await run_in_threadpool(session.advance, steps)
            state = await run_in_threadpool(session.state)
        return JSONResponse({"records": records, "state": state})

    async def reset(request: Request) -> JSONResponse:
        session = session_of(request)
        async with session.lock:
            session.running = False
            session.reset()
            state = await run_in_threadpool(session.state)
        return JSONResponse({"state": state})

    async def pause(request: Request) -> JSONResponse:
        session = session_of(request)
        session.running = False
        async with session.lock:
            state = await run_in_threadpool(session.state)
        return JSONResponse({"state": state})

    async def run(request: Request) -> StreamingResponse:
        session = session_of(request)
        rate = _rate(request.query_params.get("rate"))
        per_frame = max(1, round(rate / FRAMES_PER_SECOND))
        interval = per_frame / rate
        session.running = True
        generation, token = session.generation, object()
        session.stream = token  # a newer stream of the same session ends this one

        async def frames():
            taken, reason = 0, "the step limit of one run"
            while taken < MAX_RUN_STEPS:
                async with session.lock:  # checked under the lock: a reset or pause queued before it wins
                    if not session.running or session.stream is not token or session.generation != generation:
                        reason = "paused"
                        break
                    sessions.touch(session)  # a long run is not an idle tab
                    try:
                        records = await run_in_threadpool(session.advance, per_frame)
                    except UsageError as err:
                        session.running = False
                        yield _sse("failed", {"error": str(err), "field": err.field})
                        return
                    state = await run_in_threadpool(session.state)
                taken += per_frame
                yield _sse("frame", {"records": records, "state": state})
                await asyncio.sleep(interval)
            if session.stream is token:
                session.running = False
            yield _sse("done", {"reason": reason, "steps": taken})

        return StreamingResponse(frames(), media_type="text/event-stream", headers={"x-accel-buffering": "no"})

    async def usage_error(request: Request, exc: UsageError) -> JSONResponse:
        return _usage(exc)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, "", exc.detail)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, "", f"internal error ({type(exc).__name__}); please report it")

    api = "/api/sessions/{key:str}"
    routes = [
        Route("/api/options", options),
        Route("/api/sessions", create, methods=["POST"]),
        Route(api, show),
        Route(api + "/settings", configure, methods=["POST"]),
        Route(api + "/step", step, methods=["POST"]),
        Route(api + "/reset", reset, methods=["POST"]),
        Route(api + "/pause", pause, methods=["POST"]),
        Route(api + "/run", run),
        Mount("/", StaticFiles(packages=[("policygrad.playground", "static")], html=True)),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={UsageError: usage_error, HTTPException: http_error, Exception: server_error},
    )
