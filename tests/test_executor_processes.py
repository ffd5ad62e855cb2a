"""Worker processes with real signals: a SIGKILLed worker's request is taken over and finished,
a SIGTERMed worker hands its request back at once; clients following the answer (and
reconnecting to another replica with their offset) get it exactly once.

Each worker is ``tests/worker_main.py`` (a Coordinator run by ``Worker``) on a real
redis-server; the fake LLM server runs in a thread of the test process with a token delay,
so one answer streams for ~2.5 s. Every child is killed and reaped in a finally block.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from flo_coord import AsyncFailoverManager, Takeover
from flo_coord.execution.delivery import follow
from flo_coord.store.queue import Submission, submit
from flo_coord.testing.fakellm import FakeLLMServerThread, full_answer_text

WORKER_MAIN = str(Path(__file__).with_name("worker_main.py"))
PROMPT = "Describe a takeover of a streaming request."
ANSWER = full_answer_text(PROMPT)
TOKEN_DELAY = 0.05  # 48 tokens: ~2.4 s per answer

pytestmark = pytest.mark.slow


@pytest.fixture
def fake() -> Iterator[FakeLLMServerThread]:
    with FakeLLMServerThread(token_delay=TOKEN_DELAY) as server:
        yield server


class Workers:
    """Worker processes on one namespace; ``close`` kills and reaps every one still alive."""

    def __init__(self, redis_url: str, namespace: str, base_url: str, logs: Path) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.base_url = base_url
        self.logs = logs
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def spawn(self, worker_id: str, **options: Any) -> None:
        args = ["--redis", self.redis_url, "--namespace", self.namespace, "--worker-id", worker_id]
        args += ["--base-url", self.base_url]
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        with open(self.logs / f"{worker_id}.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, WORKER_MAIN, *args, stdout=asyncio.subprocess.PIPE, stderr=log
            )
        self.procs[worker_id] = proc

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async def ready(worker_id: str, proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            assert line.decode().strip() == f"ready {worker_id}", f"{worker_id} did not start:\n{self.log(worker_id)}"

        await asyncio.wait_for(asyncio.gather(*(ready(w, p) for w, p in self.procs.items())), timeout)

    def log(self, worker_id: str) -> str:
        path = self.logs / f"{worker_id}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(proc.wait(), 10)


@pytest_asyncio.fixture
async def setup(
    redis_server: Any, fake: FakeLLMServerThread, tmp_path: Path
) -> AsyncIterator[tuple[Workers, AsyncFailoverManager]]:
    namespace = f"p{uuid.uuid4().hex[:10]}"
    workers = Workers(redis_server.url, namespace, fake.base_url, tmp_path)
    client = AsyncFailoverManager(url=redis_server.url, namespace=namespace, worker_id="client-a")
    try:
        yield workers, client
    finally:
        await workers.close()
        await client.aclose()
        for worker_id in workers.procs:  # shown by pytest when the test failed
            print(f"---- {worker_id} ----\n{workers.log(worker_id)}")


async def submit_request(client: AsyncFailoverManager, request_id: str) -> None:
    await client.shell.run(submit(client.core, Submission(request_id=request_id, prompt=PROMPT)), "submit")


async def read_until(stream: AsyncIterator[str], received: list[str], chars: int) -> None:
    """Append followed chunks to ``received`` until it holds at least ``chars`` characters."""
    while sum(map(len, received)) < chars:
        received.append(await anext(stream))


async def owner_of(client: AsyncFailoverManager, request_id: str) -> str:
    ctx = await client.get_context(request_id)
    assert ctx is not None and ctx.owner is not None, "the request is not running"
    return ctx.owner


async def takeovers(client: AsyncFailoverManager, request_id: str) -> list[Takeover]:
    return [e for e in await client.history() if isinstance(e, Takeover) and e.request_id == request_id]


async def test_sigkill_mid_stream_is_taken_over_and_followers_get_the_answer_exactly_once(
    setup: tuple[Workers, AsyncFailoverManager], fake: FakeLLMServerThread, redis_server: Any
) -> None:
    workers, client = setup
    for i in range(3):
        await workers.spawn(f"w{i}", lease_ttl=1.0, reap_interval=0.1)
    await workers.wait_ready()
    request_id = f"req-{uuid.uuid4().hex[:8]}"
    await submit_request(client, request_id)

    received: list[str] = []
    async with contextlib.aclosing(follow(client, request_id, wait=10.0)) as stream:
        await read_until(stream, received, 40)
        victim = await owner_of(client, request_id)
        workers.procs[victim].send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(workers.procs[victim].wait(), 5) == -signal.SIGKILL
        killed_at = sum(map(len, received))
        # keep following through the takeover: the next chunks come from another replica
        await asyncio.wait_for(read_until(stream, received, killed_at + 60), 15)
    # the client disconnects; it reconnects to "another replica" with the offset it has
    offset = sum(map(len, received))
    assert offset < len(ANSWER), "the answer finished before the reconnect; use a longer token delay"
    other = AsyncFailoverManager(url=redis_server.url, namespace=client.namespace, worker_id="client-b")
    try:
        rest = await asyncio.wait_for(_collect(follow(other, request_id, offset)), 15)
    finally:
        await other.aclose()

    assert "".join(received) + rest == ANSWER  # no duplicate, no gap
    outcome = await client.outcome(request_id)
    assert outcome is not None and outcome.state == "Completed"
    assert outcome.owner != victim and outcome.owner in workers.procs and outcome.epoch == 2
    (takeover,) = await takeovers(client, request_id)
    assert (takeover.old_owner, takeover.new_owner) == (victim, outcome.owner)
    # the new owner continued on the same backend from the exact committed prefix
    vllm = [r for r in fake.requests if r["model"] == "vllm-m"]
    assert [r["prompt"] for r in vllm] == [PROMPT, PROMPT + ANSWER[: takeover.prefix_chars]]
    assert takeover.prefix_chars >= killed_at
    for worker_id, proc in workers.procs.items():
        assert worker_id == victim or proc.returncode is None, f"{worker_id} died:\n{workers.log(worker_id)}"


async def test_sigterm_hands_the_request_back_at_once_and_exits_0(
    setup: tuple[Workers, AsyncFailoverManager], fake: FakeLLMServerThread
) -> None:
    workers, client = setup
    lease_ttl = 6.0  # a renewed lease has >= 4 s left: a takeover sooner proves the hand-back
    for i in range(3):
        await workers.spawn(f"t{i}", lease_ttl=lease_ttl, reap_interval=0.1, grace=0)
    await workers.wait_ready()
    request_id = f"req-{uuid.uuid4().hex[:8]}"
    await submit_request(client, request_id)

    received: list[str] = []
    async with contextlib.aclosing(follow(client, request_id, wait=10.0)) as stream:
        await read_until(stream, received, 40)
        leaver = await owner_of(client, request_id)
        terminated_at = time.time()
        workers.procs[leaver].send_signal(signal.SIGTERM)
        async for chunk in stream:
            received.append(chunk)

    assert "".join(received) == ANSWER
    assert await asyncio.wait_for(workers.procs[leaver].wait(), 10) == 0, workers.log(leaver)
    outcome = await client.outcome(request_id)
    assert outcome is not None and outcome.state == "Completed" and outcome.owner != leaver
    (takeover,) = await takeovers(client, request_id)
    assert (takeover.old_owner, takeover.new_owner) == (leaver, outcome.owner)
    assert takeover.at - terminated_at < 3.0, "taken over only when the lease expired: not handed back"


async def _collect(stream: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in stream])
