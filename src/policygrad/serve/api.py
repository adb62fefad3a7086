"""The OpenAI API's side of ``policygrad serve``: what a request may ask, and the error body when it asks wrong.

Pure functions over the decoded JSON body (dicts, lists, numbers): no web framework, no model, no tokenizer, so each
rule is tested on its own. The server calls them before a request reaches the engine; each problem is an
:class:`ApiError` that becomes an OpenAI-style error response::

    HTTP 400  {"error": {"message": "max_tokens: must be at most 256, got 100000", "type": "invalid_request_error",
                         "param": "max_tokens", "code": null}}

Status codes follow OpenAI's and vLLM's usage: 400 a malformed request, 404 an unknown model or route, 413 a body
too large, 429 over the concurrency limit, 503 the engine not ready, 504 a request past its timeout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ApiError",
    "Limits",
    "OTHER_SAMPLING_FIELDS",
    "SAMPLING_FIELDS",
    "chat_messages",
    "check_common",
    "check_context",
    "completion_prompt",
    "error_body",
    "parse_body",
    "requested_max_tokens",
]

ROLES = ("system", "user", "assistant", "tool")
"""Message roles a chat request may use."""

SAMPLING_FIELDS = ("temperature", "top_p")
"""The sampling a request gets from the server when it does not set it."""

OTHER_SAMPLING_FIELDS = ("frequency_penalty", "stop", "logit_bias", "seed")
"""Further fields that change how tokens are chosen. Continuous batching decodes every request with the server's one
setting, so a request that sets any of these (or its own temperature or top_p) is generated on its own (server.py)."""

REFUSED_FIELDS = {
    "generation_config": "replaces the server's generation settings and limits, so this server does not accept it",
    "best_of": "is not supported (one completion per request)",
    "echo": "is not supported",
    "suffix": "is not supported",
    "presence_penalty": "is not supported by the serving engine (0 or absent only)",
}
"""Fields a client may send that this server will not honour, and why: refused rather than silently ignored."""


class ApiError(Exception):
    """A request the server refuses, as the OpenAI API reports it.

    Args:
        status: HTTP status code.
        message: one line saying what is wrong and what is allowed, naming the field first (``max_tokens: ...``).
        param: the request field at fault, or None.
        type: OpenAI's error type (``invalid_request_error``, ``not_found_error``, ``rate_limit_error``, ...).
        code: OpenAI's machine-readable code (``context_length_exceeded``, ``model_not_found``) or None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``.

    >>> error_body("model: no such model", "not_found_error", "model", "model_not_found")["error"]["code"]
    'model_not_found'
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Attributes:
        max_prompt_tokens: longest prompt in tokens (after the chat template).
        max_tokens: the most tokens a request may ask to generate, and what it gets when it does not say.
        context_length: the model's positions (``max_position_embeddings``): prompt + completion must fit.
    """

    max_prompt_tokens: int
    max_tokens: int
    context_length: int


def parse_body(raw: bytes, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 ApiError saying why not.

    >>> parse_body(b'{"model": "m"}', 1024)
    {'model': 'm'}
    >>> parse_body(b"{not json", 1024)
    Traceback (most recent call last):
    ...
    policygrad.serve.api.ApiError: body: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)
    """
    if len(raw) > max_bytes:
        raise ApiError(413, f"body: {len(raw)} bytes, more than the {max_bytes} this server accepts", param=None)
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        position = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ApiError(400, f"body: not valid JSON ({reason}{position})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"body: must be a JSON object, got {type(body).__name__}")
    return body


def _no_constants(name: str) -> Any:
    """NaN and Infinity are not JSON, though Python's parser takes them."""
    raise ValueError(f"{name} is not a JSON value")


def check_common(body: Mapping[str, Any], served_name: str, limits: Limits) -> None:
    """The checks that chat and text completions share: the model's name, the sampling values, and the fields this
    server refuses. A missing ``model`` means the served one.

    >>> check_common({"model": "other"}, "policy", Limits(8, 8, 64))
    Traceback (most recent call last):
    ...
    policygrad.serve.api.ApiError: model: 'other' is not served here; this server serves 'policy' (GET /v1/models)
    """
    model = body.get("model", served_name)
    if model != served_name:
        raise ApiError(
            404,
            f"model: {model!r} is not served here; this server serves {served_name!r} (GET /v1/models)",
            param="model",
            type="not_found_error",
            code="model_not_found",
        )
    for field, why in REFUSED_FIELDS.items():
        if body.get(field) not in (None, False, ""):
            raise _bad(field, why)
    if "n" in body and body["n"] != 1:
        raise _bad("n", f"this server returns one completion per request; got {body['n']!r}")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs", "log probabilities are not returned by this server")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise _bad("response_format", "only {'type': 'text'} is supported")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise _bad("stream", f"must be true or false, got {body['stream']!r}")
    _number(body, "temperature", 0.0, 2.0, low_open=False)
    _number(body, "top_p", 0.0, 1.0, low_open=True)
    _number(body, "frequency_penalty", -2.0, 2.0, low_open=False)
    if "seed" in body and (not _is_int(body["seed"]) or not 0 <= body["seed"] < 2**63):
        raise _bad("seed", f"must be an integer in [0, 2**63), got {body['seed']!r}")
    _stop(body.get("stop"))
    requested_max_tokens(body, limits)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: Mapping[str, Any], field: str, low: float, high: float, low_open: bool) -> None:
    if field not in body or body[field] is None:
        return
    value = body[field]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise _bad(field, f"must be a number in {interval}, got {value!r}")


def _stop(stop: Any) -> None:
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise _bad("stop", f"must be a non-empty string or a list of up to 4 of them, got {stop!r}")


def requested_max_tokens(body: Mapping[str, Any], limits: Limits) -> int:
    """The tokens a request may generate: its ``max_completion_tokens`` or ``max_tokens`` (the first given), else
    the server's limit; more than the limit is a 400.

    >>> requested_max_tokens({}, Limits(8, 32, 64)), requested_max_tokens({"max_tokens": 5}, Limits(8, 32, 64))
    (32, 5)
    """
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise _bad(field, f"must be a positive integer, got {value!r}")
        if value > limits.max_tokens:
            raise _bad(field, f"must be at most {limits.max_tokens} on this server, got {value}")
        return value
    return limits.max_tokens


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The messages of a chat request, checked: a non-empty list of ``{"role", "content"}`` objects whose content
    is a string or a list of ``{"type": "text", "text": ...}`` parts (assistant turns with tool calls may omit it).

    >>> chat_messages({"messages": [{"role": "user", "content": "hi"}]})
    [{'role': 'user', 'content': 'hi'}]
    >>> chat_messages({})
    Traceback (most recent call last):
    ...
    policygrad.serve.api.ApiError: messages: required, a list of {"role", "content"} objects
    """
    if "messages" not in body:
        raise _bad("messages", 'required, a list of {"role", "content"} objects')
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", f'must be a non-empty list of {{"role", "content"}} objects, got {_short(messages)}')
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"must be an object with role and content, got {_short(message)}")
        if message.get("role") not in ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {_short(message.get('role'))}")
        if message.get("tool_calls") is not None:
            _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        content = message.get("content")
        if content is None and message["role"] == "assistant" and message.get("tool_calls"):
            continue
        if isinstance(content, str):
            continue
        parts_ok = isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content
        )
        if not parts_ok:
            raise _bad(
                f"{where}.content",
                f'must be a string or a list of {{"type": "text", "text": ...}} parts, got {_short(content)}',
            )
    return messages


def _tool_calls(calls: Any, where: str) -> None:
    """An assistant turn's tool calls: a list of ``{"type": "function", "function": {"name": str, "arguments": a JSON
    object as a string}}`` (the chat template renders them; anything else would fail inside the engine)."""
    shape = '{"type": "function", "function": {"name": ..., "arguments": "{...}"}}'
    if not isinstance(calls, list):
        raise _bad(where, f"must be a list of {shape} objects, got {_short(calls)}")
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        ok = isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"] != ""
        arguments = function.get("arguments") if ok else None
        try:
            ok = ok and isinstance(arguments, str) and isinstance(json.loads(arguments), dict)
        except ValueError:
            ok = False
        if not ok:
            raise _bad(f"{where}[{i}]", f"must be {shape} with arguments a JSON object, got {_short(call)}")


def completion_prompt(body: Mapping[str, Any]) -> str:
    """The prompt of a text completion request: a string (or a list holding exactly one).

    >>> completion_prompt({"prompt": ["Once upon"]})
    'Once upon'
    """
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", f"required, a string (one prompt per request), got {_short(prompt)}")
    return prompt


def check_context(prompt_tokens: int, max_tokens: int, limits: Limits, param: str = "messages") -> None:
    """A prompt of ``prompt_tokens`` tokens that may grow by ``max_tokens`` must fit the server's prompt limit and
    the model's context; else a 400 with OpenAI's ``context_length_exceeded`` code naming ``param`` (the field that
    holds the prompt).

    >>> check_context(10, 5, Limits(8, 5, 64))
    Traceback (most recent call last):
    ...
    policygrad.serve.api.ApiError: messages: the prompt is 10 tokens, more than the 8 this server accepts
    """
    if prompt_tokens > limits.max_prompt_tokens:
        raise _bad(
            param,
            f"the prompt is {prompt_tokens} tokens, more than the {limits.max_prompt_tokens} this server accepts",
            code="context_length_exceeded",
        )
    if prompt_tokens + max_tokens > limits.context_length:
        raise _bad(
            "max_tokens",
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceed the model's context of "
            f"{limits.context_length} tokens",
            code="context_length_exceeded",
        )


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=repr) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
