"""Issue 10: a fleet of real worker processes rides out Redis being killed and restarted.

Redis (AOF, ``appendfsync always``) is SIGKILLed under 3 worker processes
(``tests/worker_main.py``) streaming 50 answers, each followed by a client that reconnects
at its offset whenever a read fails, and restarted on the same port 2 s or 15 s later.
Every answer must complete byte for byte equal to the fake LLM server's full answer, every
follower's text must equal it, every worker must still run, and 5 requests submitted after
the restart must be served. Also: SIGTERM of a worker with Redis gone exits within its
grace period plus the documented hand-back timeout, naming the requests it could not hand
back.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import require_redis_server
from test_executor_processes import Workers

from flo_coord import AsyncFailoverManager, FloCoordError, RetryPolicy, defaults
from flo_coord.execution.delivery import follow
from flo_coord.store.queue import Submission, submit
from flo_coord.testing.embedded import RedisServer
from flo_coord.testing.fakellm import FakeLLMServerThread, full_answer_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TOKEN_DELAY = 0.05  # 48 tokens: ~2.4 s per answer
LEASE = 1.0


def prompt(i: int) -> str:
    return f"Question {i}: what happens to a stream when Redis restarts?"


@pytest.fixture
def fake() -> Iterator[FakeLLMServerThread]:
    with FakeLLMServerThread(token_delay=TOKEN_DELAY) as server:
        yield server


@pytest.fixture
def redis_aof() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer(appendonly=True) as server:
        yield server


@pytest_asyncio.fixture
async def fleet(
    redis_aof: RedisServer, fake: FakeLLMServerThread, tmp_path: Path
) -> AsyncIterator[tuple[Workers, AsyncFailoverManager]]:
    namespace = f"o{uuid.uuid4().hex[:10]}"
    workers = Workers(redis_aof.url, namespace, fake.base_url, tmp_path)
    # the client's calls give up after 2 s; its followers reconnect until the answer is whole
    client = AsyncFailoverManager(
        url=redis_aof.url, namespace=namespace, worker_id="client", retry=RetryPolicy(deadline=2.0)
    )
    try:
        yield workers, client
    finally:
        await workers.close()
        await client.aclose()
        for worker_id in workers.procs:  # shown by pytest when the test failed
            print(f"---- {worker_id} ----\n{workers.log(worker_id)}")


async def submit_patiently(client: AsyncFailoverManager, rid: str, text: str) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                op = submit(client.core, Submission(request_id=rid, prompt=text))
                await client.shell.run(op, "submit", rid)
                return
            except FloCoordError:
                await asyncio.sleep(0.2)


async def reconnecting_follower(client: AsyncFailoverManager, rid: str, stats: dict[str, int]) -> str:
    """Follow ``rid`` to its end, reconnecting at the offset received so far after any error."""
    received = ""
    while True:
        try:
            async for chunk in follow(client, rid, len(received), wait=30.0):
                received += chunk
            return received
        except FloCoordError:
            stats["reconnects"] += 1
            await asyncio.sleep(0.1)


async def run_outage(
    workers: Workers, client: AsyncFailoverManager, server: RedisServer, fake: Any, down: float
) -> None:
    for i in range(3):
        await workers.spawn(f"w{i}", lease_ttl=LEASE, grace=2.0, block=0.2)
    await workers.wait_ready()
    stats = {"reconnects": 0}
    rids = [f"req-{i:02d}" for i in range(50)]
    for i, rid in enumerate(rids):
        await submit_patiently(client, rid, prompt(i))
    followers = [asyncio.create_task(reconnecting_follower(client, rid, stats)) for rid in rids]
    async with asyncio.timeout(15):  # every answer is streaming
        while sum(1 for r in fake.requests if r.get("model") == "vllm-m") < 50:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(server.kill)  # SIGKILL: only the AOF survives
    await asyncio.sleep(down)
    await asyncio.to_thread(server.restart)
    async with asyncio.timeout(90):
        texts = await asyncio.gather(*followers)
    late = [f"late-{i}" for i in range(5)]
    for i, rid in enumerate(late):
        await submit_patiently(client, rid, prompt(100 + i))
    async with asyncio.timeout(30):
        late_texts = await asyncio.gather(*(reconnecting_follower(client, rid, stats) for rid in late))

    exact = sum(1 for i, text in enumerate(texts) if text == full_answer_text(prompt(i)))
    exact += sum(1 for i, text in enumerate(late_texts) if text == full_answer_text(prompt(100 + i)))
    stored = 0
    for i, rid in enumerate(rids + late):
        outcome = await client.outcome(rid)
        raw = await client.redis.get(client.core.keys.request(rid).text)
        want = full_answer_text(prompt(i if i < 50 else 100 + i - 50))
        stored += outcome is not None and outcome.state == "Completed" and raw == want.encode()
    alive = sum(1 for proc in workers.procs.values() if proc.returncode is None)
    print(f"Redis down {down}s: {exact}/55 followed answers exact, {stored}/55 stored answers exact, "
          f"{alive}/3 workers alive, {stats['reconnects']} follower reconnects")  # fmt: skip
    assert exact == 55
    assert stored == 55
    assert alive == 3


@pytest.mark.parametrize("down", [2.0, 15.0])
async def test_the_fleet_rides_out_a_redis_restart(
    fleet: tuple[Workers, AsyncFailoverManager], redis_aof: RedisServer, fake: FakeLLMServerThread, down: float
) -> None:
    workers, client = fleet
    await run_outage(workers, client, redis_aof, fake, down)


async def test_sigterm_with_redis_gone_exits_within_grace_and_names_what_it_kept(
    fleet: tuple[Workers, AsyncFailoverManager], redis_aof: RedisServer, fake: FakeLLMServerThread
) -> None:
    workers, client = fleet
    grace = 1.0
    await workers.spawn("w0", lease_ttl=5.0, grace=grace, block=0.2)
    await workers.wait_ready()
    for i in range(5):
        await submit_patiently(client, f"req-{i}", prompt(i))
    async with asyncio.timeout(15):
        while len(fake.requests) < 5:
            await asyncio.sleep(0.05)
    await asyncio.to_thread(redis_aof.kill)
    await asyncio.sleep(0.5)
    proc = workers.procs["w0"]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 60)
    elapsed = time.monotonic() - started
    print(f"SIGTERM with Redis gone: exit code {proc.returncode} after {elapsed:.2f}s (grace {grace}s)")
    assert elapsed < grace + defaults.HAND_BACK_TIMEOUT + 2.0
    assert proc.returncode == 0
    log = workers.log("w0")
    assert "could not hand back 5 requests" in log
    assert all(f"req-{i}" in log.split("could not hand back")[1] for i in range(5))


async def test_a_restart_without_persistence_loses_the_requests_but_no_worker(
    fake: FakeLLMServerThread, tmp_path: Path
) -> None:
    require_redis_server()
    with RedisServer() as server:  # no AOF: a restart forgets everything
        namespace = f"n{uuid.uuid4().hex[:10]}"
        workers = Workers(server.url, namespace, fake.base_url, tmp_path)
        client = AsyncFailoverManager(
            url=server.url, namespace=namespace, worker_id="c", retry=RetryPolicy(deadline=2.0)
        )
        try:
            for i in range(2):
                await workers.spawn(f"w{i}", lease_ttl=LEASE, block=0.2)
            await workers.wait_ready()
            for i in range(5):
                await submit_patiently(client, f"lost-{i}", prompt(i))
            async with asyncio.timeout(15):
                while len(fake.requests) < 5:
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.restart)
            # the queue and its consumer group are gone too: the workers recreate the group
            stats = {"reconnects": 0}
            await submit_patiently(client, "after", prompt(7))
            async with asyncio.timeout(30):
                text = await reconnecting_follower(client, "after", stats)
            assert text == full_answer_text(prompt(7))
            assert await client.outcome("lost-0") is None  # gone: clients must resubmit
            assert all(proc.returncode is None for proc in workers.procs.values())
        finally:
            await workers.close()
            await client.aclose()
            for worker_id in workers.procs:
                print(f"---- {worker_id} ----\n{workers.log(worker_id)}")
