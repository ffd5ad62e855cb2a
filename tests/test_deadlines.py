"""Issue 10: deadlines that hold on a frozen (SIGSTOP) and on a killed (SIGKILL) Redis.

Every public call of both managers, and the Coordinator's (stream, run, follow, outcome),
returns or raises a typed error within its operation deadline plus the documented margin
(``shell.DEADLINE_MARGIN``); ``Coordinator.aclose`` returns within its hand-back timeout
and reports the requests it could not hand back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import require_redis_server
from test_redis_faults import SYNC_CALLS, _attempt

from flo_coord import AsyncFailoverManager, CoordinatorUnavailableError, FailoverManager, RetryPolicy
from flo_coord.execution.backends import BackendSpec
from flo_coord.execution.coordinator import Coordinator
from flo_coord.store.shell import DEADLINE_MARGIN
from flo_coord.testing.embedded import RedisServer

pytestmark = pytest.mark.timeout(120)

DEADLINE = 1.0
#: scheduling noise on a shared CI machine, on top of the documented margin
NOISE = 0.3
ASYNC_CALLS = [
    *SYNC_CALLS,
    ("record_attempt", (_attempt(),), {}, "req-1"),
    ("append_direct", ("req-1", "y"), {}, "req-1"),
]


@contextlib.contextmanager
def broken(server: RedisServer, how: str) -> Iterator[None]:
    """Redis frozen (SIGSTOP: connections are accepted, nothing is answered) or killed."""
    pid = server.pid
    assert pid is not None
    if how == "frozen":
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)
    else:
        server.kill()
        yield


@pytest.fixture
def server() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer() as srv:
        yield srv


def check(name: str, error: BaseException | None, elapsed: float, limit: float) -> None:
    assert isinstance(error, CoordinatorUnavailableError), f"{name} raised {error!r}"
    assert elapsed < limit, f"{name} took {elapsed:.2f}s (limit {limit:.2f}s)"


@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_every_sync_call_holds_its_deadline(server: RedisServer, how: str) -> None:
    manager = FailoverManager(url=server.url, namespace="d", worker_id="w1", retry=RetryPolicy(deadline=DEADLINE))
    manager.start_tracking("req-1", "prompt")
    manager.append_tokens("req-1", "x")
    calls = [*SYNC_CALLS, ("record_attempt", (_attempt(),), {}, "req-1")]

    def call(c: tuple[Any, ...]) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            getattr(manager, c[0])(*c[1], **c[2])
        except Exception as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    with broken(server, how), ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(call, calls))
    worst = max(elapsed for _, elapsed in results)
    print(f"sync, Redis {how}: slowest of {len(calls)} calls {worst:.2f}s for a {DEADLINE}s deadline")
    for c, (error, elapsed) in zip(calls, results, strict=True):
        check(c[0], error, elapsed, DEADLINE + DEADLINE_MARGIN + NOISE)


@pytest.mark.parametrize("how", ["frozen", "killed"])
# 2.5 s: first attempts get budgets long enough for the shell's coarse cutter (shell._Cutter)
# rather than asyncio.timeout; both must hold the deadline
@pytest.mark.parametrize("deadline", [DEADLINE, 2.5])
async def test_every_async_call_holds_its_deadline(server: RedisServer, how: str, deadline: float) -> None:
    manager = AsyncFailoverManager(url=server.url, namespace="d", worker_id="w1", retry=RetryPolicy(deadline=deadline))
    await manager.start_tracking("req-1", "prompt")
    await manager.append_tokens("req-1", "x")

    async def call(c: tuple[Any, ...]) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            await getattr(manager, c[0])(*c[1], **c[2])
        except Exception as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    with broken(server, how):
        results = await asyncio.gather(*(call(c) for c in ASYNC_CALLS))
    worst = max(elapsed for _, elapsed in results)
    print(f"async, Redis {how}: slowest of {len(ASYNC_CALLS)} calls {worst:.2f}s for a {deadline}s deadline")
    for c, (error, elapsed) in zip(ASYNC_CALLS, results, strict=True):
        check(c[0], error, elapsed, deadline + DEADLINE_MARGIN + NOISE)
    await asyncio.wait_for(manager.aclose(), deadline + DEADLINE_MARGIN)


@pytest.mark.parametrize("how", ["frozen", "killed"])
async def test_coordinator_calls_hold_their_deadline_and_aclose_reports_what_it_kept(
    server: RedisServer, how: str
) -> None:
    backends = [BackendSpec(name="Vllm", base_url="http://127.0.0.1:9", model="m")]
    co = Coordinator(backends, url=server.url, namespace="d", worker_id="w1", retry=RetryPolicy(deadline=DEADLINE))
    held = [(await co.manager.start_tracking(f"held-{i}", "prompt")).request_id for i in range(3)]

    async def first(stream: Any) -> None:
        async for _ in stream:
            return

    calls = {
        "stream": lambda: first(co.stream("req-2", "prompt")),
        "run": lambda: co.run("req-3", "prompt"),
        "follow": lambda: first(co.follow("held-0")),
        "outcome": lambda: co.outcome("held-0"),
    }

    async def call(make: Any) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            await make()
        except Exception as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    with broken(server, how):
        results = await asyncio.gather(*(call(make) for make in calls.values()))
        for name, (error, elapsed) in zip(calls, results, strict=True):
            check(name, error, elapsed, DEADLINE + DEADLINE_MARGIN + NOISE)
        started = time.monotonic()
        kept = await co.aclose(timeout=1.5)
        elapsed = time.monotonic() - started
    print(f"Coordinator, Redis {how}: aclose took {elapsed:.2f}s and could not hand back {kept}")
    assert elapsed < 1.5 + NOISE
    assert sorted(kept) == held
    assert not co.redis_available
