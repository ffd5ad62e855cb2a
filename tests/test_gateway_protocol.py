"""The gateway's request checks and SSE framing, in-process (the HTTP behaviour is in test_gateway.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from flo_coord.errors import UnknownRequestError, ValidationError
from flo_coord.gateway import HTTPError, failure
from flo_coord.gateway.protocol import InvalidParameterError, Shaper, body_hash, parse, parse_event_id, sse
from flo_coord.store.validation import Limits

LIMITS = Limits(max_messages=3, max_prompt_bytes=100)


def chat(**extra: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def test_sampling_parameters_are_kept_and_max_completion_tokens_wins() -> None:
    parsed = parse(
        chat(temperature=0.5, top_p=0.9, stop="x", seed=3, presence_penalty=1, frequency_penalty=-1, user="u",
             max_tokens=9, max_completion_tokens=7, stream=True, stream_options={"include_usage": True}),
        chat=True, limits=LIMITS,
    )  # fmt: skip
    assert parsed.params == {
        "temperature": 0.5, "top_p": 0.9, "stop": "x", "seed": 3, "presence_penalty": 1.0,
        "frequency_penalty": -1.0, "user": "u", "stream_options": {"include_usage": True},
    }  # fmt: skip
    assert parsed.max_tokens == 7 and parsed.stream and parsed.include_usage
    text_parts = chat(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert parse(text_parts, chat=True, limits=LIMITS).messages[0].content == "ab"  # type: ignore[index]
    completion = parse(b'{"model": "m", "prompt": ["one"], "n": 1, "logprobs": null}', chat=False, limits=LIMITS)
    assert completion.prompt == "one" and completion.params == {}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(n=2), "n"),
        (chat(logprobs=True), "logprobs"),
        (chat(top_logprobs=2), "top_logprobs"),
        (chat(tools=[{"type": "function"}]), "tools"),
        (chat(tool_choice="auto"), "tool_choice"),
        (chat(functions=[{"name": "f"}]), "functions"),
        (chat(temperature=3), "temperature"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(response_format={"type": "json_object"}), "response_format"),  # unknown fields, by name
        (chat(messages=[{"role": "user", "content": "x", "refusal": None}]), "messages[0].refusal"),
        (chat(stream=True, stream_options={"include_usage": True, "x": 1}), "stream_options.x"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "x"}]), "messages[1].role"),
        (chat(messages=[{"role": "user", "content": None}]), "messages[0].content"),
        (chat(stream_options={"include_usage": True}), "stream_options"),  # without stream: true
        (chat(stream=False, stream_options={"include_usage": False}), "stream_options"),
        (chat(messages=[]), "messages"),
        (chat(messages=[{"role": "user", "content": "x"}] * 4), "messages"),  # max_messages
        (chat(messages=[{"role": "user", "content": "x" * 101}]), "messages"),  # max_prompt_bytes
        (chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content"),
        (b'{"model": "m", "prompt": "p", "echo": true}', "echo"),
        (b'{"model": "", "prompt": "p"}', "model"),
        (b"[1, 2]", None),
        (b"\xff", None),
    ],
)
def test_refused_bodies_name_the_parameter(body: bytes, param: str | None) -> None:
    chat_api = b'"prompt"' not in body
    with pytest.raises(InvalidParameterError) as refused:
        parse(body, chat=chat_api, limits=LIMITS)
    assert refused.value.param == param
    assert isinstance(refused.value, ValidationError)  # a FloCoordError subclass, status 400
    assert failure(refused.value).status == 400


def test_the_roles_the_cli_accepts_are_accepted() -> None:
    from flo_coord.store.validation import CHAT_ROLES

    messages = [{"role": role, "content": role} for role in CHAT_ROLES[:3]]
    parsed = parse(chat(messages=messages), chat=True, limits=LIMITS)
    assert [m.role for m in parsed.messages or []] == ["system", "developer", "user"]
    assert parse(chat(messages=[{"role": "assistant", "content": "a"}]), chat=True, limits=LIMITS).messages


def test_event_ids_round_trip_and_reject_garbage() -> None:
    assert parse_event_id("chatcmpl-a:b:17") == ("chatcmpl-a:b", 17)
    for bad in ("", "nocolon", "rid:", "rid:-1", "rid:1.5"):
        with pytest.raises(InvalidParameterError):
            parse_event_id(bad)


def test_body_hash_ignores_key_order_and_spacing_only() -> None:
    assert body_hash(b'{"a": 1, "b": [1, 2]}') == body_hash(b'{"b":[1,2],"a":1}')
    assert body_hash(b'{"a": 1}') != body_hash(b'{"a": 2}')


def test_chunks_have_openai_shapes() -> None:
    shaper = Shaper("chatcmpl-1", "chat.completion", "m", 5)
    event = shaper.text_event('say "hi"\n', True, "chatcmpl-1:9")
    assert event == sse(shaper.text('say "hi"\n', True), "chatcmpl-1:9")
    lines = event.decode().split("\n")
    assert lines[0] == "id: chatcmpl-1:9" and lines[1].startswith("data: ") and lines[2:] == ["", ""]
    chunk = json.loads(lines[1][6:])
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert chunk["choices"] == [{"index": 0, "delta": {"content": 'say "hi"\n'}, "finish_reason": None}]
    assert shaper.usage({"total_tokens": 3})["choices"] == []
    whole = Shaper("cmpl-1", "text_completion", "m", 5).whole("t", "length", {"total_tokens": 1})
    assert whole["object"] == "text_completion" and whole["choices"][0]["finish_reason"] == "length"


def test_error_statuses() -> None:
    assert failure(UnknownRequestError("r1")).status == 404
    assert failure(HTTPError(413, "big", "invalid_request_error")).body["error"]["message"] == "big"
    unexpected = failure(RuntimeError("secret detail"))
    assert unexpected.status == 500 and "secret" not in json.dumps(unexpected.body)
