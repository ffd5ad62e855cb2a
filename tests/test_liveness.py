"""Issue 11 and 16, liveness: every request ends or is taken over, never stays owned.

Real redis-server processes, the fake LLM over real HTTP. Each fault (pool exhausted,
Redis paused past the operation deadline, a missing api key, an oversized commit in
test_endings.py) ends the request with its typed error or leaves it to another replica.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from flo_coord import (
    BackendSpec,
    Coordinator,
    CoordinatorUnavailableError,
    ExecutorConfig,
    FailoverConfig,
    GenerationError,
    RequestFailedError,
    RetryPolicy,
    ServingBackend,
)
from flo_coord.testing.fakellm import FakeLLMServer, full_answer_text

PROMPT = "Does every request end?"
FAST = ExecutorConfig(first_token_timeout=2.0, stall_timeout=2.0, backoff_initial=0.05, backoff_max=0.1)
DEADLINE = 0.5  # the Redis operation deadline of these tests (seconds)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


def coordinator(url: str, namespace: str, specs: list[BackendSpec], **options: Any) -> Coordinator:
    order = [ServingBackend(s.name) for s in specs]
    return Coordinator(
        specs,
        url=url,
        namespace=namespace,
        config=FailoverConfig(fallback_order=order, max_retries=3),
        executor=FAST,
        retry=RetryPolicy(deadline=DEADLINE, initial=0.05, maximum=0.1),
        **options,
    )


async def read(stream: Any) -> str:
    return "".join([chunk async for chunk in stream])


async def test_pool_exhausted_is_a_local_fault_that_fails_over(redis_server: Any, fake: FakeLLMServer) -> None:
    fake.set_token_delay(0.03, "slow")  # each slow stream holds its one connection for ~1.5 s
    specs = [
        BackendSpec(name="Vllm", base_url=fake.base_url, model="slow", max_connections=1, connect_timeout=0.2),
        BackendSpec(name="Together", base_url=fake.base_url, model="spare"),
    ]
    co = coordinator(redis_server.url, f"p{uuid.uuid4().hex[:8]}", specs)
    try:
        ids = [f"pool-{i}" for i in range(5)]
        texts = await asyncio.gather(*(read(co.stream(r, f"{PROMPT} {r}")) for r in ids))
        assert texts == [full_answer_text(f"{PROMPT} {r}") for r in ids]
        history = await co.manager.history()
        assert sum("local capacity" in str(getattr(a, "result", "")) for a in history) == 4
        # four pool timeouts, more than the breaker threshold (3): it stays closed for everyone
        assert await co.breaker.allow("Vllm") == "CLOSED"
        assert co.manager.held() == []
    finally:
        await co.aclose()


async def test_pool_exhausted_on_the_only_backend_ends_the_request(redis_server: Any, fake: FakeLLMServer) -> None:
    fake.set_token_delay(0.03, "slow")
    spec = BackendSpec(name="Vllm", base_url=fake.base_url, model="slow", max_connections=1, connect_timeout=0.2)
    co = coordinator(redis_server.url, f"q{uuid.uuid4().hex[:8]}", [spec])
    try:
        first = asyncio.create_task(read(co.stream("holder", PROMPT)))
        await asyncio.sleep(0.2)
        follower = asyncio.create_task(read(co.follow("starved", wait=5.0)))
        with pytest.raises(GenerationError, match="local capacity"):
            await read(co.stream("starved", PROMPT + "!"))
        failed_at = time.monotonic()
        with pytest.raises(RequestFailedError, match="local capacity"):
            await follower
        assert time.monotonic() - failed_at < DEADLINE + 1.0
        outcome = await co.outcome("starved")
        assert outcome is not None and outcome.state == "Failed"
        assert "starved" not in co.manager.held()  # no lease renewed for it
        assert await first == full_answer_text(PROMPT)
    finally:
        await co.aclose()


async def test_redis_paused_past_the_deadline_lets_another_replica_take_over(
    fresh_redis_server: Any, fake: FakeLLMServer
) -> None:
    fake.set_token_delay(0.05)
    namespace = f"r{uuid.uuid4().hex[:8]}"
    spec = BackendSpec(name="Vllm", base_url=fake.base_url, model="fake")
    first = coordinator(fresh_redis_server.url, namespace, [spec], lease_ttl=1.0, worker_id="first")
    second = coordinator(fresh_redis_server.url, namespace, [spec], lease_ttl=1.0, worker_id="second")
    await first.start(reap=False)
    try:
        received: list[str] = []
        pauses = []
        with pytest.raises((GenerationError, CoordinatorUnavailableError)):
            async for chunk in first.stream("paused", PROMPT):
                received.append(chunk)
                if len(received) == 5:
                    # longer than the deadline: the write and the fail both fail
                    pauses.append(fresh_redis_server.pause(2.0))
        assert "paused" not in first.manager.held()  # it stopped renewing the lease
        await asyncio.to_thread(pauses[0].join)  # Redis is back
        await second.start(reap=True, reap_interval=0.1)
        text = await asyncio.wait_for(read(second.follow("paused", wait=5.0)), 15.0)
        assert text == full_answer_text(PROMPT)
        outcome = await second.outcome("paused")
        assert outcome is not None and outcome.state == "Completed" and outcome.owner == "second"
    finally:
        await first.aclose()
        await second.aclose()


async def test_500_concurrent_streams_through_one_coordinator_all_exact(redis_server: Any) -> None:
    # each stream lasts ~1.2 s, longer than the 1 s pool wait: a 100-connection pool fails 400 of them
    async with FakeLLMServer(n_tokens=12, token_delay=0.1) as server:
        spec = BackendSpec(name="Vllm", base_url=server.base_url, model="fake", connect_timeout=1.0)
        co = coordinator(redis_server.url, f"c{uuid.uuid4().hex[:8]}", [spec], concurrency=500)
        co.manager.shell.policy = RetryPolicy()  # the default deadline: 500 streams load this machine
        try:
            prompts = [f"stream {i}" for i in range(500)]
            texts = await asyncio.wait_for(
                asyncio.gather(*(read(co.stream(f"c-{i}", p)) for i, p in enumerate(prompts))), 120.0
            )
            assert texts == [full_answer_text(p, 12) for p in prompts]
            assert len(server.requests) == 500  # each on its first attempt: no pool timeout, no failover
            assert await co.breaker.allow("Vllm") == "CLOSED"
        finally:
            await co.aclose()


async def test_a_url_that_does_not_resolve_fails_that_backend_only(redis_server: Any, fake: FakeLLMServer) -> None:
    specs = [
        BackendSpec(name="Vllm", base_url="http://no-such-host.invalid:8000", model="m", connect_timeout=2.0),
        BackendSpec(name="Together", base_url=fake.base_url, model="fake"),
    ]
    co = coordinator(redis_server.url, f"u{uuid.uuid4().hex[:8]}", specs)
    try:
        assert await read(co.stream("unresolved", PROMPT)) == full_answer_text(PROMPT)
        (attempt, done) = [a for a in await co.manager.history() if getattr(a, "request_id", None) == "unresolved"]
        assert attempt.backend == ServingBackend.Vllm and "connection failed" in str(attempt.result)
        assert done.backend == ServingBackend.Together
    finally:
        await co.aclose()


async def test_a_failed_request_reads_as_one_sentence_to_its_follower(redis_server: Any, fake: FakeLLMServer) -> None:
    fake.set_fault("*", "cut:3")
    spec = BackendSpec(name="Vllm", base_url=fake.base_url, model="fake")
    co = coordinator(redis_server.url, f"o{uuid.uuid4().hex[:8]}", [spec])
    try:
        with pytest.raises(GenerationError) as caught:
            await read(co.stream("cut-all", PROMPT))
        with pytest.raises(RequestFailedError) as followed:
            await read(co.follow("cut-all"))
        for message in (str(caught.value), str(followed.value)):
            assert message.count("failed:") == 1, message
    finally:
        await co.aclose()


class _BuggyBackend:
    """A backend adapter with a bug: one chunk, then an exception no adapter should raise."""

    def __init__(self) -> None:
        self.spec = BackendSpec(name="Vllm", base_url="http://127.0.0.1:9", model="buggy")

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        from flo_coord.execution.backends import TextChunk

        yield TextChunk("<|answer|>")
        raise ZeroDivisionError("a bug in an adapter")

    async def aclose(self) -> None:
        return None


async def test_a_bug_while_generating_ends_the_request(redis_server: Any) -> None:
    co = Coordinator(
        {"Vllm": _BuggyBackend()},  # type: ignore[dict-item]
        url=redis_server.url,
        namespace=f"g{uuid.uuid4().hex[:8]}",
        config=FailoverConfig(fallback_order=[ServingBackend.Vllm]),
        executor=FAST,
    )
    try:
        follower = asyncio.create_task(read(co.follow("buggy", wait=5.0)))
        with pytest.raises(GenerationError, match="ZeroDivisionError: a bug in an adapter"):
            await read(co.stream("buggy", PROMPT))
        failed_at = time.monotonic()
        with pytest.raises(RequestFailedError, match="ZeroDivisionError"):
            await follower
        assert time.monotonic() - failed_at < DEADLINE + 1.0
        outcome = await co.outcome("buggy")
        assert outcome is not None and outcome.state == "Failed" and "buggy" not in co.manager.held()
    finally:
        await co.aclose()
