"""Backend adapters against the real fake server over HTTP: events, continuation, typed errors."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import httpx
import pytest
import pytest_asyncio

from flo_coord.errors import ConfigError, ValidationError
from flo_coord.execution.backends import (
    Backend,
    BackendConfigError,
    BackendConnectError,
    BackendError,
    BackendHTTPError,
    BackendSpec,
    BadRequestError,
    ContentPolicyRejection,
    ContextLengthError,
    GenerationRequest,
    MalformedChunkError,
    OllamaBackend,
    OpenAIBackend,
    PrefillRejectedError,
    Progress,
    RateLimitedError,
    ServerError,
    StreamAbortedError,
    StreamCutError,
    StreamEnd,
    TextChunk,
    ToolCallsOnlyError,
    UnsupportedRequestError,
    classify_error,
    make_backend,
    parse_retry_after,
)
from flo_coord.models import ChatMessage
from flo_coord.testing.fakellm import (
    HEAD_TOKEN,
    FakeLLMServer,
    FakeLLMServerThread,
    full_answer,
    full_answer_text,
    parse_fault,
    render_messages,
    split_continuation,
)

Kind = Literal["openai", "ollama"]
KINDS: list[Kind] = ["openai", "ollama"]
PROMPT = "Explain leases in one paragraph."
MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "what is fencing?")]
SECRET = "sk-test-0123456789abcdef"


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def make(server: FakeLLMServer) -> Callable[..., Backend]:
    """Build a backend on the fake server; each test's model name keeps per-model faults apart."""

    def build(kind: Kind = "openai", model: str = "m", **kwargs: Any) -> Backend:
        kwargs.setdefault("name", "Vllm" if kind == "openai" else "Ollama")
        return make_backend(BackendSpec(kind=kind, base_url=server.base_url, model=model, **kwargs))

    return build


async def collect(backend: Backend, request: GenerationRequest) -> tuple[list[Any], BaseException | None]:
    """Every event the stream yielded, and the error it ended with (None on a clean end)."""
    events: list[Any] = []
    try:
        async for event in backend.stream(request):
            events.append(event)
    except BackendError as exc:
        return events, exc
    finally:
        await backend.aclose()
    return events, None


def text_of(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


async def wait_for_outcome(server: FakeLLMServer, outcome: str, timeout: float = 2.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.requests and server.requests[-1]["outcome"] == outcome:
            return server.requests[-1]
        await asyncio.sleep(0.02)
    raise AssertionError(f"server never saw {outcome!r}: {server.requests[-1:]}")


# ------------------------------------------------------------------------ fake answers


def test_full_answer_is_deterministic_and_starts_with_the_head_token() -> None:
    tokens = full_answer(PROMPT)
    assert tokens == full_answer(PROMPT) and len(tokens) == 48
    assert tokens[0] == HEAD_TOKEN and all(t.startswith(" ") for t in tokens[1:])
    assert full_answer(PROMPT, 10) == tokens[:10]
    assert full_answer("another prompt") != tokens


def test_split_continuation_only_accepts_a_real_prefix_of_the_answer() -> None:
    answer = full_answer_text(PROMPT)
    assert split_continuation(PROMPT) == (PROMPT, "")
    assert split_continuation(PROMPT + answer[:23]) == (PROMPT, answer[:23])
    stray = PROMPT + HEAD_TOKEN + " not the answer"
    assert split_continuation(stray) == (stray, "")
    assert render_messages(MESSAGES) == "system: be brief\nuser: what is fencing?\n"


@pytest.mark.parametrize("spec", ["bogus", "cut", "cut:x", "stall:1", "http5xx:1*2", "http5xx:1:404", "rate429:-1"])
def test_parse_fault_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_fault(spec)


def test_parse_fault_counts() -> None:
    assert parse_fault("http5xx:2").times == 2
    assert parse_fault("rate429:3").times == 1 and parse_fault("rate429:3").seconds == 3.0
    assert parse_fault("cut:4").times is None and parse_fault("cut:4*2").times == 2
    assert parse_fault("stall:2:0.5").seconds == 0.5


# ------------------------------------------------------------------------- healthy streams


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_completion_stream_yields_the_answer_then_one_end(make: Callable[..., Backend], kind: str) -> None:
    events, error = await collect(make(kind), GenerationRequest(prompt=PROMPT))
    assert error is None
    assert text_of(events) == full_answer_text(PROMPT)
    assert [type(e) for e in events].count(StreamEnd) == 1 and isinstance(events[-1], StreamEnd)
    end = events[-1]
    assert end.finish_reason == "stop" and end.model == "m"
    assert end.usage is not None and end.usage["completion_tokens"] == 48


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_chat_stream_skips_role_only_deltas(make: Callable[..., Backend], kind: str) -> None:
    events, error = await collect(make(kind), GenerationRequest(messages=MESSAGES))
    assert error is None
    assert all(e.text for e in events if isinstance(e, TextChunk))
    assert text_of(events) == full_answer_text(render_messages(MESSAGES))


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_max_tokens_stops_with_length(server: FakeLLMServer, make: Callable[..., Backend], kind: str) -> None:
    events, _ = await collect(make(kind), GenerationRequest(prompt=PROMPT, max_tokens=5))
    assert text_of(events) == "".join(full_answer(PROMPT)[:5])
    assert events[-1].finish_reason == "length"
    assert server.requests[-1]["max_tokens"] == 5


@pytest.mark.asyncio
async def test_stream_usage_off_sends_no_stream_options(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    events, _ = await collect(make(stream_usage=False), GenerationRequest(prompt=PROMPT))
    assert events[-1].usage is None and "stream_options" not in server.requests[-1]["body"]


# ---------------------------------------------------------------------------- continuation


def _split_points(answer: str) -> list[int]:
    first_non_ascii = next(i for i, ch in enumerate(answer) if ord(ch) > 127)
    boundary = len("".join(full_answer(PROMPT)[:5]))
    # any split after the head token (a completions prompt is only recognised once it holds the head token)
    return [len(HEAD_TOKEN), len(HEAD_TOKEN) + 1, boundary, boundary + 2, first_non_ascii + 1, len(answer)]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_completion_continues_exactly_from_any_prefix(
    server: FakeLLMServer, make: Callable[..., Backend], kind: str
) -> None:
    answer = full_answer_text(PROMPT)
    for cut in _split_points(answer):
        events, error = await collect(make(kind), GenerationRequest(prompt=PROMPT, prefix=answer[:cut]))
        assert error is None
        assert answer[:cut] + text_of(events) == answer, cut
        assert server.requests[-1]["prompt"] == PROMPT + answer[:cut]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_chat_prefill_continues_exactly(server: FakeLLMServer, make: Callable[..., Backend], kind: str) -> None:
    answer = full_answer_text(render_messages(MESSAGES))
    for cut in (3, len(HEAD_TOKEN) + 7, len(answer) - 1):
        events, error = await collect(make(kind), GenerationRequest(messages=MESSAGES, prefix=answer[:cut]))
        assert error is None
        assert answer[:cut] + text_of(events) == answer
        sent = server.requests[-1]["messages"]
        assert sent[-1] == {"role": "assistant", "content": answer[:cut]} and len(sent) == len(MESSAGES) + 1


@pytest.mark.asyncio
async def test_vllm_prefill_asks_to_continue_the_final_message(
    server: FakeLLMServer, make: Callable[..., Backend]
) -> None:
    await collect(make(), GenerationRequest(messages=MESSAGES, prefix=HEAD_TOKEN))
    body = server.requests[-1]["body"]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    await collect(make(name="LlamaCpp"), GenerationRequest(messages=MESSAGES, prefix=HEAD_TOKEN))
    assert "continue_final_message" not in server.requests[-1]["body"]


@pytest.mark.asyncio
async def test_prefix_extends_a_final_assistant_message(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    answer = full_answer_text(render_messages(MESSAGES))
    messages = [*MESSAGES, ChatMessage("assistant", answer[:12])]
    events, _ = await collect(make(), GenerationRequest(messages=messages, prefix=answer[12:20]))
    assert answer[:20] + text_of(events) == answer
    assert server.requests[-1]["messages"][-1] == {"role": "assistant", "content": answer[:20]}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_prefill_disabled_rejects_locally_without_http(
    server: FakeLLMServer, make: Callable[..., Backend], kind: str
) -> None:
    _, error = await collect(make(kind, prefill=False), GenerationRequest(messages=MESSAGES, prefix="x"))
    assert isinstance(error, PrefillRejectedError) and error.status is None
    _, error = await collect(make(kind, chat=False), GenerationRequest(messages=MESSAGES))
    assert isinstance(error, UnsupportedRequestError)
    _, error = await collect(make(kind, completions=False), GenerationRequest(prompt=PROMPT))
    assert isinstance(error, UnsupportedRequestError)
    assert server.requests == []


# ----------------------------------------------------------------------------- faults


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("fault", "error_type", "status"),
    [
        ("refuse", BackendConnectError, None),
        ("http5xx:1", ServerError, 503),
        ("http5xx:1:502", ServerError, 502),
        ("rate429", RateLimitedError, 429),
        ("context_length", ContextLengthError, 400),
        ("content_policy", ContentPolicyRejection, 400),
        ("reject_prefill", PrefillRejectedError, 400),
    ],
)
async def test_failures_before_the_first_byte_are_typed(
    server: FakeLLMServer,
    make: Callable[..., Backend],
    kind: str,
    fault: str,
    error_type: type[BackendError],
    status: int | None,
) -> None:
    server.set_fault("m", fault)
    backend = make(kind)
    events, error = await collect(backend, GenerationRequest(messages=MESSAGES, prefix=HEAD_TOKEN))
    assert events == [] and type(error) is error_type
    assert error.received_text is False
    assert f"backend {backend.spec.name} (model 'm')" in str(error)
    assert getattr(error, "status", None) == status


@pytest.mark.asyncio
async def test_content_policy_carries_the_reason(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    server.set_fault("m", "content_policy")
    _, error = await collect(make(), GenerationRequest(prompt=PROMPT))
    assert isinstance(error, ContentPolicyRejection)
    assert "content policy" in error.reason and error.code == "content_policy_violation"
    assert not error.transient


@pytest.mark.asyncio
async def test_reject_prefill_only_hits_prefill_requests(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    server.set_fault("m", "reject_prefill")
    events, error = await collect(make(), GenerationRequest(messages=MESSAGES))
    assert error is None and text_of(events) == full_answer_text(render_messages(MESSAGES))


@pytest.mark.asyncio
async def test_counted_5xx_heals_and_is_not_hammered(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    server.set_fault("m", "http5xx:1")
    _, first = await collect(make(), GenerationRequest(prompt=PROMPT))
    _, second = await collect(make(), GenerationRequest(prompt=PROMPT))
    assert isinstance(first, ServerError) and first.transient and second is None
    assert [r["fault"] for r in server.requests] == ["http5xx:1", None]


@pytest.mark.asyncio
async def test_rate_limit_retry_after(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    server.set_fault("m", "rate429:2")
    _, error = await collect(make(), GenerationRequest(prompt=PROMPT))
    assert isinstance(error, RateLimitedError) and error.retry_after == 2.0 and "retry after 2s" in str(error)
    _, healed = await collect(make(), GenerationRequest(prompt=PROMPT))
    assert healed is None
    server.set_fault("m", "rate429")
    _, error = await collect(make(), GenerationRequest(prompt=PROMPT))
    assert isinstance(error, RateLimitedError) and error.retry_after is None


def test_parse_retry_after() -> None:
    now = time.time()
    assert parse_retry_after("7") == 7.0 and parse_retry_after("1.5") == 1.5
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after("") is None


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_cut_after_k_tokens(server: FakeLLMServer, make: Callable[..., Backend], kind: str) -> None:
    server.set_fault("m", "cut:3")
    events, error = await collect(make(kind), GenerationRequest(prompt=PROMPT))
    assert text_of(events) == "".join(full_answer(PROMPT)[:3])
    assert isinstance(error, StreamCutError) and error.received_text and error.transient


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_die_after_is_a_mid_stream_connection_error(
    server: FakeLLMServer, make: Callable[..., Backend], kind: str
) -> None:
    server.set_fault("m", "die_after:4")
    events, error = await collect(make(kind), GenerationRequest(prompt=PROMPT))
    assert text_of(events) == "".join(full_answer(PROMPT)[:4])
    assert isinstance(error, BackendConnectError) and error.received_text


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_malformed_chunk_raises_without_partial_text(
    server: FakeLLMServer, make: Callable[..., Backend], kind: str
) -> None:
    server.set_fault("m", "malformed:2")
    events, error = await collect(make(kind), GenerationRequest(prompt=PROMPT))
    assert events == [TextChunk(t) for t in full_answer(PROMPT)[:2]]
    assert isinstance(error, MalformedChunkError) and error.received_text and "not json" in str(error)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_in_stream_error_object_is_classified(
    server: FakeLLMServer, make: Callable[..., Backend], kind: str
) -> None:
    server.set_fault("m", "stream_error:2")
    events, error = await collect(make(kind), GenerationRequest(prompt=PROMPT))
    assert len(text_of(events)) > 0
    assert isinstance(error, ServerError) and error.received_text and error.status == 500


@pytest.mark.asyncio
async def test_no_done_with_finish_reason_is_complete(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    server.set_fault("m", "no_done")
    events, error = await collect(make(), GenerationRequest(prompt=PROMPT))
    assert error is None and text_of(events) == full_answer_text(PROMPT)
    assert events[-1].finish_reason == "stop" and events[-1].usage is not None


@pytest.mark.asyncio
async def test_slow_first_token(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    server.set_fault("m", "slow_first:0.3")
    started = time.monotonic()
    stream = make().stream(GenerationRequest(prompt=PROMPT))
    first = await anext(stream)
    assert isinstance(first, TextChunk) and time.monotonic() - started >= 0.28
    await stream.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_stall_then_caller_timeout_closes_the_response(
    server: FakeLLMServer, make: Callable[..., Backend], kind: str
) -> None:
    server.set_fault("m", "stall:2:30")
    backend = make(kind)
    stream = backend.stream(GenerationRequest(prompt=PROMPT))
    assert [await anext(stream), await anext(stream)] == [TextChunk(t) for t in full_answer(PROMPT)[:2]]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(stream), 0.2)
    # the cancelled generator closed its HTTP response: the server sees the hang-up mid-stall
    entry = await wait_for_outcome(server, "client_disconnected")
    assert entry["tokens_sent"] == 2
    await backend.aclose()


@pytest.mark.asyncio
async def test_aclose_mid_stream_hangs_up(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    server.set_token_delay(0.05, "m")
    backend = make()
    stream = backend.stream(GenerationRequest(prompt=PROMPT))
    await anext(stream)
    await stream.aclose()
    entry = await wait_for_outcome(server, "client_disconnected")
    assert entry["tokens_sent"] < 48
    await backend.aclose()


@pytest.mark.asyncio
async def test_header_and_wildcard_faults(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    _, error = await collect(make(headers={"X-Fake-Fault": "cut:1"}), GenerationRequest(prompt=PROMPT))
    assert isinstance(error, StreamCutError)
    server.set_fault("*", "context_length")
    _, error = await collect(make(model="other"), GenerationRequest(prompt=PROMPT))
    assert isinstance(error, ContextLengthError)


@pytest.mark.asyncio
async def test_connection_refused_port(make: Callable[..., Backend]) -> None:
    spec = BackendSpec(name="Groq", base_url="http://127.0.0.1:9", model="m", connect_timeout=1)
    _, error = await collect(OpenAIBackend(spec), GenerationRequest(prompt=PROMPT))
    assert isinstance(error, BackendConnectError) and not error.received_text and "ConnectError" in str(error)


# ------------------------------------------------------------------------------ API key


@pytest.mark.asyncio
async def test_api_key_is_sent_as_bearer_and_never_shown(
    server: FakeLLMServer, make: Callable[..., Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLO_TEST_KEY", SECRET)
    backend = make(api_key_env="FLO_TEST_KEY")
    _, error = await collect(backend, GenerationRequest(prompt=PROMPT))
    # the fake's request log keeps only a digest of the credential (issue 16), never the key
    sent = hashlib.sha256(f"Bearer {SECRET}".encode()).hexdigest()
    assert error is None and server.requests[-1]["authorization_sha256"] == sent
    assert SECRET not in str(server.requests)
    server.set_fault("m", "http5xx:1")
    backend = make(api_key_env="FLO_TEST_KEY")
    _, error = await collect(backend, GenerationRequest(prompt=PROMPT))
    assert isinstance(error, ServerError)
    for shown in (str(error), repr(error), repr(backend.spec), repr(backend), str(error.body_text)):
        assert SECRET not in shown


@pytest.mark.asyncio
async def test_missing_key_env_is_a_config_error(make: Callable[..., Backend], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLO_MISSING_KEY", raising=False)
    # a backend fault (issue 11: the next backend continues), still a ConfigError
    events, error = await collect(make(api_key_env="FLO_MISSING_KEY"), GenerationRequest(prompt=PROMPT))
    assert events == [] and isinstance(error, BackendConfigError) and isinstance(error, ConfigError)
    assert "FLO_MISSING_KEY" in str(error)


@pytest.mark.asyncio
async def test_a_key_echoed_in_an_error_body_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLO_TEST_KEY", SECRET)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {SECRET}"}})

    spec = BackendSpec(name="OpenAI", base_url="https://api.example", model="gpt", api_key_env="FLO_TEST_KEY")
    backend = OpenAIBackend(spec, httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    _, error = await collect(backend, GenerationRequest(prompt=PROMPT))
    assert isinstance(error, BadRequestError) and error.status == 401
    assert SECRET not in str(error) and SECRET not in error.body_text


# --------------------------------------------------------------- parsing without the fake


def _mock_backend(body: bytes, kind: Kind = "openai", content_type: str = "text/event-stream") -> Backend:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": content_type})

    spec = BackendSpec(name="Together", kind=kind, base_url="https://api.example/v1", model="m")
    return make_backend(spec, httpx.AsyncClient(transport=httpx.MockTransport(handler)))


@pytest.mark.asyncio
async def test_sse_multiline_data_crlf_comments_and_fields() -> None:
    body = (
        b": keep-alive\r\n\r\n"
        b"event: message\r\nid: 1\r\n"
        b'data: {"choices": [{"text": "hel",\r\ndata: "finish_reason": null}]}\r\n\r\n'
        b'data:{"choices": [{"text": "lo", "finish_reason": "stop"}]}\r\n\r\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    events, error = await collect(_mock_backend(body), GenerationRequest(prompt="x"))
    assert error is None
    assert events == [
        TextChunk("hel"),
        TextChunk("lo"),
        StreamEnd("stop", {"prompt_tokens": 2, "completion_tokens": 2}),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [b'data: {"choices": [{"text": 5}]}\n\n', b'data: {"foo": 1}\n\n', b"data: [1, 2]\n\n"],
)
async def test_off_shape_chunks_are_malformed(body: bytes) -> None:
    _, error = await collect(_mock_backend(b'data: {"choices": [{"text": "a"}]}\n\n' + body), GenerationRequest("x"))
    assert isinstance(error, MalformedChunkError) and error.received_text


@pytest.mark.asyncio
async def test_half_written_last_event_is_a_cut_not_garbage() -> None:
    body = b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [{"te'
    events, error = await collect(_mock_backend(body), GenerationRequest(prompt="x"))
    assert events == [TextChunk("a")] and isinstance(error, StreamCutError)


@pytest.mark.asyncio
async def test_ollama_done_line_text_usage_and_cut() -> None:
    body = (
        b'{"model": "m", "response": "a", "done": false}\n'
        b'{"model": "m", "response": "b", "done": true, "done_reason": "length", '
        b'"prompt_eval_count": 3, "eval_count": 2}\n'
    )
    events, error = await collect(_mock_backend(body, "ollama", "application/x-ndjson"), GenerationRequest("x"))
    assert error is None
    assert events == [
        TextChunk("a"),
        TextChunk("b"),
        StreamEnd("length", {"prompt_tokens": 3, "completion_tokens": 2}, "m"),
    ]
    events, error = await collect(_mock_backend(body[:60], "ollama"), GenerationRequest("x"))
    assert events == [TextChunk("a")] and isinstance(error, StreamCutError)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            400,
            '{"object": "error", "message": "This model\'s maximum context length is 4096 tokens."}',
            ContextLengthError,
        ),
        (
            400,
            '{"error": {"code": 400, "message": "exceeds", "type": "exceed_context_size_error"}}',
            ContextLengthError,
        ),
        (413, "payload too large", ContextLengthError),
        (400, '{"error": {"message": "filtered", "code": "content_filter"}}', ContentPolicyRejection),
        (400, '{"error": "blocked by safety system"}', ContentPolicyRejection),
        (400, '{"error": {"message": "This model does not support assistant message prefill."}}', PrefillRejectedError),
        (404, '{"error": "model not found"}', BadRequestError),
        (502, "<html>bad gateway</html>", ServerError),
        (429, "", RateLimitedError),
    ],
)
def test_classify_error(status: int, body: str, expected: type[BackendHTTPError]) -> None:
    spec = BackendSpec(name="Vllm", base_url="http://x", model="m")
    error = classify_error(spec, status, body)
    assert type(error) is expected and error.status == status and "Vllm" in str(error)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "NotABackend"},
        {"base_url": "ftp://host"},
        {"base_url": "localhost:8000"},
        {"model": " "},
        {"kind": "grpc"},
        {"connect_timeout": 0},
        {"api_key_env": ""},
    ],
)
def test_backend_spec_validation(overrides: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"name": "Vllm", "base_url": "http://localhost:8000", "model": "m", **overrides}
    with pytest.raises(ConfigError):
        BackendSpec(**fields)


def test_spec_repr_hides_credential_headers() -> None:
    spec = BackendSpec(name="Vllm", base_url="http://h", model="m", headers={"Authorization": f"Bearer {SECRET}"})
    assert SECRET not in repr(spec)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"prompt": "a", "messages": MESSAGES}, {"messages": []}, {"prompt": "a", "max_tokens": 0}],
)
def test_generation_request_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerationRequest(**kwargs)


def test_make_backend_picks_the_adapter() -> None:
    assert isinstance(
        make_backend(BackendSpec(name="Ollama", kind="ollama", base_url="http://h", model="m")), OllamaBackend
    )
    backend = make_backend(BackendSpec(name="Vllm", base_url="http://h", model="m"))
    assert isinstance(backend, OpenAIBackend) and isinstance(backend, Backend)


@pytest.mark.asyncio
async def test_shared_client_is_not_closed_by_the_backend(server: FakeLLMServer) -> None:
    async with httpx.AsyncClient() as client:
        spec = BackendSpec(name="Vllm", base_url=server.base_url, model="m")
        await collect(OpenAIBackend(spec, client), GenerationRequest(prompt=PROMPT))
        assert not client.is_closed


# ------------------------------------------------------------------------- the fake server


@pytest.mark.asyncio
async def test_admin_endpoints(server: FakeLLMServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.post("/_faults", json={"model": "x", "fault": "cut:2"})).status_code == 200
        assert (await client.post("/_faults", json={"model": "x", "fault": "nope"})).status_code == 400
        assert (await client.get("/_faults")).json() == {"x": "cut:2"}
        assert "x" in {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
        reply = await client.post("/v1/completions", json={"model": "y", "prompt": PROMPT})
        assert reply.json()["choices"][0]["text"] == full_answer_text(PROMPT)
        assert [r["model"] for r in (await client.get("/_requests")).json()] == ["y"]
        await client.delete("/_faults")
        await client.delete("/_requests")
        assert (await client.get("/_faults")).json() == {} and server.requests == []
        assert (await client.get("/nope")).status_code == 404


def test_server_thread_for_sync_callers() -> None:
    with FakeLLMServerThread(token_delay=0.0) as fake:
        fake.set_fault("m", "http5xx:1")
        with httpx.Client(base_url=fake.base_url) as client:
            assert client.post("/api/generate", json={"model": "m", "prompt": "p"}).status_code == 503
            reply = client.post("/api/generate", json={"model": "m", "prompt": "p", "stream": False})
        assert reply.json()["response"] == full_answer_text("p")
        assert [r["fault"] for r in fake.requests] == ["http5xx:1", None]


def test_runs_as_a_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flo_coord.testing.fakellm", "--port", "0", "--fault", "m=cut:2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fakellm listening on http://")
        base_url = line.split()[-1]
        assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{base_url}/_faults").json() == {"m": "cut:2"}
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        assert proc.stdout is not None
        proc.stdout.close()


# ------------------------------------------------------------------ issue 11: endings at the adapter


@pytest.mark.asyncio
@pytest.mark.parametrize("dialect", ["event", "field", "data", "anthropic", "ollama"])
@pytest.mark.parametrize(
    ("inband_kind", "expected"),
    [
        ("server", ServerError),
        ("overloaded", ServerError),
        ("rate_limit", RateLimitedError),
        ("context_length", ContextLengthError),
    ],
)
async def test_in_band_errors_are_classified_like_their_status(
    server: FakeLLMServer, make: Callable[..., Backend], dialect: str, inband_kind: str, expected: type
) -> None:
    server.set_fault("m", f"inband:{dialect}:3:{inband_kind}")
    events, error = await collect(make(), GenerationRequest(prompt=PROMPT))
    assert type(error) is expected and error.received_text  # type: ignore[union-attr]
    # the error's own text never reaches the caller as answer text
    assert text_of(events) == "".join(full_answer(PROMPT)[:3])


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_finish_reasons_map_to_one_model(server: FakeLLMServer, make: Callable[..., Backend], kind: str) -> None:
    for reason, outcome in [
        ("stop", "stop"),
        ("eos", "stop"),
        ("length", "length"),
        ("abort", StreamAbortedError),
        ("mystery", StreamAbortedError),
        ("content_filter", ContentPolicyRejection),
    ]:
        server.set_fault("m", f"finish:{reason}:4")
        events, error = await collect(make(kind), GenerationRequest(prompt=PROMPT))
        assert text_of(events) == "".join(full_answer(PROMPT)[:4])
        if isinstance(outcome, str):
            assert error is None and events[-1].finish_reason == outcome, reason
        else:
            assert type(error) is outcome, reason


@pytest.mark.asyncio
async def test_a_connection_error_is_named_once(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    server.set_fault("m", "die_after:4")
    _, error = await collect(make(), GenerationRequest(prompt=PROMPT))
    name = str(error).split("received: ")[1].split(":")[0]
    assert str(error).count(f"{name}:") == 1, str(error)


@pytest.mark.asyncio
async def test_reasoning_and_tool_call_deltas_are_progress(server: FakeLLMServer, make: Callable[..., Backend]) -> None:
    server.set_fault("m", "reasoning:3")
    events, error = await collect(make(), GenerationRequest(messages=MESSAGES))
    assert error is None and [e for e in events if isinstance(e, Progress)] == [Progress("reasoning")] * 3
    assert text_of(events) == full_answer_text(render_messages(MESSAGES))
    server.set_fault("m", "tool_calls")
    events, error = await collect(make(), GenerationRequest(messages=MESSAGES))
    assert isinstance(error, ToolCallsOnlyError) and events == [Progress("tool_call")]


@pytest.mark.asyncio
async def test_hand_written_keepalive_shapes_are_skipped() -> None:
    body = (
        b'\xef\xbb\xbfdata: {"choices": [{"text": "a", "finish_reason": null}]}\n\n'
        b': comment\n\nevent: ping\ndata: {}\n\ndata: {"type": "ping"}\n\ndata:\n\ndata: keep-alive\n\n'
        b'data: {"object": "keepalive"}\n\n'
        b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\n'
        b'data: {"choices": [{"text": "b", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
    )
    events, error = await collect(_mock_backend(body), GenerationRequest(prompt=PROMPT))
    assert error is None and text_of(events) == "ab" and events[-1] == StreamEnd("stop", {"completion_tokens": 2})


def test_pool_is_sized_from_concurrency_unless_the_spec_says() -> None:
    spec = BackendSpec(name="Vllm", base_url="http://h:1", model="m")
    pool = make_backend(spec, max_connections=321)._client._transport._pool  # type: ignore[attr-defined]
    assert pool._max_connections == 321
    spec = BackendSpec(name="Vllm", base_url="http://h:1", model="m", max_connections=7)
    pool = make_backend(spec, max_connections=321)._client._transport._pool  # type: ignore[attr-defined]
    assert pool._max_connections == 7
