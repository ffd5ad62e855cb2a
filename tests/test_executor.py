"""The Coordinator end to end: the fake LLM server over real HTTP, state on a real redis-server.

Every failure case compares the final text byte for byte with the fake server's full answer,
and checks the recorded attempts and, where it matters, the fake server's request log.
Each test gets a fresh namespace on the session's redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from flo_coord import (
    ChatMessage,
    ContentPolicyError,
    FailoverAttempt,
    FailoverConfig,
    FailoverResult,
    GenerationError,
    RequestFailedError,
    ServingBackend,
    Takeover,
)
from flo_coord.errors import UnknownRequestError
from flo_coord.execution.backends import BackendSpec
from flo_coord.execution.breaker import BreakerConfig
from flo_coord.execution.coordinator import Coordinator, ExecutorConfig, estimate_tokens
from flo_coord.execution.worker import Worker
from flo_coord.store import queue
from flo_coord.store.core import FailoverCore
from flo_coord.testing.fakellm import FakeLLMServer, full_answer, full_answer_text, render_messages

PROMPT = "Why do leases need fencing tokens?"
ANSWER = full_answer_text(PROMPT)
MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "what is a fencing token?")]
CHAT_ANSWER = full_answer_text(render_messages(MESSAGES))
MODELS = {"Vllm": "vllm-m", "Together": "together-m", "Groq": "groq-m", "Ollama": "ollama-m"}
ORDER = ("Vllm", "Together", "Groq")
#: Small deadlines so every failure case runs in well under a second or two.
FAST = ExecutorConfig(
    first_token_timeout=2.0, stall_timeout=2.0, backoff_initial=0.2, backoff_max=0.4, rate_limit_max_wait=5.0
)


def prefix_of(answer_tokens: list[str], k: int) -> str:
    return "".join(answer_tokens[:k])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


Make = Callable[..., Coordinator]


@pytest_asyncio.fixture
async def make(redis_server: Any, fake: FakeLLMServer) -> AsyncIterator[Make]:
    """Build Coordinators on one fresh namespace; backend X serves model MODELS[X] on the fake."""
    namespace = f"x{uuid.uuid4().hex[:10]}"
    built: list[Coordinator] = []

    def build(
        order: tuple[str, ...] = ORDER,
        *,
        specs: list[BackendSpec] | None = None,
        executor: ExecutorConfig = FAST,
        max_retries: int = 2,
        failover_timeout: float = 30.0,
        **options: Any,
    ) -> Coordinator:
        if specs is None:
            specs = [BackendSpec(name=n, base_url=fake.base_url, model=MODELS[n]) for n in order]
        config = FailoverConfig(
            fallback_order=[ServingBackend(n) for n in order],
            max_retries=max_retries,
            failover_timeout=failover_timeout,
        )
        coordinator = Coordinator(
            specs, url=redis_server.url, config=config, namespace=namespace, executor=executor, **options
        )
        built.append(coordinator)
        return coordinator

    yield build
    for coordinator in built:
        await coordinator.aclose()


def rid() -> str:
    return f"req-{uuid.uuid4().hex[:8]}"


async def collect(stream: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in stream])


def to_model(fake: FakeLLMServer, name: str) -> list[dict[str, Any]]:
    """The fake server's log of generation requests for backend ``name``'s model."""
    return [r for r in fake.requests if r["model"] == MODELS[name]]


async def attempts_of(coordinator: Coordinator, request_id: str) -> list[FailoverAttempt]:
    history = await coordinator.manager.history()
    return [e for e in history if isinstance(e, FailoverAttempt) and e.request_id == request_id]


def summary(attempts: list[FailoverAttempt]) -> list[tuple[str, str]]:
    """(backend, result name) of each attempt."""
    return [(str(a.backend), a.result.name if a.result else "") for a in attempts]


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ 1. connection failures


@pytest.mark.parametrize("how", ["refuse", "nothing_listening"])
async def test_connection_failure_before_the_first_byte_fails_over(make: Make, fake: FakeLLMServer, how: str) -> None:
    specs = None
    if how == "refuse":
        fake.set_fault(MODELS["Vllm"], "refuse")
    else:
        dead = BackendSpec(name="Vllm", base_url=f"http://127.0.0.1:{free_port()}", model=MODELS["Vllm"])
        specs = [dead] + [BackendSpec(name=n, base_url=fake.base_url, model=MODELS[n]) for n in ORDER[1:]]
    co = make(specs=specs)
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Together", "Success")]
    assert "connection failed before any text" in attempts[0].result.message
    assert len(to_model(fake, "Vllm")) == (1 if how == "refuse" else 0)
    assert [r["prompt"] for r in to_model(fake, "Together")] == [PROMPT]
    assert to_model(fake, "Groq") == []
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Completed" and outcome.backend == "Together"


# ------------------------------------------------------------------------------- 2. 5xx


async def test_5xx_once_is_retried_on_the_same_backend(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "http5xx:1")
    co = make()
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    assert [r["outcome"] for r in to_model(fake, "Vllm")] == ["error:http5xx", "completed"]
    assert to_model(fake, "Together") == [] and to_model(fake, "Groq") == []
    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Vllm", "Success")]
    assert "HTTP 503" in attempts[0].result.message
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.backend == "Vllm"


async def test_5xx_every_time_fails_over_after_the_same_backend_retries(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "http5xx:50")
    co = make()
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    assert len(to_model(fake, "Vllm")) == 1 + FAST.same_backend_retries
    assert summary(await attempts_of(co, request_id)) == [
        ("Vllm", "BackendError"),
        ("Vllm", "BackendError"),
        ("Together", "Success"),
    ]


# ------------------------------------------------------------------------------- 3. 429


async def test_429_with_retry_after_is_honoured(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "rate429:1")
    co = make()
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    first, second = to_model(fake, "Vllm")
    assert first["outcome"] == "error:rate429" and second["outcome"] == "completed"
    gap = second["at"] - first["at"]
    assert 0.95 <= gap < 5.0, f"Retry-After: 1 not honoured: second request {gap:.3f}s after the first"
    assert to_model(fake, "Together") == []
    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Vllm", "Success")]
    assert "retry after 1s" in attempts[0].result.message


async def test_429_without_retry_after_backs_off_then_fails_over(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "rate429*100")  # every request, no Retry-After
    co = make()
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    hits = to_model(fake, "Vllm")
    # one call and rate_limit_retries retries, no more: the backend is not hammered
    assert len(hits) == 1 + FAST.rate_limit_retries
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(hits)]
    # exponential backoff with jitter: retry i waits in [cap/2, cap], cap = initial * 2**i
    for i, gap in enumerate(gaps):
        cap = min(FAST.backoff_max, FAST.backoff_initial * 2**i)
        assert gap >= cap / 2 - 0.02, f"retry {i} came after {gap:.3f}s (< {cap / 2}s)"
    assert summary(await attempts_of(co, request_id)) == [("Vllm", "BackendError")] * 3 + [("Together", "Success")]


async def test_429_with_a_retry_after_too_long_fails_over_at_once(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "rate429:60")
    co = make()
    request_id = rid()
    started = time.monotonic()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    assert time.monotonic() - started < 5.0
    assert len(to_model(fake, "Vllm")) == 1 and len(to_model(fake, "Together")) == 1


# -------------------------------------------------------------------------- 4. cut stream


async def test_cut_stream_continues_on_the_next_backend_from_the_exact_prefix(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:7")
    co = make()
    request_id = rid()
    chunks = [chunk async for chunk in co.stream(request_id, PROMPT)]

    assert "".join(chunks) == ANSWER
    committed = prefix_of(full_answer(PROMPT), 7)
    (together,) = to_model(fake, "Together")
    assert together["prompt"] == PROMPT + committed  # the continuation prompt: prompt + committed prefix
    assert together["path"] == "/v1/completions"
    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Together", "Success")]
    assert "stream ended without" in attempts[0].result.message
    assert attempts[0].tokens == 7 and attempts[1].tokens == len(full_answer(PROMPT)) - 7


async def test_die_after_reset_mid_stream_continues(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "die_after:5")
    co = make()
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    (together,) = to_model(fake, "Together")
    assert together["prompt"] == PROMPT + prefix_of(full_answer(PROMPT), 5)
    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Together", "Success")]
    assert "mid-stream" in attempts[0].result.message


async def test_in_stream_error_retries_the_same_backend_from_the_prefix(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "stream_error:5")  # every call: 5 more tokens, then an error object
    co = make()
    request_id = rid()
    tokens = full_answer(PROMPT)

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    # a 5xx-like error: one retry on the same backend, continuing from what was committed
    assert [r["prompt"] for r in to_model(fake, "Vllm")] == [PROMPT, PROMPT + prefix_of(tokens, 5)]
    assert [r["prompt"] for r in to_model(fake, "Together")] == [PROMPT + prefix_of(tokens, 10)]
    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Vllm", "BackendError"), ("Together", "Success")]
    assert [a.tokens for a in attempts] == [5, 5, len(tokens) - 10]


async def test_max_tokens_is_shared_across_a_failover(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:4")
    co = make()
    request_id = rid()

    text = await collect(co.stream(request_id, PROMPT, max_tokens=10))

    # issue 11: the cut attempt reported no usage, so its 4 deltas count by the conservative
    # estimate (never a word count), and the answer ends visibly cut by the limit
    left = 10 - estimate_tokens(prefix_of(full_answer(PROMPT), 4), 4)
    assert 0 < left < 6
    assert text == prefix_of(full_answer(PROMPT), 4 + left)
    assert to_model(fake, "Vllm")[0]["max_tokens"] == 10
    assert to_model(fake, "Together")[0]["max_tokens"] == left
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Completed" and outcome.finish_reason == "length"


async def test_many_concurrent_requests_with_failures_each_get_their_own_answer(
    make: Make, fake: FakeLLMServer
) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:3*6")  # six of the requests are cut
    fake.set_token_delay(0.005)
    co = make()
    prompts = [f"question number {i}" for i in range(12)]
    ids = [rid() for _ in prompts]

    texts = await asyncio.gather(*(collect(co.stream(i, p)) for i, p in zip(ids, prompts, strict=True)))

    assert texts == [full_answer_text(p) for p in prompts]
    assert len(to_model(fake, "Together")) == 6
    for request_id in ids:
        outcome = await co.outcome(request_id)
        assert outcome is not None and outcome.state == "Completed"


# ------------------------------------------------------------------ 5. stalls, slow first token


async def test_stall_with_the_connection_open_times_out_and_continues(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "stall:6:30")
    co = make(executor=ExecutorConfig(first_token_timeout=2.0, stall_timeout=0.75))
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "Timeout"), ("Together", "Success")]
    assert attempts[0].tokens == 6
    (together,) = to_model(fake, "Together")
    assert together["prompt"] == PROMPT + prefix_of(full_answer(PROMPT), 6)
    # the stalled response was dropped, not left open
    await eventually(lambda: to_model(fake, "Vllm")[0]["outcome"] == "client_disconnected", what="stall hang-up")


async def test_slow_first_token_times_out_and_fails_over(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "slow_first:30")
    co = make(executor=ExecutorConfig(first_token_timeout=1.0, stall_timeout=2.0))
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "Timeout"), ("Together", "Success")]
    assert attempts[0].tokens == 0
    assert [r["prompt"] for r in to_model(fake, "Together")] == [PROMPT]
    await eventually(lambda: to_model(fake, "Vllm")[0]["outcome"] == "client_disconnected", what="slow hang-up")


# --------------------------------------------------------------------------- 6. malformed


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_malformed_chunk_never_reaches_the_caller(make: Make, fake: FakeLLMServer, chat: bool) -> None:
    fake.set_fault(MODELS["Vllm"], "malformed:4*1")  # only the first request
    co = make()
    request_id = rid()
    prompt: Any = MESSAGES if chat else PROMPT
    expected = CHAT_ANSWER if chat else ANSWER

    chunks = [chunk async for chunk in co.stream(request_id, prompt)]

    assert "".join(chunks) == expected
    assert not any("not json" in c or "{" in c for c in chunks)
    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Together", "Success")]
    assert "malformed" in attempts[0].result.message
    # the coordinator (and the backend that sent garbage) still work for the next request
    again = rid()
    assert await collect(co.stream(again, prompt)) == expected
    assert summary(await attempts_of(co, again)) == [("Vllm", "Success")]


# ---------------------------------------------------------------- 7. no [DONE], finish_reason


async def test_stream_without_done_but_with_finish_reason_is_a_success(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "no_done")
    co = make()
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    assert len(to_model(fake, "Vllm")) == 1 and to_model(fake, "Together") == []
    assert summary(await attempts_of(co, request_id)) == [("Vllm", "Success")]


# ------------------------------------------------------------------ 8. context too long


async def test_context_too_long_is_not_retried_on_that_backend(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "context_length")
    co = make()
    request_id = rid()

    assert await collect(co.stream(request_id, PROMPT)) == ANSWER

    assert len(to_model(fake, "Vllm")) == 1
    assert len(to_model(fake, "Together")) == 1
    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Together", "Success")]
    assert "context_length_exceeded" in attempts[0].result.message


# ------------------------------------------------------------------- 9. content policy


async def test_content_policy_is_not_retried_anywhere(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "content_policy")
    co = make()
    request_id = rid()
    follower = asyncio.create_task(collect(co.follow(request_id, wait=5.0)))

    with pytest.raises(ContentPolicyError) as caught:
        await collect(co.stream(request_id, PROMPT))

    assert "fake content policy" in caught.value.reason
    assert caught.value.request_id == request_id
    assert summary(caught.value.attempts) == [("Vllm", "BackendError")]
    assert len(to_model(fake, "Vllm")) == 1
    assert to_model(fake, "Together") == [] and to_model(fake, "Groq") == []
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Failed" and outcome.error_kind == "ContentPolicyError"
    with pytest.raises(RequestFailedError, match="content policy"):
        await asyncio.wait_for(follower, 5.0)
    with pytest.raises(RequestFailedError, match="fake content policy"):
        await collect(co.follow(request_id))


# ---------------------------------------------------------------------- 10. prefill


async def test_prefill_rejection_moves_on_to_a_backend_that_takes_it(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:6")
    fake.set_fault(MODELS["Together"], "reject_prefill")
    co = make()
    request_id = rid()

    assert await collect(co.stream(request_id, MESSAGES)) == CHAT_ANSWER

    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Together", "BackendError"), ("Groq", "Success")]
    assert "prefill" in attempts[1].result.message
    (groq,) = to_model(fake, "Groq")
    committed = prefix_of(full_answer(render_messages(MESSAGES)), 6)
    assert groq["path"] == "/v1/chat/completions"
    assert groq["messages"][:-1] == [{"role": m.role, "content": m.content} for m in MESSAGES]
    assert groq["messages"][-1] == {"role": "assistant", "content": committed}


async def test_no_backend_can_take_the_prefill_reports_the_real_failure(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:6")
    fake.set_fault(MODELS["Together"], "reject_prefill")
    specs = [
        BackendSpec(name="Vllm", base_url=fake.base_url, model=MODELS["Vllm"]),
        BackendSpec(name="Together", base_url=fake.base_url, model=MODELS["Together"]),
        # configured as unable to continue a chat: never even asked
        BackendSpec(name="Groq", base_url=fake.base_url, model=MODELS["Groq"], prefill=False),
    ]
    co = make(specs=specs, max_retries=5)
    request_id = rid()

    with pytest.raises(GenerationError) as caught:
        await collect(co.stream(request_id, MESSAGES))

    message = str(caught.value)
    assert "stream ended without" in message  # the cut that forced the failover
    assert "prefill" not in message
    # issue 11: Vllm, which failed only transiently (a cut), is tried again after a backoff,
    # each time from the committed prefix, until its shared breaker opens (threshold 3)
    assert summary(caught.value.attempts) == [
        ("Vllm", "BackendError"),
        ("Together", "BackendError"),
        ("Vllm", "BackendError"),
        ("Vllm", "BackendError"),
        ("Vllm", "NoBackendsAvailable"),
    ]
    tokens = full_answer(render_messages(MESSAGES))
    assert [r["messages"][-1]["content"] for r in to_model(fake, "Vllm")[1:]] == [
        prefix_of(tokens, 6),
        prefix_of(tokens, 12),
    ]
    assert to_model(fake, "Groq") == []
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Failed"


# ------------------------------------------------------ 11. max_retries and failover_timeout


async def test_max_retries_is_enforced_and_never_returns_a_truncated_answer(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault("*", "cut:3")
    co = make(max_retries=1)
    request_id = rid()
    delivered: list[str] = []

    with pytest.raises(GenerationError) as caught:
        async for chunk in co.stream(request_id, PROMPT):
            delivered.append(chunk)

    assert "max_retries" in str(caught.value) and "stream ended without" in str(caught.value)
    assert summary(caught.value.attempts) == [("Vllm", "BackendError"), ("Together", "BackendError")]
    assert len(to_model(fake, "Vllm")) == 1 and len(to_model(fake, "Together")) == 1 and to_model(fake, "Groq") == []
    # what was delivered is a strict prefix, and the request is marked failed, not completed
    assert ANSWER.startswith("".join(delivered)) and "".join(delivered) != ANSWER
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Failed" and outcome.error_kind == "GenerationError"
    with pytest.raises(GenerationError):
        await co.run(rid(), PROMPT)


async def test_failover_timeout_is_enforced(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:2")
    fake.set_fault(MODELS["Together"], "slow_first:30")
    co = make(executor=ExecutorConfig(first_token_timeout=10.0, stall_timeout=10.0), failover_timeout=0.5)
    request_id = rid()
    started = time.monotonic()

    with pytest.raises(GenerationError, match="failover_timeout") as caught:
        await collect(co.stream(request_id, PROMPT))

    # the failover budget, not the 10 s first-token timeout, ended the wait on Together
    assert time.monotonic() - started < 5.0
    assert summary(caught.value.attempts) == [("Vllm", "BackendError"), ("Together", "Timeout")]
    assert "no first token" in str(caught.value) and "s (failover_timeout)" in str(caught.value)
    assert to_model(fake, "Groq") == []
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Failed"
    # running out of this request's budget is not counted against Together's shared breaker
    assert await co.manager.redis.hgetall(co.manager.core.keys.breaker("Together")) == {}
    assert int(await co.manager.redis.hget(co.manager.core.keys.breaker("Vllm"), "failures")) == 1


# ------------------------------------------------------------------ 12. circuit breaker


async def test_shared_circuit_breaker_across_coordinators(make: Make, fake: FakeLLMServer) -> None:
    breaker = BreakerConfig(threshold=2, window=30.0, cooldown=1.0, probe_ttl=10.0)
    one = make(("Vllm", "Together"), worker_id="coord-one", breaker=breaker)
    two = make(("Vllm", "Together"), worker_id="coord-two", breaker=breaker)
    fake.set_fault(MODELS["Vllm"], "refuse")

    for _ in range(breaker.threshold):  # coordinator 1 sees Vllm fail `threshold` times
        assert await collect(one.stream(rid(), PROMPT)) == ANSWER
    assert len(to_model(fake, "Vllm")) == breaker.threshold

    # coordinator 2 skips Vllm during the cooldown: no request reaches it
    skipped = rid()
    assert await collect(two.stream(skipped, PROMPT)) == ANSWER
    assert len(to_model(fake, "Vllm")) == breaker.threshold
    assert summary(await attempts_of(two, skipped)) == [("Together", "Success")]

    # Vllm recovers; after the cooldown exactly one probe goes to it (half-open)
    fake.set_fault(MODELS["Vllm"], None)
    fake.set_token_delay(0.03, MODELS["Vllm"])  # the probe takes ~1.5 s
    await asyncio.sleep(breaker.cooldown + 0.2)
    probe_id = rid()
    probe = asyncio.create_task(collect(two.stream(probe_id, PROMPT)))
    await eventually(lambda: len(to_model(fake, "Vllm")) == breaker.threshold + 1, what="the probe")
    during = rid()  # meanwhile coordinator 1 must not pile onto the half-open backend
    assert await collect(one.stream(during, PROMPT)) == ANSWER
    assert summary(await attempts_of(one, during)) == [("Together", "Success")]
    assert await probe == ANSWER
    assert summary(await attempts_of(two, probe_id)) == [("Vllm", "Success")]
    assert len(to_model(fake, "Vllm")) == breaker.threshold + 1

    # the probe succeeded: the breaker is closed for both
    fake.set_token_delay(0.0, MODELS["Vllm"])
    for co in (one, two):
        back = rid()
        assert await collect(co.stream(back, PROMPT)) == ANSWER
        assert summary(await attempts_of(co, back)) == [("Vllm", "Success")]
    assert len(to_model(fake, "Vllm")) == breaker.threshold + 3


async def test_a_failed_probe_reopens_the_breaker(make: Make, fake: FakeLLMServer) -> None:
    breaker = BreakerConfig(threshold=1, window=30.0, cooldown=0.5, probe_ttl=10.0)
    co = make(("Vllm", "Together"), breaker=breaker)
    fake.set_fault(MODELS["Vllm"], "refuse")
    assert await collect(co.stream(rid(), PROMPT)) == ANSWER  # opens it
    assert await collect(co.stream(rid(), PROMPT)) == ANSWER  # skipped
    assert len(to_model(fake, "Vllm")) == 1
    await asyncio.sleep(breaker.cooldown + 0.2)
    assert await collect(co.stream(rid(), PROMPT)) == ANSWER  # the probe fails: open again
    assert await collect(co.stream(rid(), PROMPT)) == ANSWER  # skipped again
    assert len(to_model(fake, "Vllm")) == 2


async def test_half_open_lets_one_probe_request_through_not_a_whole_worker(make: Make, fake: FakeLLMServer) -> None:
    breaker = BreakerConfig(threshold=1, window=30.0, cooldown=0.5, probe_ttl=10.0)
    co = make(("Vllm", "Together"), breaker=breaker)
    fake.set_fault(MODELS["Vllm"], "refuse")
    assert await collect(co.stream(rid(), PROMPT)) == ANSWER  # opens it
    fake.set_fault(MODELS["Vllm"], None)
    fake.set_token_delay(0.02)
    await asyncio.sleep(breaker.cooldown + 0.2)

    ids = [rid() for _ in range(4)]  # four requests of ONE worker at once
    texts = await asyncio.gather(*(collect(co.stream(i, PROMPT)) for i in ids))

    assert texts == [ANSWER] * 4
    assert len(to_model(fake, "Vllm")) == 2  # the opening failure and one probe
    summaries = sorted([summary(await attempts_of(co, i)) for i in ids])
    assert summaries == [[("Together", "Success")]] * 3 + [[("Vllm", "Success")]]


# ------------------------------------------------------------------------- 13. Ollama


@pytest.mark.parametrize("chat", [False, True], ids=["generate", "chat"])
async def test_ollama_native_adapter_end_to_end(make: Make, fake: FakeLLMServer, chat: bool) -> None:
    specs = [
        BackendSpec(name="Vllm", base_url=fake.base_url, model=MODELS["Vllm"]),
        BackendSpec(name="Ollama", kind="ollama", base_url=fake.base_url, model=MODELS["Ollama"]),
    ]
    fake.set_fault(MODELS["Vllm"], "cut:5")
    co = make(("Vllm", "Ollama"), specs=specs)
    prompt: Any = MESSAGES if chat else PROMPT
    base = render_messages(MESSAGES) if chat else PROMPT
    request_id = rid()

    assert await collect(co.stream(request_id, prompt)) == full_answer_text(base)

    (ollama,) = to_model(fake, "Ollama")
    committed = prefix_of(full_answer(base), 5)
    if chat:
        assert ollama["path"] == "/api/chat"
        assert ollama["messages"][-1] == {"role": "assistant", "content": committed}
    else:
        assert ollama["path"] == "/api/generate"
        assert ollama["prompt"] == PROMPT + committed and ollama["body"]["raw"] is True
    attempts = await attempts_of(co, request_id)
    assert summary(attempts) == [("Vllm", "BackendError"), ("Ollama", "Success")]
    assert attempts[1].model == MODELS["Ollama"]
    assert attempts[1].usage is not None and attempts[1].usage["completion_tokens"] == len(full_answer(base)) - 5
    # and as the primary, from the start
    fresh = rid()
    assert await collect(co.stream(fresh, prompt, primary="Ollama")) == full_answer_text(base)
    assert summary(await attempts_of(co, fresh)) == [("Ollama", "Success")]


# ---------------------------------------------------------------------- 14. accounting


async def test_accounting_of_attempts_and_outcome(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "cut:10")
    co = make()
    request_id = rid()
    n = len(full_answer(PROMPT))

    outcome = await co.run(request_id, PROMPT)

    attempts = await attempts_of(co, request_id)
    cut, done = attempts
    assert (cut.backend, cut.model, cut.tokens, cut.usage) == (ServingBackend.Vllm, MODELS["Vllm"], 10, None)
    assert cut.worker_id == co.worker_id and cut.result is not None and cut.result.is_failure()
    assert (done.backend, done.model, done.tokens) == (ServingBackend.Together, MODELS["Together"], n - 10)
    assert done.result == FailoverResult.Success
    assert done.usage is not None and done.usage["completion_tokens"] == n - 10
    assert done.usage["total_tokens"] == done.usage["prompt_tokens"] + n - 10
    assert cut.started_at <= done.started_at
    assert outcome is not None and outcome.state == "Completed"
    assert (outcome.backend, outcome.model) == ("Together", MODELS["Together"])
    assert outcome.token_count == len(ANSWER.split())
    stats = await co.manager.stats()
    assert stats.total_attempts == 2 and stats.successful == 1


# --------------------------------------------------------------------------- 15. follow


async def test_follow_mid_stream_with_an_offset_and_two_concurrent_followers(make: Make, fake: FakeLLMServer) -> None:
    prompt = next(p for p in (f"prompt {i}" for i in range(1000)) if any(ord(c) > 127 for c in full_answer_text(p)))
    answer = full_answer_text(prompt)
    fake.set_token_delay(0.02)  # ~1 s per answer
    co = make()
    request_id = rid()
    producer = asyncio.create_task(co.run(request_id, prompt))

    async def committed() -> int:
        ctx = await co.manager.get_context(request_id)
        return 0 if ctx is None else len(ctx.generated_prefix)

    await eventually(lambda: committed_at_least(committed, 40), what="40 chars committed")
    offset = 37  # a character offset; the answer has multi-byte characters past it
    followers = [asyncio.create_task(collect(co.follow(request_id, offset))) for _ in range(2)]
    whole = asyncio.create_task(collect(co.follow(request_id)))
    texts = await asyncio.wait_for(asyncio.gather(*followers, whole), 10)
    await producer

    assert texts[0] == texts[1] == answer[offset:]
    assert texts[2] == answer


async def committed_at_least(probe: Callable[[], Awaitable[int]], n: int) -> bool:
    return await probe() >= n


async def test_follow_unknown_request_and_replay_after_completion(make: Make, fake: FakeLLMServer) -> None:
    co = make()
    with pytest.raises(UnknownRequestError):
        await collect(co.follow("never-tracked"))
    request_id = rid()
    await co.run(request_id, PROMPT)
    assert await collect(co.follow(request_id)) == ANSWER
    assert await collect(co.follow(request_id, offset=len(ANSWER) - 3)) == ANSWER[-3:]
    assert await collect(co.follow(request_id, offset=len(ANSWER) + 10)) == ""


async def test_chunk_logs_expire_after_completion(make: Make, fake: FakeLLMServer) -> None:
    fake.set_token_delay(0.02)
    co = make(retention=1.0)
    request_id = rid()
    keys = co.manager.core.keys.request(request_id)
    redis = co.manager.redis
    producer = asyncio.create_task(co.run(request_id, PROMPT))
    follower = asyncio.create_task(collect(co.follow(request_id, wait=5.0)))  # creates the feed key
    await eventually(lambda: exists_all(redis, keys.feed), what="a live follower's feed")
    await producer
    assert await follower == ANSWER

    for key in (keys.text, keys.result, keys.feed):
        ttl = await redis.pttl(key)
        assert 0 < ttl <= 1000, f"{key} has TTL {ttl} ms"
    assert await redis.exists(keys.ctx) == 0
    await eventually(lambda: exists_none(redis, keys.text, keys.result, keys.feed), timeout=5.0, what="keys to expire")
    with pytest.raises(UnknownRequestError):
        await collect(co.follow(request_id))


async def exists_none(redis: Any, *keys: str) -> bool:
    return await redis.exists(*keys) == 0


async def exists_all(redis: Any, *keys: str) -> bool:
    return await redis.exists(*keys) == len(keys)


async def test_replaying_a_finished_request_leaves_no_key_without_expiry(make: Make, fake: FakeLLMServer) -> None:
    co = make(retention=5.0)
    request_id = rid()
    await co.run(request_id, PROMPT)
    assert await collect(co.follow(request_id)) == ANSWER  # the first follower: after completion
    keys = co.manager.core.keys.request(request_id)
    assert 0 < await co.manager.redis.pttl(keys.feed) <= 5000


# ----------------------------------------------------------------------- 16. cancellation


async def test_caller_that_stops_early_ends_the_request_and_closes_the_backend(make: Make, fake: FakeLLMServer) -> None:
    fake.set_token_delay(0.05)
    co = make()
    request_id = rid()
    stream = co.stream(request_id, PROMPT)
    got = [await anext(stream) for _ in range(3)]
    follower = asyncio.create_task(collect(co.follow(request_id)))
    await asyncio.sleep(0.1)

    await stream.aclose()

    # the request ended at once: aclose returned only after the outcome was written
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Failed" and outcome.error_kind == "Cancelled"
    assert "cancelled" in (outcome.error or "")
    assert co.manager.held() == []
    with pytest.raises(RequestFailedError, match="cancelled"):
        await asyncio.wait_for(follower, 5.0)
    # the backend's stream was closed, not drained
    await eventually(lambda: to_model(fake, "Vllm")[0]["outcome"] == "client_disconnected", what="hang-up")
    assert to_model(fake, "Vllm")[0]["tokens_sent"] < len(full_answer(PROMPT))
    assert ANSWER.startswith("".join(got))
    assert to_model(fake, "Together") == []


async def test_cancelling_the_consumer_task_ends_the_request(make: Make, fake: FakeLLMServer) -> None:
    fake.set_token_delay(0.05)
    co = make()
    request_id = rid()
    seen: list[str] = []

    async def consume() -> None:
        async for chunk in co.stream(request_id, PROMPT):
            seen.append(chunk)

    task = asyncio.create_task(consume())
    await eventually(lambda: len(seen) >= 3, what="three chunks")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Failed" and outcome.error_kind == "Cancelled"
    await eventually(lambda: to_model(fake, "Vllm")[0]["outcome"] == "client_disconnected", what="hang-up")


async def test_caller_that_breaks_out_of_the_loop_ends_the_request(make: Make, fake: FakeLLMServer) -> None:
    fake.set_token_delay(0.05)
    co = make()
    request_id = rid()
    async for chunk in co.stream(request_id, PROMPT):
        assert ANSWER.startswith(chunk)
        break  # no aclose(): the generator is finalised by the event loop

    async def failed() -> bool:
        outcome = await co.outcome(request_id)
        return outcome is not None and outcome.state == "Failed" and outcome.error_kind == "Cancelled"

    await eventually(failed, what="the request to end")
    await eventually(lambda: to_model(fake, "Vllm")[0]["outcome"] == "client_disconnected", what="hang-up")


# ------------------------------------------------------------------- the reference worker


async def test_worker_retakes_a_submission_whose_taker_died_and_skips_duplicates(
    make: Make, fake: FakeLLMServer
) -> None:
    co = make(lease_ttl=0.5)
    core, shell = co.manager.core, co.manager.shell
    await shell.run(queue.ensure_group(core), "queue")
    request_id = rid()
    for _ in range(2):  # submitted twice: run once
        await shell.run(queue.submit(core, queue.Submission(request_id=request_id, prompt=PROMPT)), "queue")
    # a worker takes both entries and dies before tracking or acknowledging them
    ghost = FailoverCore(None, namespace=core.keys.namespace, worker_id="ghost", lease_ttl=0.5)
    taken = await shell.run(queue.take(ghost, 10, 10), "queue")
    assert [s.request_id for _, s in taken if s is not None] == [request_id] * 2

    worker = Worker(co, block=0.1)
    running = asyncio.create_task(worker.run())
    try:
        text = await asyncio.wait_for(collect(co.follow(request_id, wait=10.0)), 15)
        await eventually(lambda: nothing_pending(co), what="both entries acknowledged")
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 10)

    assert text == ANSWER
    assert len(to_model(fake, "Vllm")) == 1
    outcome = await co.outcome(request_id)
    assert outcome is not None and outcome.state == "Completed" and outcome.owner == co.worker_id


async def nothing_pending(co: Coordinator) -> bool:
    info = await co.manager.redis.xpending(co.manager.core.keys.queue, queue.GROUP)
    return int(info["pending"]) == 0


# --------------------------------------------------------------- takeover within one process


async def test_resume_finishes_a_request_another_coordinator_abandoned(make: Make, fake: FakeLLMServer) -> None:
    fake.set_token_delay(0.02)
    dying = make(lease_ttl=0.5, worker_id="dying")
    taker = make(lease_ttl=0.5, worker_id="taker")
    request_id = rid()
    stream = dying.stream(request_id, PROMPT)
    first = [await anext(stream) for _ in range(5)]
    # the worker "freezes": no heartbeats, its stream is never resumed
    await asyncio.sleep(0.7)
    (ctx,) = await taker.manager.claim_orphans()
    assert ctx.generated_prefix == "".join(first)
    await taker.resume(ctx)

    assert await collect(taker.follow(request_id)) == ANSWER
    outcome = await taker.outcome(request_id)
    assert outcome is not None and outcome.state == "Completed" and outcome.owner == "taker"
    history = await taker.manager.history()
    assert any(isinstance(e, Takeover) and e.old_owner == "dying" for e in history)
    (resumed,) = [r for r in to_model(fake, "Vllm") if r["prompt"] != PROMPT]
    assert resumed["prompt"] == PROMPT + "".join(first)
    # the frozen stream wakes up: its next commit is fenced out; it delivers the taker's text instead
    rest = await collect(stream)
    assert "".join(first) + rest == ANSWER


async def test_a_retried_5xx_does_not_mark_the_backend_failed_for_a_takeover(make: Make, fake: FakeLLMServer) -> None:
    fake.set_fault(MODELS["Vllm"], "http5xx:1")
    fake.set_token_delay(0.02)
    dying = make(lease_ttl=0.5, worker_id="dying")
    taker = make(lease_ttl=0.5, worker_id="taker")
    request_id = rid()
    stream = dying.stream(request_id, PROMPT)
    try:
        [await anext(stream) for _ in range(5)]
        await asyncio.sleep(0.7)
        (ctx,) = await taker.manager.claim_orphans()
        assert ctx.failed_backends == []  # Vllm is serving this request fine
    finally:
        await stream.aclose()


async def test_chunks_arriving_during_a_slow_commit_are_committed_together(
    make: Make, fake: FakeLLMServer, redis_server: Any
) -> None:
    fake.set_token_delay(0.005)
    co = make()
    request_id = rid()
    chunks: list[str] = []
    paused = False
    async for chunk in co.stream(request_id, PROMPT):
        chunks.append(chunk)
        if not paused:  # Redis stalls for a moment: the backend keeps streaming meanwhile
            paused = True
            await co.manager.redis.execute_command("CLIENT", "PAUSE", 300, "WRITE")
    assert "".join(chunks) == ANSWER
    assert len(chunks) < len(full_answer(PROMPT)) / 2  # coalesced: far fewer commits than tokens
    attempts = await attempts_of(co, request_id)
    assert attempts[-1].tokens == len(full_answer(PROMPT))  # accounting still counts every token
