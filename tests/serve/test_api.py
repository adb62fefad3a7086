"""The OpenAI request checks of policygrad serve, one rule at a time, without a model or a web server."""

from __future__ import annotations

import pytest

from policygrad.serve import api

LIMITS = api.Limits(max_prompt_tokens=100, max_tokens=32, context_length=120)


def _error(call, *args) -> api.ApiError:
    with pytest.raises(api.ApiError) as caught:
        call(*args)
    error = caught.value
    assert "\n" not in error.message
    assert error.body() == {
        "error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}
    }
    return error


@pytest.mark.exact
@pytest.mark.parametrize(
    ("raw", "status", "start"),
    [
        (b"{bad", 400, "body: not valid JSON"),
        (b"[1, 2]", 400, "body: must be a JSON object, got list"),
        (b'{"temperature": NaN}', 400, "body: not valid JSON"),
        (b"\xff\xfe", 400, "body: not valid JSON"),
        (b"{" + b" " * 100 + b"}", 413, "body: 102 bytes"),
    ],
)
def test_bodies_that_are_not_a_json_object(raw, status, start):
    error = _error(api.parse_body, raw, 64)
    assert error.status == status and error.message.startswith(start)


@pytest.mark.exact
@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({"model": "gpt-4"}, "model", 404),
        ({"max_tokens": 33}, "max_tokens", 400),
        ({"max_completion_tokens": 0}, "max_completion_tokens", 400),
        ({"max_tokens": "10"}, "max_tokens", 400),
        ({"max_tokens": True}, "max_tokens", 400),
        ({"temperature": 2.5}, "temperature", 400),
        ({"temperature": "hot"}, "temperature", 400),
        ({"top_p": 0}, "top_p", 400),
        ({"n": 2}, "n", 400),
        ({"stream": "yes"}, "stream", 400),
        ({"seed": -1}, "seed", 400),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
        ({"stop": [""]}, "stop", 400),
        ({"logprobs": True}, "logprobs", 400),
        ({"response_format": {"type": "json_object"}}, "response_format", 400),
        ({"generation_config": "{}"}, "generation_config", 400),
        ({"presence_penalty": 0.5}, "presence_penalty", 400),  # the engine would ignore it: refused instead
    ],
)
def test_each_bad_field_is_named(body, param, status):
    error = _error(api.check_common, body, "policy", LIMITS)
    assert (error.param, error.status) == (param, status)
    assert error.message.startswith(f"{param}: ")


@pytest.mark.exact
def test_an_unknown_model_is_openais_model_not_found():
    error = _error(api.check_common, {"model": "other"}, "policy", LIMITS)
    assert (error.type, error.code) == ("not_found_error", "model_not_found")


@pytest.mark.exact
def test_good_requests_pass_and_max_tokens_defaults_to_the_limit():
    api.check_common(
        {"model": "policy", "temperature": 0, "top_p": 1, "stop": "\n", "seed": 3, "n": 1, "stream": True},
        "policy",
        LIMITS,
    )
    api.check_common({}, "policy", LIMITS)  # the model may be left out
    assert api.requested_max_tokens({}, LIMITS) == 32
    assert api.requested_max_tokens({"max_completion_tokens": 4, "max_tokens": 9}, LIMITS) == 4


@pytest.mark.exact
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[1].content",
        ),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"x": 1}]}]}, "messages[0].tool_calls[0]"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
            "messages[0].tool_calls[0]",
        ),
        ({"messages": [{"role": "assistant", "tool_calls": "f()"}]}, "messages[0].tool_calls"),
    ],
)
def test_malformed_messages_name_the_message(body, param):
    assert _error(api.chat_messages, body).param == param


@pytest.mark.exact
def test_messages_with_text_parts_and_tool_calls_pass():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}],
        },
    ]
    assert api.chat_messages({"messages": messages}) is messages


@pytest.mark.exact
def test_completion_prompts():
    assert api.completion_prompt({"prompt": "abc"}) == "abc"
    assert _error(api.completion_prompt, {"prompt": ["a", "b"]}).param == "prompt"
    assert _error(api.completion_prompt, {}).param == "prompt"


@pytest.mark.exact
def test_context_limits_use_openais_code():
    api.check_context(100, 20, LIMITS)  # 120 fits the context exactly
    long_prompt = _error(api.check_context, 101, 1, LIMITS)
    assert (long_prompt.code, long_prompt.param) == ("context_length_exceeded", "messages")
    too_far = _error(api.check_context, 100, 21, LIMITS, "prompt")
    assert too_far.param == "max_tokens" and "exceed the model's context of 120 tokens" in too_far.message
