"""Issue 16 (part): a worker never exits because of one request.

For each kind of poison queue entry or stored request, real worker processes
(``tests/worker_main.py``) on a real redis-server take it, end its request as Failed with
a typed reason that its follower sees (when it names a valid request id), acknowledge it,
and go on serving: the next good request is answered exactly and every worker still runs.
The submit API refuses at the door what a worker could not run.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from test_executor_processes import Workers

from flo_coord import AsyncFailoverManager
from flo_coord.errors import RequestFailedError, UnknownRequestError, ValidationError
from flo_coord.execution.delivery import follow
from flo_coord.store.queue import Submission, submit
from flo_coord.testing.fakellm import FakeLLMServerThread, full_answer_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

PROMPT = "Is one bad request allowed to stop a worker?"
ANSWER = full_answer_text(PROMPT)


@pytest.fixture
def fake() -> Iterator[FakeLLMServerThread]:
    with FakeLLMServerThread(token_delay=0.005) as server:
        yield server


@pytest_asyncio.fixture
async def fleet(
    redis_server: Any, fake: FakeLLMServerThread, tmp_path: Path
) -> AsyncIterator[tuple[Workers, AsyncFailoverManager]]:
    namespace = f"q{uuid.uuid4().hex[:10]}"
    workers = Workers(redis_server.url, namespace, fake.base_url, tmp_path)
    client = AsyncFailoverManager(url=redis_server.url, namespace=namespace, worker_id="client")
    try:
        for i in range(2):
            await workers.spawn(f"w{i}", lease_ttl=1.0, block=0.1)
        await workers.wait_ready()
        yield workers, client
    finally:
        await workers.close()
        await client.aclose()
        for worker_id in workers.procs:
            print(f"---- {worker_id} ----\n{workers.log(worker_id)}")


def raw(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields).encode()


async def corrupt_context(client: AsyncFailoverManager, rid: str) -> None:
    """Foreign data where the request's context lives: it exists, but no worker can decode it."""
    await client.redis.hset(client.core.keys.request(rid).ctx, mapping={"owner": "x", "epoch": "abc", "lease": "0"})


@dataclass(frozen=True)
class Poison:
    entry: Callable[[str], bytes]  #: the raw queue entry for request id ``rid``
    error_kind: str | None  #: what its follower sees; None when it names no followable request
    refused_at_the_door: bool = False  #: submit() refuses it
    prepare: Any = None  #: done to Redis before the entry is queued


POISON: dict[str, Poison] = {
    "primary naming no backend": Poison(
        lambda rid: raw({"request_id": rid, "prompt": PROMPT, "primary": "NoSuchBackend"}), "ConfigError", True
    ),
    "max_tokens=0": Poison(
        lambda rid: raw({"request_id": rid, "prompt": PROMPT, "max_tokens": 0}), "ValidationError", True
    ),
    "not UTF-8": Poison(
        lambda rid: b'{"request_id": "' + rid.encode() + b'", "prompt": "\xff\xfe"}', "PoisonRequestError"
    ),
    "not JSON": Poison(lambda rid: b"\x80\x81 not json", None),
    "invalid request id": Poison(lambda rid: raw({"request_id": "bad id {with} spaces", "prompt": PROMPT}), None, True),
    "corrupt stored context": Poison(
        lambda rid: raw({"request_id": rid, "prompt": PROMPT}), "CorruptStateError", prepare=corrupt_context
    ),
}


async def test_a_running_request_whose_context_turns_corrupt_is_ended_by_the_reapers(
    fleet: tuple[Workers, AsyncFailoverManager],
) -> None:
    workers, client = fleet
    rid = f"corrupt-{uuid.uuid4().hex[:8]}"
    await corrupt_context(client, rid)
    await client.redis.zadd(client.core.keys.active, {rid: 0})  # indexed as an orphan
    with pytest.raises(RequestFailedError, match="corrupt"):
        async with asyncio.timeout(20):
            async for _ in follow(client, rid, wait=5.0):
                pass
    outcome = await client.outcome(rid)
    assert outcome is not None and (outcome.state, outcome.error_kind) == ("Failed", "CorruptStateError")
    assert await served(client, f"good-{uuid.uuid4().hex[:8]}", PROMPT) == ANSWER
    assert all(proc.returncode is None for proc in workers.procs.values())


async def served(client: AsyncFailoverManager, rid: str, text: str) -> str:
    await client.shell.run(submit(client.core, Submission(request_id=rid, prompt=text)), "submit")
    async with asyncio.timeout(20):
        return "".join([chunk async for chunk in follow(client, rid, wait=15.0)])


@pytest.mark.parametrize("kind", list(POISON))
async def test_a_poison_entry_ends_typed_and_the_fleet_keeps_serving(
    fleet: tuple[Workers, AsyncFailoverManager], kind: str
) -> None:
    workers, client = fleet
    poison = POISON[kind]
    entry, error_kind, prepare = poison.entry, poison.error_kind, poison.prepare
    rid = f"poison-{uuid.uuid4().hex[:8]}"
    if prepare is not None:
        await prepare(client, rid)
    await client.redis.xadd(client.core.keys.queue, {"r": entry(rid)})
    if error_kind is not None:
        with pytest.raises(RequestFailedError) as failed:
            async with asyncio.timeout(20):
                async for _ in follow(client, rid, wait=15.0):
                    pass
        outcome = await client.outcome(rid)
        assert outcome is not None and (outcome.state, outcome.error_kind) == ("Failed", error_kind)
        assert "cannot be run" in str(failed.value)
    # the fleet goes on: the next good request is served exactly, and every worker runs
    assert await served(client, f"good-{uuid.uuid4().hex[:8]}", PROMPT) == ANSWER
    async with asyncio.timeout(10):
        while int((await client.redis.xpending(client.core.keys.queue, "workers"))["pending"]):
            await asyncio.sleep(0.05)  # the poison entry was acknowledged too
    assert all(proc.returncode is None for proc in workers.procs.values())
    if error_kind is None and kind != "not JSON":
        with pytest.raises(UnknownRequestError):  # nothing was created for it
            async for _ in follow(client, rid):
                pass
    if poison.refused_at_the_door:
        fields = json.loads(entry(rid))
        with pytest.raises(ValidationError):
            submit(client.core, Submission(**fields))
