"""Cancellation and corrupt shared state: follow() stops when cancelled; a corrupt breaker is reset.

- N ``follow()`` iterators over live requests, each cancelled at a random moment: none is
  left running (every task is done right after its cancellation is delivered), and
  ``asyncio.wait_for`` around a follow returns at its timeout.
- A breaker hash holding foreign data is reset to closed and logged, so the requests that
  need the backend are served instead of being held forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from typing import Any

import pytest
import redis.asyncio as aredis

from flo_coord import AsyncFailoverManager, FailoverConfig, RetryPolicy, ServingBackend
from flo_coord.execution.backends import BackendSpec
from flo_coord.execution.breaker import BreakerConfig, CircuitBreaker
from flo_coord.execution.coordinator import Coordinator
from flo_coord.execution.delivery import follow
from flo_coord.testing.fakellm import FakeLLMServer, full_answer_text

pytestmark = pytest.mark.timeout(120)

FOLLOWERS = 200


async def _drain(manager: AsyncFailoverManager, rid: str, seen: list[int]) -> None:
    async for chunk in follow(manager, rid, poll=0.05, wait=5):
        seen.append(len(chunk))


async def test_followers_cancelled_at_random_moments_all_stop(fresh_redis_server: Any) -> None:
    rng = random.Random(16)
    namespace = f"cx{uuid.uuid4().hex[:8]}"
    url = fresh_redis_server.url
    quick = RetryPolicy(deadline=1.0)
    producer = AsyncFailoverManager(url=url, namespace=namespace, worker_id="producer", retry=quick)
    reader = AsyncFailoverManager(url=url, namespace=namespace, retry=quick)
    async with producer, reader:
        rids = [f"r{i}" for i in range(20)]
        for rid in rids:
            await producer.start_tracking(rid, "prompt")
        stop = asyncio.Event()

        async def produce() -> None:  # commits keep landing while the followers are cancelled
            n = 0
            while not stop.is_set():
                await producer.append_tokens(rids[n % len(rids)], f"t{n} ")
                n += 1
                await asyncio.sleep(0.002)

        writer = asyncio.create_task(produce())
        seen: list[int] = []
        tasks = [asyncio.create_task(_drain(reader, rids[i % len(rids)], seen)) for i in range(FOLLOWERS)]
        for task in tasks:
            asyncio.get_running_loop().call_later(rng.uniform(0.0, 1.5), task.cancel)
        done, pending = await asyncio.wait(tasks, timeout=10)
        stop.set()
        await writer
        if pending:  # iterators that ignore cancel(): stop Redis so they end (with errors) and the test can fail
            fresh_redis_server.stop()
            await asyncio.wait(pending, timeout=10)
        assert not pending, f"{len(pending)} of {FOLLOWERS} follow() iterators kept running after cancel()"
        assert all(t.cancelled() for t in done), [t.exception() for t in done if not t.cancelled()][:3]
        assert seen  # they were really following live text when cancelled
        # and wait_for around a follow of a request that never ends returns at its timeout
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(_drain(reader, rids[0], []), 0.3)
        assert asyncio.get_running_loop().time() - started < 2


async def test_a_corrupt_breaker_hash_is_reset_and_the_request_served(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = f"cb{uuid.uuid4().hex[:8]}"
    prompt = "Is a corrupt breaker trusted?"
    async with FakeLLMServer() as fake:
        coordinator = Coordinator(
            [BackendSpec(name="Vllm", base_url=fake.base_url, model="m")],
            url=redis_server.url,
            namespace=namespace,
            config=FailoverConfig(fallback_order=[ServingBackend.Vllm], max_retries=1),
            breaker=BreakerConfig(threshold=1, cooldown=60),
        )
        try:
            raw = coordinator.manager.redis
            key = f"{namespace}:breaker:Vllm"
            await raw.hset(key, mapping={"state": "open", "open_until": "not-a-number"})
            with caplog.at_level(logging.WARNING, logger="flo_coord.breaker"):
                text = "".join([c async for c in coordinator.stream("cb-1", prompt)])
            assert text == full_answer_text(prompt)
            assert any("reset to closed" in r.getMessage() for r in caplog.records)
            # a breaker key of the wrong type is reset too
            await raw.delete(key)
            await raw.set(key, "foreign")
            breaker = CircuitBreaker(coordinator.manager.breakers, "w", BreakerConfig())
            assert await breaker.allow("Vllm") == "CLOSED"
            assert await raw.type(key) in (b"none", b"hash", "none", "hash")
        finally:
            await coordinator.aclose()


@pytest.mark.parametrize("call", ["get_context", "history"])  # a script (kept connection); a plain command (pool)
async def test_a_cancellation_landing_while_redis_answers_is_never_lost(redis_server: Any, call: str) -> None:
    """A store call cancelled at any loop turn of its round trip raises CancelledError.

    redis.asyncio sends through ``asyncio.wait_for`` (a socket timeout is set); on Python
    3.11 ``wait_for`` returns the reply of a send that finished although its caller was
    cancelled meanwhile, and the cancellation is lost. A gateway draining on SIGTERM then
    saw its generations run to the end instead of handing them back. Sweep the turn at
    which the cancel lands: no call may return normally once cancelled.
    """
    client = aredis.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=5.0)
    manager = AsyncFailoverManager(redis=client, namespace=f"cx{uuid.uuid4().hex[:8]}")
    absorbed: list[int] = []
    try:
        operation = manager.get_context if call == "get_context" else manager.history
        args = ("r1",) if call == "get_context" else (5,)
        await operation(*args)  # connected, scripts loaded: the turns below are one round trip's
        for turns in range(16):
            task = asyncio.ensure_future(operation(*args))
            for _ in range(turns):
                await asyncio.sleep(0)
            if task.done():
                break
            task.cancel()
            try:
                await task
                absorbed.append(turns)
            except asyncio.CancelledError:
                pass
    finally:
        await manager.aclose()
    assert absorbed == [], f"cancellations lost at loop turns {absorbed}"
