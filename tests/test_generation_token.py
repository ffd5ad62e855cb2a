"""Issue 10: fencing holds per generation, not per worker, and intake is fenced.

- A worker whose lease expired (as in a Redis outage) re-claims its OWN request while its
  first generation still streams: the older generation can no longer write (its writes are
  fenced on the epoch it started under), so the answer is exact, byte for byte.
- A late queue delivery of a request another worker already finished is acknowledged and
  dropped by the start script: the finished answer is untouched and generated once.

Real redis-server, real HTTP against the fake LLM server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from flo_coord import FailoverConfig, LeaseLostError, ServingBackend
from flo_coord.execution.backends import BackendSpec
from flo_coord.execution.coordinator import Coordinator, ExecutorConfig
from flo_coord.execution.worker import Worker
from flo_coord.store.queue import Submission, ensure_group, submit
from flo_coord.testing.fakellm import FakeLLMServer, full_answer_text

PROMPT = "Explain why a generation needs its own fencing token."
ANSWER = full_answer_text(PROMPT)
TOKEN_DELAY = 0.03  # 48 tokens: ~1.5 s per answer


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(token_delay=TOKEN_DELAY) as server:
        yield server


@pytest_asyncio.fixture
async def make(redis_server: Any, fake: FakeLLMServer) -> AsyncIterator[Any]:
    namespace = f"g{uuid.uuid4().hex[:10]}"
    built: list[Coordinator] = []

    def build(worker_id: str, lease_ttl: float = 0.4) -> Coordinator:
        coordinator = Coordinator(
            [BackendSpec(name="Vllm", base_url=fake.base_url, model="vllm-m")],
            url=redis_server.url,
            config=FailoverConfig(fallback_order=[ServingBackend.Vllm]),
            namespace=namespace,
            worker_id=worker_id,
            lease_ttl=lease_ttl,
            executor=ExecutorConfig(first_token_timeout=5.0, stall_timeout=5.0),
        )
        built.append(coordinator)
        return coordinator

    yield build
    for coordinator in built:
        await coordinator.aclose()


async def committed_text(co: Coordinator, rid: str) -> str:
    raw = await co.manager.redis.get(co.manager.core.keys.request(rid).text)
    return (raw or b"").decode()


async def wait_for_text(co: Coordinator, rid: str, chars: int) -> None:
    async with asyncio.timeout(10):
        while len(await committed_text(co, rid)) < chars:
            await asyncio.sleep(0.01)


async def lose_and_reclaim(co: Coordinator, rid: str) -> Any:
    """Let this worker's own lease lapse (no heartbeats run) and claim the request again."""
    async with asyncio.timeout(10):
        while True:
            ctx = await co.manager.claim(rid)
            if ctx is not None:
                return ctx
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("how", ["two tasks", "resume_in_background"])
async def test_a_worker_reclaiming_its_own_request_mid_stream_keeps_the_answer_exact(
    make: Any, fake: FakeLLMServer, how: str
) -> None:
    co = make("w1")  # not started: no heartbeats, so the lease lapses as in an outage
    rid = f"req-{uuid.uuid4().hex[:8]}"
    first = await co.manager.start_tracking(rid, PROMPT)
    follower = asyncio.create_task(_collect(co.follow(rid, wait=5.0)))
    # "two tasks": both generations run unsupervised, so only the fence can stop the first
    older = asyncio.create_task(co.resume(first)) if how == "two tasks" else co.resume_in_background(first)
    await wait_for_text(co, rid, len(ANSWER) // 4)
    second = await lose_and_reclaim(co, rid)
    assert (second.owner, second.epoch) == ("w1", first.epoch + 1)
    with pytest.raises(LeaseLostError):  # the first generation's token no longer writes
        await co.manager.append_tokens(rid, "stale", epoch=first.epoch)
    newer = asyncio.create_task(co.resume(second)) if how == "two tasks" else co.resume_in_background(second)
    async with asyncio.timeout(20):
        await asyncio.gather(older, newer, return_exceptions=True)
        text = await follower
    outcome = await co.outcome(rid)
    assert outcome is not None and outcome.state == "Completed" and outcome.epoch == second.epoch
    assert await committed_text(co, rid) == ANSWER  # byte for byte: no interleaving
    assert text == ANSWER


async def _collect(stream: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in stream])


async def test_a_late_queue_delivery_never_touches_a_finished_request(make: Any, fake: FakeLLMServer) -> None:
    late, other = make("late"), make("other", lease_ttl=5.0)
    core, shell = late.manager.core, late.manager.shell
    await shell.run(ensure_group(core), "queue")
    rid = f"req-{uuid.uuid4().hex[:8]}"
    taken, resume = asyncio.Event(), asyncio.Event()

    async def pause(entry_id: str, submission: Submission) -> None:
        taken.set()  # the entry is taken, checked and about to be started...
        await resume.wait()  # ...and this worker freezes here

    worker = Worker(late, block=0.05, before_start=pause)
    running = asyncio.create_task(worker.run())
    try:
        await shell.run(submit(core, Submission(request_id=rid, prompt=PROMPT)), "submit")
        await asyncio.wait_for(taken.wait(), 10)
        finished = await other.run(rid, PROMPT)  # meanwhile another worker runs it to the end
        assert finished is not None and finished.state == "Completed"
        resume.set()
        async with asyncio.timeout(10):
            while int((await late.manager.redis.xpending(core.keys.queue, "workers"))["pending"]):
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a wrongly started generation would have begun by now
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 10)
    outcome = await late.outcome(rid)
    assert outcome is not None
    assert (outcome.state, outcome.owner, outcome.epoch) == ("Completed", "other", finished.epoch)
    assert await committed_text(late, rid) == ANSWER
    assert len(fake.requests) == 1  # generated once
    assert await late.manager.get_context(rid) is None  # not restarted
