"""Issue 11, truthful endings: every way a stream ends, over real HTTP (fake LLM) and a real redis-server.

Each case checks the caller's text and the committed text byte for byte against the fake
server's full answer (or the exact typed error), and the outcome's finish_reason and usage.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from flo_coord import (  # Coordinator, BackendSpec, ExecutorConfig: importable from the package
    AnswerStream,
    BackendSpec,
    ChatMessage,
    ContentPolicyError,
    Coordinator,
    ExecutorConfig,
    FailoverConfig,
    GenerationError,
    RequestFailedError,
    ServingBackend,
)
from flo_coord.testing.fakellm import FakeLLMServer, full_answer, full_answer_text, parse_fault, render_messages

PROMPT = "How does a stream end truthfully?"
MESSAGES = [ChatMessage("user", "tell me about endings")]
FAST = ExecutorConfig(first_token_timeout=1.0, stall_timeout=1.0, backoff_initial=0.05, backoff_max=0.1)
MODELS = {"Vllm": "vllm-m", "Together": "together-m", "Groq": "groq-m", "Tgi": "tgi-m", "Ollama": "ollama-m"}


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


@pytest_asyncio.fixture
async def make(redis_server: Any, fake: FakeLLMServer) -> AsyncIterator[Any]:
    namespace = f"e{uuid.uuid4().hex[:10]}"
    built: list[Coordinator] = []

    def build(
        order: tuple[str, ...] = ("Vllm", "Together"), specs: list[BackendSpec] | None = None, **kw: Any
    ) -> Coordinator:
        specs = specs or [
            BackendSpec(name=n, kind="ollama" if n == "Ollama" else "openai", base_url=fake.base_url, model=MODELS[n])
            for n in order
        ]
        config = FailoverConfig(fallback_order=[ServingBackend(n) for n in order], max_retries=kw.pop("max_retries", 3))
        co = Coordinator(
            specs, url=redis_server.url, config=config, namespace=namespace, executor=kw.pop("executor", FAST), **kw
        )
        built.append(co)
        return co

    yield build
    for co in built:
        await co.aclose()


def rid() -> str:
    return f"end-{uuid.uuid4().hex[:8]}"


async def read(answer: AnswerStream) -> str:
    return "".join([chunk async for chunk in answer])


async def committed(co: Coordinator, request_id: str) -> str:
    return "".join([chunk async for chunk in co.follow(request_id)])


async def exact(co: Coordinator, request_id: str, prompt: Any, expected: str, finish: str = "stop") -> AnswerStream:
    """Run ``prompt``: received and committed text equal ``expected``; finish_reason checked."""
    answer = co.stream(request_id, prompt)
    assert await read(answer) == expected
    assert await committed(co, request_id) == expected
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Completed" and outcome.finish_reason == finish
    assert answer.finish_reason == finish and answer.usage == outcome.usage
    return answer


# ------------------------------------------------------------------------- finish reasons


@pytest.mark.parametrize("reason", ["stop", "eos"])
async def test_stop_and_eos_are_complete(make: Any, fake: FakeLLMServer, reason: str) -> None:
    fake.set_fault(MODELS["Vllm"], f"finish:{reason}")
    co = make()
    request_id = rid()
    answer = await exact(co, request_id, PROMPT, full_answer_text(PROMPT))
    assert answer.usage is not None and answer.usage["completion_tokens"] == len(full_answer(PROMPT))


async def test_length_is_complete_and_visible(make: Any, fake: FakeLLMServer) -> None:
    co = make()
    request_id = rid()
    answer = co.stream(request_id, PROMPT, max_tokens=7)
    assert await read(answer) == "".join(full_answer(PROMPT)[:7])
    assert answer.finish_reason == "length"
    assert (await co.outcome(request_id)).finish_reason == "length"  # type: ignore[union-attr]


@pytest.mark.parametrize("reason", ["abort", "error", "weird_reason"])
async def test_abort_error_and_unknown_finish_continue_from_the_prefix(
    make: Any, fake: FakeLLMServer, reason: str
) -> None:
    fake.set_fault(MODELS["Vllm"], f"finish:{reason}:5")
    co = make()
    request_id = rid()
    await exact(co, request_id, PROMPT, full_answer_text(PROMPT))
    (together,) = [r for r in fake.requests if r["model"] == MODELS["Together"]]
    assert together["prompt"] == PROMPT + "".join(full_answer(PROMPT)[:5])
    # usage summed over attempts: the aborted attempt reported usage too
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.usage is not None
    assert outcome.usage["completion_tokens"] == len(full_answer(PROMPT))  # 5 + the rest


async def test_content_filter_is_a_typed_error_with_text_kept(make: Any, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "finish:content_filter:4")
    co = make()
    request_id = rid()
    follower = asyncio.create_task(read(co.follow(request_id, wait=5.0)))
    started = time.monotonic()
    with pytest.raises(ContentPolicyError, match="content filter"):
        await read(co.stream(request_id, PROMPT))
    with pytest.raises(RequestFailedError, match="content"):
        await asyncio.wait_for(follower, 5.0)
    assert time.monotonic() - started < 5.0
    assert [r["model"] for r in fake.requests] == [MODELS["Vllm"]]  # never retried anywhere
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.finish_reason == "content_filter"
    chunks: list[str] = []
    with pytest.raises(RequestFailedError):  # the text committed before the filter stays readable
        async for chunk in co.follow(request_id):
            chunks.append(chunk)
    assert "".join(chunks) == "".join(full_answer(PROMPT)[:4])


async def test_end_without_finish_reason_is_cut(make: Any, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:5")
    co = make()
    await exact(co, rid(), PROMPT, full_answer_text(PROMPT))


async def test_finish_then_reset_before_done_is_complete(make: Any, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "finish_reset")
    co = make()
    await exact(co, rid(), PROMPT, full_answer_text(PROMPT))
    assert [r["model"] for r in fake.requests] == [MODELS["Vllm"]]  # no failover appended anything


# ------------------------------------------------------------------------- in-band errors


@pytest.mark.parametrize("dialect", ["event", "field", "data", "anthropic", "ollama"])
async def test_in_band_errors_of_every_dialect_continue_without_their_text(
    make: Any, fake: FakeLLMServer, dialect: str
) -> None:
    fake.set_fault(MODELS["Vllm"], f"inband:{dialect}:4")
    co = make()
    request_id = rid()
    await exact(co, request_id, PROMPT, full_answer_text(PROMPT))
    history = [a for a in await co.manager.history() if getattr(a, "request_id", None) == request_id]
    assert "fake internal error" in history[0].result.message  # type: ignore[union-attr]


async def test_in_band_context_length_moves_on_at_once(make: Any, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "inband:anthropic:0:context_length")
    co = make()
    await exact(co, rid(), PROMPT, full_answer_text(PROMPT))
    assert [r["model"] for r in fake.requests] == [MODELS["Vllm"], MODELS["Together"]]  # not retried


async def test_in_band_error_in_ollama_ndjson(make: Any, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Ollama"], "inband:ollama:3")
    co = make(("Ollama", "Together"))
    await exact(co, rid(), PROMPT, full_answer_text(PROMPT))


# ------------------------------------------------------------------------- not a chunk


@pytest.mark.parametrize("fault", ["pings", "empty_frames", "bom"])
@pytest.mark.parametrize("backend", ["Vllm", "Ollama"])
async def test_keepalives_empty_frames_and_bom_are_not_faults(
    make: Any, fake: FakeLLMServer, fault: str, backend: str
) -> None:
    fake.set_fault(MODELS[backend], fault)
    co = make((backend, "Together"))
    for _ in range(4):  # more than the breaker threshold: none of it may count as a failure
        request_id = rid()
        await exact(co, request_id, MESSAGES, full_answer_text(render_messages(MESSAGES)))
    assert {r["model"] for r in fake.requests} == {MODELS[backend]}
    assert await co.breaker.allow(backend) == "CLOSED"


# ------------------------------------------------------------------------- progress


async def test_reasoning_longer_than_first_token_timeout_is_progress(make: Any, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "reasoning:6:0.4")  # 2.4 s of reasoning, first_token_timeout 1 s
    co = make()
    await exact(co, rid(), MESSAGES, full_answer_text(render_messages(MESSAGES)))
    assert [r["model"] for r in fake.requests] == [MODELS["Vllm"]]


@pytest.mark.parametrize("backend", ["Vllm", "Ollama"])
async def test_tool_call_only_answer_is_a_typed_error(make: Any, fake: FakeLLMServer, backend: str) -> None:
    fake.set_fault(MODELS[backend], "tool_calls")
    co = make((backend, "Together"))
    request_id = rid()
    with pytest.raises(GenerationError, match="tool calls"):
        await read(co.stream(request_id, MESSAGES))
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Failed" and "tool calls" in (outcome.error or "")
    assert "failed: request" not in (outcome.error or "")  # said once


# ------------------------------------------------------------------------- continuation by capability


async def test_tgi_fallback_gets_continue_final_message_by_capability(make: Any, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:6")
    fake.set_fault(MODELS["Tgi"], "needs_continue")
    co = make(("Vllm", "Tgi"))
    await exact(co, rid(), MESSAGES, full_answer_text(render_messages(MESSAGES)))
    (tgi,) = [r for r in fake.requests if r["model"] == MODELS["Tgi"]]
    assert tgi["body"]["continue_final_message"] is True and tgi["body"]["add_generation_prompt"] is False


async def test_completions_continuation_renders_the_chat(make: Any, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:6")
    specs = [
        BackendSpec(name="Vllm", base_url=fake.base_url, model=MODELS["Vllm"]),
        BackendSpec(name="Together", base_url=fake.base_url, model=MODELS["Together"], continuation="completions"),
    ]
    co = make(specs=specs)
    await exact(co, rid(), MESSAGES, full_answer_text(render_messages(MESSAGES)))
    (together,) = [r for r in fake.requests if r["model"] == MODELS["Together"]]
    assert together["path"] == "/v1/completions"


async def test_prefill_rejection_is_remembered_and_a_transient_backend_continues(
    make: Any, fake: FakeLLMServer
) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:6*1")  # cut once, healthy afterwards
    fake.set_fault(MODELS["Together"], "reject_prefill")
    co = make()
    request_id = rid()
    await exact(co, request_id, MESSAGES, full_answer_text(render_messages(MESSAGES)))
    assert [r["model"] for r in fake.requests] == [MODELS["Vllm"], MODELS["Together"], MODELS["Vllm"]]
    # another request (any worker): Together is not asked to continue again for a while
    fake.set_fault(MODELS["Vllm"], "cut:6*1")
    fake.clear_requests()
    other = make()
    await exact(other, rid(), MESSAGES, full_answer_text(render_messages(MESSAGES)))
    assert [r["model"] for r in fake.requests] == [MODELS["Vllm"], MODELS["Vllm"]]


# ------------------------------------------------------------------------- liveness


async def test_missing_api_key_fails_over_and_is_in_the_history(make: Any, fake: FakeLLMServer) -> None:
    os.environ.pop("FLO_TEST_UNSET_KEY", None)
    specs = [
        BackendSpec(name="Vllm", base_url=fake.base_url, model=MODELS["Vllm"], api_key_env="FLO_TEST_UNSET_KEY"),
        BackendSpec(name="Together", base_url=fake.base_url, model=MODELS["Together"]),
    ]
    co = make(specs=specs)
    request_id = rid()
    await exact(co, request_id, PROMPT, full_answer_text(PROMPT))
    history = [a for a in await co.manager.history() if getattr(a, "request_id", None) == request_id]
    assert "FLO_TEST_UNSET_KEY" in history[0].result.message  # type: ignore[union-attr]
    assert await co.breaker.allow("Vllm") == "CLOSED"


async def test_a_line_larger_than_the_append_limit_is_committed_in_pieces(redis_server: Any) -> None:
    async with FakeLLMServer(n_tokens=15000, faults={"big": "one_line"}) as server:
        spec = BackendSpec(name="Vllm", base_url=server.base_url, model="big")
        co = Coordinator(
            [spec],
            url=redis_server.url,
            namespace=f"b{uuid.uuid4().hex[:8]}",
            executor=FAST,
            config=FailoverConfig(fallback_order=[ServingBackend.Vllm]),
        )
        try:
            expected = full_answer_text(PROMPT, 15000)
            assert len(expected.encode()) > 64 * 1024
            await exact(co, rid(), PROMPT, expected)
        finally:
            await co.aclose()


async def test_tokens_beyond_48_continue_instead_of_restarting(redis_server: Any) -> None:
    async with FakeLLMServer(n_tokens=200, faults={"a": "cut:120"}) as server:
        specs = [
            BackendSpec(name="Vllm", base_url=server.base_url, model="a"),
            BackendSpec(name="Together", base_url=server.base_url, model="b"),
        ]
        co = Coordinator(
            specs,
            url=redis_server.url,
            namespace=f"t{uuid.uuid4().hex[:8]}",
            executor=FAST,
            config=FailoverConfig(fallback_order=[ServingBackend.Vllm, ServingBackend.Together]),
        )
        try:
            await exact(co, rid(), PROMPT, full_answer_text(PROMPT, 200))
        finally:
            await co.aclose()


async def test_echoed_api_key_in_a_200_stream_is_redacted(make: Any, fake: FakeLLMServer, caplog: Any) -> None:
    secret = "sk-echo-0123456789abcdef"
    os.environ["FLO_TEST_ECHO_KEY"] = secret
    try:
        fake.set_fault(MODELS["Vllm"], "echo_key")
        specs = [
            BackendSpec(name="Vllm", base_url=fake.base_url, model=MODELS["Vllm"], api_key_env="FLO_TEST_ECHO_KEY"),
            BackendSpec(name="Together", base_url=fake.base_url, model=MODELS["Together"]),
        ]
        co = make(specs=specs)
        request_id = rid()
        with caplog.at_level("DEBUG"):
            await exact(co, request_id, PROMPT, full_answer_text(PROMPT))
        history = [a for a in await co.manager.history() if getattr(a, "request_id", None) == request_id]
        assert "invalid credentials" in history[0].result.message  # type: ignore[union-attr]
        assert secret not in repr(history) and secret not in caplog.text and secret not in str(fake.requests)
    finally:
        os.environ.pop("FLO_TEST_ECHO_KEY", None)


def test_bad_fault_spec_lists_the_kinds() -> None:
    with pytest.raises(ValueError, match="inband") as caught:
        parse_fault("nonsense:1")
    assert "finish_reset" in str(caught.value) and "needs_continue" in str(caught.value)


def test_spec_hides_url_credentials() -> None:
    spec = BackendSpec(name="Vllm", base_url="http://user:pw-secret@host:8000", model="m")
    assert "pw-secret" not in repr(spec) and "pw-secret" not in spec.safe_url and "host:8000" in spec.safe_url


async def test_usage_is_summed_over_attempts_across_a_takeover(make: Any, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "finish:abort:5")  # reports usage for its 5 tokens, then aborts
    fake.set_fault(MODELS["Together"], "stall:2:30*1")  # the first Together call stalls after 2 tokens
    first, second = make(), make()
    request_id = rid()
    ctx = await first.manager.start_tracking(request_id, PROMPT)
    first.resume_in_background(ctx)
    await asyncio.sleep(0.5)  # Vllm aborted, Together is stalled
    await first.aclose()  # hands the request back
    await second.start(reap=True, reap_interval=0.1)
    assert await asyncio.wait_for(committed(second, request_id), 10.0) == full_answer_text(PROMPT)
    outcome = await second.outcome(request_id)
    n = len(full_answer(PROMPT))
    assert outcome is not None and outcome.owner == second.worker_id and outcome.finish_reason == "stop"
    assert outcome.usage is not None and outcome.usage["completion_tokens"] == 5 + (n - 7)


def test_toml_overrides_the_continuation_default(tmp_path: Any) -> None:
    from flo_coord.errors import ConfigError
    from flo_coord.settings import load_settings

    base = '[[backends]]\nname = "Vllm"\nbase_url = "http://h:1"\nmodel = "m"\n'
    path = tmp_path / "flo.toml"
    path.write_text(base, encoding="utf-8")
    assert load_settings(path, environ={}).backends[0].continues_chat == "continue_final_message"
    path.write_text(base + 'continuation = "completions"\nmax_connections = 8\n', encoding="utf-8")
    spec = load_settings(path, environ={}).backends[0]
    assert (spec.continues_chat, spec.max_connections) == ("completions", 8)
    path.write_text(base + 'continuation = "guess"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="continuation"):
        load_settings(path, environ={})
