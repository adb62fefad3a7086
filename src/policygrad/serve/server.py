"""``policygrad serve DIR``: an OpenAI-compatible HTTP server for an exported policy (or a run, a checkpoint, a model).

Generation is an existing engine's, never ours:

    --engine vllm          vLLM's own OpenAI server (``vllm serve``), with our limits mapped onto its flags; needs a
                           CUDA GPU and the vllm package
    --engine transformers  transformers' serving engine (``transformers serve``, 5.x): its request handlers and, by
                           default, its continuous batching (paged attention, ``init_continuous_batching``) with
                           prefix sharing; runs on a CPU
    --engine auto          vllm where a CUDA GPU and vllm are both there, else transformers

For the transformers engine, our own small ASGI app (Starlette, served by uvicorn) stands in front of the engine's
handlers and adds what a service needs: request checks with OpenAI-style errors (:mod:`policygrad.serve.api`), a
prompt-length and max_tokens limit, a limit on requests in flight (429 beyond it), a timeout per request (504, and
the generation is cancelled), ``data: [DONE]`` at the end of a stream, ``/health`` and ``/v1/models``. The server
stays up through bad requests, overload and engine errors: each is one JSON error response.

Continuous batching decodes every request in the batch with one sampling setting (the server's ``--temperature``
and ``--top-p``). A request that asks for other sampling (its own temperature, top_p, stop, seed, ...) is generated
by the same engine's sequential path instead (``model.generate`` on its inference thread), so it gets exactly what it
asked for, without the batching.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both stream with ``"stream": true``, as
server-sent events), ``GET /v1/models``, ``GET /health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import importlib.util
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import tyro

from policygrad.configs import default_hint
from policygrad.errors import UsageError, first_line
from policygrad.errors import require as _require
from policygrad.net import listen
from policygrad.serve import BNB_CAST_LOGGER, api

if TYPE_CHECKING:  # pragma: no cover
    from starlette.applications import Starlette

__all__ = ["Engine", "ServeConfig", "build_app", "run_serve", "served_name", "vllm_command"]

MAX_BODY_BYTES = 2 * 1024 * 1024
"""Largest request body read (413 beyond it): far above any prompt within --max-prompt-tokens."""

log = logging.getLogger("policygrad.serve")


@dataclasses.dataclass
class ServeConfig:
    """Serve a policy over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health), on vLLM where there is a GPU and on transformers' serving engine elsewhere."""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="DIR")]
    """an exported folder (policygrad export), a run (its final weights), a checkpoint or model folder, or
    "default" (the embedded SmolLM2-135M-Instruct)"""
    host: str = "127.0.0.1"
    """address to listen on (0.0.0.0 exposes the server to the network: it has no authentication)"""
    port: int = 8000
    """port to listen on (0: a free one, printed at start)"""
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    """auto: vllm where a CUDA GPU and the vllm package are there, else transformers"""
    served_model_name: Annotated[str | None, default_hint("the folder's name, or the run's for final/ and step-N/")] = (
        None
    )
    """the name clients put in the "model" field of a request"""
    continuous_batching: bool = True
    """transformers engine: batch concurrent requests step by step (paged attention); off: one at a time"""
    prefix_caching: bool = True
    """share the key/value cache of identical prompt prefixes between requests (whole pages only)"""
    max_concurrent_requests: int = 16
    """requests in flight at once (streams included); more are refused with 429 at once"""
    max_prompt_tokens: int = 1024
    """longest prompt in tokens, after the chat template (400 beyond it)"""
    max_tokens: int = 256
    """the most tokens a request may generate (400 beyond it), and what it gets when it does not say"""
    request_timeout: float = 120.0
    """seconds a request may take from arrival to its last token (504; a batched generation is cancelled, a
    one-at-a-time one runs to its end and keeps its slot until then)"""
    temperature: float = 1.0
    """sampling temperature of requests that do not set one (0: greedy); continuous batching decodes with this"""
    top_p: float = 1.0
    """nucleus sampling of requests that do not set it, in (0, 1]"""
    kv_page_size: int = 32
    """tokens per page of the paged key/value cache (prefix sharing reuses whole pages)"""
    kv_cache_tokens: Annotated[
        int | None, default_hint("max_concurrent_requests x (max_prompt_tokens + max_tokens)")
    ] = None
    """key/value cache size in tokens"""
    max_batch_tokens: int = 512
    """tokens one forward pass of the continuous batch may hold (prompts are split across passes beyond it)"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:<index>"""
    threads: Annotated[int | None, default_hint("one per idle core")] = None
    """CPU threads for torch"""
    access_log: bool = False
    """print one line per request (uvicorn's access log)"""

    def __post_init__(self) -> None:
        _require(bool(self.model.strip()), "DIR", "give an exported folder, a run or model folder, or 'default'")
        _require(bool(self.host.strip()), "--host", "give an address to listen on, e.g. 127.0.0.1")
        _require(0 <= self.port <= 65535, "--port", f"must be in [0, 65535], got {self.port}")
        if self.served_model_name is not None:
            _require(bool(self.served_model_name.strip()), "--served-model-name", "must not be empty")
        for flag, value in (
            ("--max-concurrent-requests", self.max_concurrent_requests),
            ("--max-prompt-tokens", self.max_prompt_tokens),
            ("--max-tokens", self.max_tokens),
            ("--max-batch-tokens", self.max_batch_tokens),
        ):
            _require(value >= 1, flag, f"must be at least 1, got {value}")
        _require(self.kv_page_size >= 4, "--kv-page-size", f"must be at least 4, got {self.kv_page_size}")
        if self.kv_cache_tokens is not None:
            _require(
                self.kv_cache_tokens >= self.max_prompt_tokens + self.max_tokens,
                "--kv-cache-tokens",
                f"must hold one request of max_prompt_tokens + max_tokens = {self.max_prompt_tokens + self.max_tokens}"
                f" tokens, got {self.kv_cache_tokens}",
            )
        _require(
            self.request_timeout > 0 and self.request_timeout < float("inf"),
            "--request-timeout",
            f"must be a number of seconds > 0, got {self.request_timeout}",
        )
        _require(0 <= self.temperature <= 2, "--temperature", f"must be in [0, 2], got {self.temperature}")
        _require(0 < self.top_p <= 1, "--top-p", f"must be in (0, 1], got {self.top_p}")
        _require(
            self.device in ("auto", "cpu") or self.device.split(":")[0] == "cuda",
            "--device",
            f"must be auto, cpu, cuda or cuda:<index>, got {self.device!r}",
        )
        if self.threads is not None:
            _require(self.threads >= 1, "--threads", f"must be at least 1, got {self.threads}")

    @property
    def cache_tokens(self) -> int:
        """The key/value cache size in tokens that the engine gets."""
        if self.kv_cache_tokens is not None:
            return self.kv_cache_tokens
        return self.max_concurrent_requests * (self.max_prompt_tokens + self.max_tokens)


def served_name(folder: Path, given: str | None = None) -> str:
    """The model name clients use: ``given``, else the folder's name, where ``final`` and ``step-N`` take their run's
    name (``runs/exp/final`` -> ``exp``, ``runs/exp/checkpoints/step-000040`` -> ``exp-step-000040``).

    >>> served_name(Path("runs/exp/final")), served_name(Path("runs/exp/checkpoints/step-000040"))
    ('exp', 'exp-step-000040')
    """
    if given:
        return given
    if folder.name == "final":
        return folder.parent.name
    if folder.parent.name == "checkpoints":
        return f"{folder.parent.parent.name}-{folder.name}"
    return folder.name


# --------------------------------------------------------------------------------------------------------------
# vLLM, on a GPU
# --------------------------------------------------------------------------------------------------------------


def vllm_available() -> bool:
    """Whether vLLM can serve here: the package is installed and torch sees a CUDA GPU."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def vllm_command(folder: Path, config: ServeConfig, name: str, executable: str = "vllm") -> list[str]:
    """The ``vllm serve`` command that serves ``folder`` with ``config``'s address and limits. vLLM reads the
    quantization (bitsandbytes, torchao) from the folder's config.json; it queues requests beyond
    ``--max-num-seqs`` rather than refusing them.

    >>> vllm_command(Path("out"), ServeConfig("out", port=9000), "out")[:4]
    ['vllm', 'serve', 'out', '--host']
    """
    return [
        executable,
        "serve",
        str(folder),
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--served-model-name",
        name,
        "--max-model-len",
        str(config.max_prompt_tokens + config.max_tokens),
        "--max-num-seqs",
        str(config.max_concurrent_requests),
        "--enable-prefix-caching" if config.prefix_caching else "--no-enable-prefix-caching",
    ]


def _run_vllm(folder: Path, config: ServeConfig, name: str) -> int:
    executable = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
    command = vllm_command(folder, config, name, executable)
    print(f"policygrad serve: starting vLLM: {' '.join(command)}", file=sys.stderr, flush=True)
    try:
        return subprocess.call(command)
    except FileNotFoundError:
        raise UsageError("--engine", f"vllm is importable but its command was not found ({executable})") from None


# --------------------------------------------------------------------------------------------------------------
# transformers' serving engine
# --------------------------------------------------------------------------------------------------------------

_OWN_SAMPLING: contextvars.ContextVar[bool] = contextvars.ContextVar("policygrad_own_sampling", default=False)
"""Set while a request that asked for its own sampling is handed to the engine: it goes to the sequential path."""


class Engine:
    """transformers' serving engine for one model folder: its model manager, generation state and request handlers
    (``transformers.cli.serving``), with continuous batching started at once with the server's sampling setting.

    Everything a request needs from the model goes through here: counting prompt tokens, handing the request to
    transformers' handler, cancelling it, and telling whether the engine is healthy.
    """

    def __init__(self, folder: Path, config: ServeConfig):
        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig
        from transformers.cli.serving.chat_completion import ChatCompletionHandler
        from transformers.cli.serving.completion import CompletionHandler
        from transformers.cli.serving.model_manager import ModelManager
        from transformers.cli.serving.utils import GenerationState

        class State(GenerationState):
            """transformers' generation state, but a request marked by :data:`_OWN_SAMPLING` is generated on the
            sequential path: continuous batching would decode it with the server's sampling instead of its own."""

            def use_continuous_batching(self, model: Any, modality: Any) -> bool:
                return not _OWN_SAMPLING.get() and super().use_continuous_batching(model, modality)

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
        logging.getLogger("transformers.cli.serving").setLevel(logging.ERROR)  # a line per request otherwise
        logging.getLogger(BNB_CAST_LOGGER).setLevel(logging.ERROR)  # a line per 8-bit matmul on CPU otherwise
        self.config = config
        self.path = str(folder)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device", f"{config.device} was asked for but CUDA is not available here")
        try:
            self.models = ModelManager(device=device, dtype="auto", force_model=self.path, model_timeout=-1)
            self.model_id = self.models.process_model_name(self.path)
            self.model, self.processor = self.models.load_model_and_processor(self.model_id)
        except Exception as exc:  # noqa: BLE001 - a folder's files can make transformers raise anything
            raise UsageError("DIR", f"could not load {folder}: {first_line(exc)}") from exc
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        generation = self.model.generation_config
        generation.do_sample = True  # a request's temperature 0 turns it off (OpenAI semantics: sampling by default)
        generation.temperature, generation.top_p, generation.top_k = config.temperature or 1.0, config.top_p, None
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        pages = -(-config.cache_tokens // config.kv_page_size)
        self.state = State(
            continuous_batching=config.continuous_batching,
            cb_config=ContinuousBatchingConfig(
                page_size=config.kv_page_size,
                num_blocks=pages,
                max_batch_tokens=config.max_batch_tokens,
                max_requests_per_batch=config.max_concurrent_requests,
                allow_block_sharing=config.prefix_caching,
            ),
        )
        self.chat_handler = ChatCompletionHandler(model_manager=self.models, generation_state=self.state)
        self.completion_handler = CompletionHandler(model_manager=self.models, generation_state=self.state)
        if config.continuous_batching:
            batched = GenerationConfig.from_dict(generation.to_dict())
            batched.do_sample = config.temperature > 0
            batched.max_new_tokens = config.max_tokens
            batched.use_cache = False  # the batch keeps its own paged cache
            self.state.get_manager(self.model_id, use_cb=True).init_cb(self.model, batched)

    # ---- what requests need -------------------------------------------------------------------------------------

    def chat_prompt_tokens(self, body: dict[str, Any]) -> int:
        """Tokens of the chat request's prompt, rendered by the model's chat template as the engine will."""
        messages = [_flatten_content(message) for message in body["messages"]]
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tools=body.get("tools"), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # noqa: BLE001 - a template raises what its author wrote (e.g. roles must alternate)
            message = f"messages: the model's chat template refused them: {first_line(exc)}"
            raise api.ApiError(400, message, "messages") from None
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        return len(ids)

    def text_prompt_tokens(self, prompt: str) -> int:
        """Tokens of a text completion's prompt, encoded as the engine will (with the tokenizer's special tokens)."""
        return len(self.tokenizer(prompt)["input_ids"])

    def own_sampling(self, body: dict[str, Any]) -> bool:
        """Whether the request asks for sampling other than the server's (so continuous batching cannot serve it)."""
        if not self.config.continuous_batching:
            return False
        if float(body.get("temperature", self.config.temperature)) != self.config.temperature:
            return True
        if float(body.get("top_p", self.config.top_p)) != self.config.top_p:
            return True
        return any(body.get(field) not in (None, 0, 0.0) for field in api.OTHER_SAMPLING_FIELDS)

    async def handle(self, kind: str, body: dict[str, Any], request_id: str, own_sampling: bool) -> Any:
        """Hand the (checked) request to transformers' handler for ``kind`` ("chat" or "text")."""
        handler = self.chat_handler if kind == "chat" else self.completion_handler
        token = _OWN_SAMPLING.set(own_sampling)
        try:
            return await handler.handle_request(body, request_id)
        finally:
            _OWN_SAMPLING.reset(token)

    def cancel(self, request_id: str) -> None:
        """Stop generating for a request whose client gave up or whose time ran out (continuous batching only: the
        sequential path runs a request to its end)."""
        manager = getattr(self.state, "_cb_manager", None)
        batch = getattr(manager, "_cb", None)
        if batch is not None:
            with contextlib.suppress(Exception):  # the request may have finished meanwhile
                batch.cancel_request(request_id)

    def healthy(self) -> bool:
        """Whether the engine can take requests (continuous batching's worker thread has not died)."""
        return self.state.is_cb_alive()

    def shutdown(self) -> None:
        """Stop the batching worker and free the model."""
        self.state.shutdown()
        self.models.shutdown()


async def _read_body(request: Any) -> bytes:
    """The request's body, read chunk by chunk and refused (413) once it passes :data:`MAX_BODY_BYTES`, whatever
    its Content-Length said (a chunked body declares none)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise api.ApiError(413, f"body: more than the {MAX_BODY_BYTES} bytes this server accepts")
        chunks.append(chunk)
    return b"".join(chunks)


def _flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose content is a list of text parts, with the parts joined as the engine joins them."""
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": " ".join(part["text"] for part in content)}
    return message


# --------------------------------------------------------------------------------------------------------------
# The ASGI app in front of the engine
# --------------------------------------------------------------------------------------------------------------


def _error(error: api.ApiError, request_id: str | None = None) -> Any:
    from starlette.responses import JSONResponse

    headers = {"X-Request-ID": request_id} if request_id else {}
    if error.status == 429:
        headers["Retry-After"] = "1"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _from_handler(exc: Exception) -> api.ApiError:
    """An exception the engine's handler raised, as an API error: its HTTPExceptions keep their status (422 becomes
    400, as OpenAI answers a malformed request), a dead batching worker is 503, anything else 500."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and hasattr(exc, "detail"):
        status = 400 if status == 422 else status
        kind = "invalid_request_error" if status < 500 else "server_error"
        return api.ApiError(status, f"request: {exc.detail}", type=kind)
    if type(exc).__name__ == "CBWorkerDeadError":
        return api.ApiError(503, f"engine: {first_line(exc)}", type="server_error", code="engine_unavailable")
    return api.ApiError(500, f"engine: {type(exc).__name__}: {first_line(exc)}", type="server_error")


class _Slots:
    """Requests in flight, at most ``limit``: the event loop is single-threaded, so a counter is enough."""

    def __init__(self, limit: int):
        self.limit, self.active = limit, 0

    def take(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def give(self) -> None:
        self.active -= 1


def build_app(engine: Engine, config: ServeConfig, name: str) -> Starlette:
    """The ASGI app: OpenAI routes whose requests are checked (:mod:`policygrad.serve.api`), limited and timed, then
    generated by ``engine``; every error is an OpenAI-style JSON body."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    limits = api.Limits(config.max_prompt_tokens, config.max_tokens, engine.context_length)
    slots = _Slots(config.max_concurrent_requests)
    started = int(time.time())
    # the engine names the model by its path; clients know it by `name`
    path_json = json.dumps(engine.model_id, ensure_ascii=False)
    name_json = json.dumps(name, ensure_ascii=False)

    def renamed(text: str) -> str:
        return text.replace(f'"model":{path_json}', f'"model":{name_json}')

    async def streamed(chunks: AsyncIterator[Any], request_id: str, deadline: float) -> AsyncIterator[str]:
        """The engine's SSE chunks, renamed, cut off at the deadline (with an error event), ended by [DONE]; the
        slot is given back and the generation cancelled however the stream ends (a client that leaves included)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), remaining)
                except StopAsyncIteration:
                    break
                yield renamed(chunk if isinstance(chunk, str) else chunk.decode("utf-8"))
        except asyncio.TimeoutError:
            engine.cancel(request_id)
            timeout = api.error_body(
                f"request: no answer within --request-timeout {config.request_timeout:g} s", "timeout", None, "timeout"
            )
            yield f"data: {json.dumps(timeout)}\n\n"
        finally:
            slots.give()
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001 - an engine generator that fails on close must not kill the server
                    log.exception("closing a stream failed")
        yield "data: [DONE]\n\n"

    async def generate(request: Request, kind: str) -> Any:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        if not slots.take():
            message = f"server: {config.max_concurrent_requests} requests are in flight, the most it takes; retry"
            return _error(api.ApiError(429, message, type="rate_limit_error", code="too_many_requests"), request_id)
        slot_handed_on = False
        deadline = asyncio.get_running_loop().time() + config.request_timeout
        try:
            if not engine.healthy():
                raise api.ApiError(503, "engine: not available", type="server_error", code="engine_unavailable")
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                raise api.ApiError(413, f"body: {declared} bytes, more than the {MAX_BODY_BYTES} this server accepts")
            try:  # a body that trickles in must not hold the slot past the request's time, nor grow past the cap
                raw = await asyncio.wait_for(_read_body(request), config.request_timeout)
            except asyncio.TimeoutError:
                message = f"body: not received within --request-timeout {config.request_timeout:g} s"
                raise api.ApiError(408, message, code="timeout") from None
            body = api.parse_body(raw, MAX_BODY_BYTES)
            api.check_common(body, name, limits)
            if kind == "chat":
                api.chat_messages(body)
                prompt_tokens, param = engine.chat_prompt_tokens(body), "messages"
            else:
                body["prompt"] = api.completion_prompt(body)
                prompt_tokens, param = engine.text_prompt_tokens(body["prompt"]), "prompt"
            max_tokens = api.requested_max_tokens(body, limits)
            api.check_context(prompt_tokens, max_tokens, limits, param)
            body.pop("max_completion_tokens", None)
            body.update(max_tokens=max_tokens, model=engine.path)
            for field in api.SAMPLING_FIELDS:  # the server's sampling unless the request sets its own
                if body.get(field) is None:
                    body[field] = getattr(config, field)
            own = engine.own_sampling(body)
            task = asyncio.ensure_future(engine.handle(kind, body, request_id, own))
            try:
                response = await asyncio.wait_for(asyncio.shield(task), config.request_timeout)
            except asyncio.TimeoutError:
                engine.cancel(request_id)
                # the slot stays taken until the engine has really stopped: one-at-a-time generation cannot be
                # cancelled and runs to its end, and a freed slot would let such work pile up without bound
                task.add_done_callback(lambda _: slots.give())
                slot_handed_on = True  # the slot is the task's now
                message = f"request: no answer within --request-timeout {config.request_timeout:g} s"
                raise api.ApiError(504, message, type="timeout", code="timeout") from None
            except api.ApiError:
                raise
            except Exception as exc:  # noqa: BLE001 - every engine error becomes one JSON error; the server stays up
                error = _from_handler(exc)
                if error.status >= 500:
                    log.error("request %s failed: %s", request_id, error.message)
                raise error from None
            if isinstance(response, StreamingResponse):
                slot_handed_on = True
                return StreamingResponse(
                    streamed(response.body_iterator, request_id, deadline),
                    media_type="text/event-stream",
                    headers={"X-Request-ID": request_id, "Cache-Control": "no-cache"},
                )
            return JSONResponse(
                json.loads(renamed(bytes(response.body).decode("utf-8"))),
                status_code=response.status_code,
                headers={"X-Request-ID": request_id},
            )
        except api.ApiError as error:
            return _error(error, request_id)
        finally:
            if not slot_handed_on:
                slots.give()

    async def chat(request: Request) -> Any:
        return await generate(request, "chat")

    async def completions(request: Request) -> Any:
        return await generate(request, "text")

    async def models(request: Request) -> Any:
        entry = {
            "id": name,
            "object": "model",
            "created": started,
            "owned_by": "policygrad",
            "max_model_len": min(engine.context_length, config.max_prompt_tokens + config.max_tokens),
        }
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request) -> Any:
        if not engine.healthy():
            return JSONResponse({"status": "unhealthy", "reason": "the engine's worker stopped"}, status_code=503)
        return JSONResponse(
            {"status": "ok", "model": name, "in_flight": slots.active, "max_in_flight": slots.limit},
        )

    async def http_error(request: Request, exc: Exception) -> Any:
        status = getattr(exc, "status_code", 500)
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "invalid_request_error")
        message = f"route: {request.method} {request.url.path}: {getattr(exc, 'detail', 'error')}"
        return JSONResponse(api.error_body(message, kind), status_code=status)

    async def server_error(request: Request, exc: Exception) -> Any:
        log.error("unhandled error on %s: %s", request.url.path, first_line(exc))
        return JSONResponse(api.error_body(f"server: {type(exc).__name__}", "server_error"), status_code=500)

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def _describe(config: ServeConfig) -> str:
    if not config.continuous_batching:
        return "transformers, one request at a time"
    sharing = "prefix caching" if config.prefix_caching else "no prefix caching"
    return f"transformers, continuous batching, {sharing}"


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_serve(config: ServeConfig) -> int:
    """``policygrad serve``: resolve the folder, start the engine, serve until interrupted. Returns the exit code."""
    import uvicorn

    from policygrad.lm.device import use_threads
    from policygrad.serve.export import resolve_source

    folder = resolve_source(config.model, field="DIR").folder
    from policygrad.lm.lora import ADAPTER_CONFIG

    if (folder / ADAPTER_CONFIG).is_file():
        raise UsageError(
            "DIR",
            f"{folder} holds a LoRA adapter; serve its export, which merges it into the base weights: policygrad "
            f"export {config.model} --output EXPORT_DIR, then policygrad serve EXPORT_DIR",
        )
    name = served_name(folder, config.served_model_name)
    engine = config.engine
    if engine == "vllm" or (engine == "auto" and vllm_available()):
        if not vllm_available():
            raise UsageError("--engine", "vllm needs the vllm package and a CUDA GPU; use --engine transformers here")
        return _run_vllm(folder, config, name)
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UsageError(
            "--engine",
            "the transformers engine needs fastapi, uvicorn and openai (pip install 'transformers[serving]')",
        )
    use_threads(config)
    sock = listen(config.host, config.port, backlog=2048)
    host, port = sock.getsockname()[:2]
    started = time.monotonic()
    served = None
    try:
        served = Engine(folder, config)
        app = build_app(served, config, name)
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=config.access_log, timeout_graceful_shutdown=5)
        )
        print(
            f"serving {name} ({folder}) at http://{host}:{port}/v1 [{_describe(config)}; up to "
            f"{config.max_concurrent_requests} requests in flight] (loaded in {time.monotonic() - started:.1f} s)",
            flush=True,
        )
        previous = signal.signal(signal.SIGTERM, _stop)  # uvicorn re-raises the signal once it has shut down
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            print("policygrad serve: stopped", file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
        if served is not None:
            served.shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m policygrad.serve.server DIR ...`
    from policygrad.serve import standalone

    sys.exit(standalone("serve", sys.argv[1:]))
