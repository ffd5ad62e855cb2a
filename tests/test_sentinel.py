"""flo_coord behind Redis Sentinel, and the durability levels.

A ``redis+sentinel://h:p,h:p,h:p/service`` URL follows the primary; when the primary is
killed mid-stream, Sentinel promotes the replica and the stream finishes through the
retry layer. With ``durability="replica"`` (WAIT 1) nothing acknowledged is lost; without
it, the writes of the last moments before the crash may be (docs/OPERATING.md).
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from conftest import require_redis_server

from flo_coord import (
    AsyncFailoverManager,
    CoordinatorUnavailableError,
    FailoverManager,
    RetryPolicy,
)
from flo_coord.testing.embedded import RedisServer, SentinelGroup, _wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    """A fresh primary + replica + 3 sentinels for each test (each test fails one over)."""
    require_redis_server()
    with SentinelGroup() as g:
        yield g


def sentinel_url(group: SentinelGroup) -> str:
    hosts = ",".join(f"{h}:{p}" for h, p in group.sentinel_addresses)
    return f"redis+sentinel://{hosts}/{group.service_name}"


def server_at(group: SentinelGroup, address: tuple[str, int]) -> RedisServer:
    for server in (group.primary, group.replica):
        if server is not None and server.address == address:
            return server
    raise AssertionError(f"no server at {address}")


def fail_over(group: SentinelGroup, rejoin: bool) -> threading.Thread:
    """Kill the primary now; in the background wait for the promotion, then (``rejoin``)
    restart the old primary so Sentinel turns it into the new primary's replica."""
    old = server_at(group, group.primary_address())
    group.kill_primary()

    def recover() -> None:
        new = group.wait_for_failover(timeout=60)
        if rejoin:
            old.restart()
            promoted = server_at(group, new)
            _wait_until(
                lambda: int(promoted.info("replication").get("connected_slaves", 0)) >= 1,
                60,
                "the old primary to rejoin as a replica",
            )

    thread = threading.Thread(target=recover, daemon=True, name="failover")
    thread.start()
    return thread


def markers(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"<(\d+)>", text)]


def test_sentinel_url_follows_the_primary(group: SentinelGroup) -> None:
    with FailoverManager(url=sentinel_url(group), namespace="s", worker_id="w1") as manager:
        assert manager.redis.connection_pool.connection_kwargs["retry"].get_retries() == 0
        manager.start_tracking("req-1", "prompt")
        manager.append_tokens("req-1", "hello")
        assert manager.get_context("req-1").generated_prefix == "hello"  # type: ignore[union-attr]
        assert group.primary is not None
        assert group.primary.client().exists("s:{req-1}:ctx") == 1
    # a redis-py Sentinel client given by the caller works too (its retries switched off)
    client = group.sentinel_client(socket_timeout=5).master_for(group.service_name, socket_timeout=5)
    assert isinstance(client, redis.Redis)
    with FailoverManager(redis=client, namespace="given", worker_id="w1") as manager:
        assert manager.redis.connection_pool.connection_kwargs["retry"].get_retries() == 0
        for sentinel in manager.redis.connection_pool.sentinel_manager.sentinels:
            assert sentinel.get_retry().get_retries() == 0
        manager.start_tracking("req-1", "prompt")
        assert manager.complete("req-1")


def test_primary_killed_mid_stream_loses_nothing_with_replica_durability(group: SentinelGroup) -> None:
    policy = RetryPolicy(deadline=60)
    with FailoverManager(
        url=sentinel_url(group), namespace="s", worker_id="w1", durability="replica", retry=policy
    ) as m:
        m.start_tracking("req-1", "prompt")
        acked: list[str] = []
        recovery = None
        for i in range(60):
            if i == 20:
                recovery = fail_over(group, rejoin=True)
            part = f"<{i}>"
            assert m.append_tokens("req-1", part) is not None
            acked.append(part)
        assert recovery is not None
        recovery.join(90)
        assert not recovery.is_alive()
        assert m.complete("req-1")
        assert m.outcome("req-1").state == "Completed"  # type: ignore[union-attr]
        text = m.redis.get("s:{req-1}:text").decode()
        assert text == "".join(acked)  # every acknowledged chunk, once, in order
        # the new primary is the old replica
        assert group.replica is not None and m.redis.connection_pool.get_master_address() == group.replica.address


async def test_async_streams_finish_across_a_failover_without_wait(group: SentinelGroup) -> None:
    """durability='primary': the streams finish; chunks acknowledged in the last moments
    before the crash may be missing (asynchronous replication), never duplicated or reordered."""
    url = sentinel_url(group)
    async with AsyncFailoverManager(url=url, namespace="s", worker_id="w1", retry=RetryPolicy(deadline=60)) as m:
        acked: dict[str, list[int]] = {}
        started = asyncio.Event()
        progress = 0

        async def stream(rid: str) -> None:
            nonlocal progress
            await m.start_tracking(rid, "prompt")
            acked[rid] = []
            for i in range(30):
                await m.append_tokens(rid, f"<{i}>")
                acked[rid].append(i)
                progress += 1
                if progress == 5 * 10:
                    started.set()
                await asyncio.sleep(0.01)
            assert await m.complete(rid)

        async def crash() -> None:
            await started.wait()
            thread = await asyncio.to_thread(fail_over, group, False)
            await asyncio.to_thread(thread.join, 90)

        await asyncio.gather(crash(), *(stream(f"req-{i}") for i in range(5)))
        lost = 0
        for rid, parts in acked.items():
            text = (await m.redis.get(f"s:{{{rid}}}:text")).decode()
            found = markers(text)
            assert found == sorted(set(found)), "a chunk was duplicated or reordered"
            assert set(found) <= set(parts) and found[-1] == parts[-1]
            lost += len(parts) - len(found)
        print(f"chunks acknowledged but lost in the failover without WAIT: {lost}")


def test_replica_durability_waits_for_a_replica() -> None:
    require_redis_server()
    with RedisServer() as primary, RedisServer(replicaof=primary.address) as replica:
        _wait_until(lambda: replica.info("replication").get("master_link_status") == "up", 20, "replica sync")
        namespace = f"d{uuid.uuid4().hex[:6]}"
        with FailoverManager(url=primary.url, namespace=namespace, worker_id="w1", durability="replica") as m:
            m.start_tracking("req-1", "prompt")
            m.append_tokens("req-1", "one ")
            # a retried append (DUP: nothing written) is still confirmed on the replica:
            # the shell writes an anchor key on the same connection before WAIT
            dup = m.append_tokens("req-1", "one ", seq=1)
            assert dup is not None and not dup.applied
            assert replica.client().get(f"{namespace}:{{req-1}}:text") == b"one "
            assert replica.client().exists(f"{namespace}:{{req-1}}:ctx:wait") == 1
            assert m.complete("req-1")
        replica.stop()
        # no replica left: nothing can be acknowledged; the call fails at its deadline
        policy = RetryPolicy(deadline=0.5)
        with FailoverManager(url=primary.url, namespace=namespace, durability="replica", retry=policy) as m:
            with pytest.raises(CoordinatorUnavailableError) as caught:
                m.start_tracking("req-2", "prompt")
            assert "WAIT" in str(caught.value.cause)
            # reads need no replica
            assert m.get_context("req-1") is None
            assert m.stats().active_contexts >= 0


async def test_async_replica_durability() -> None:
    require_redis_server()
    with RedisServer() as primary, RedisServer(replicaof=primary.address) as replica:
        _wait_until(lambda: replica.info("replication").get("master_link_status") == "up", 20, "replica sync")
        async with AsyncFailoverManager(url=primary.url, namespace="d", durability="replica") as m:
            await m.start_tracking("req-1", "prompt")
            await asyncio.gather(*(m.append_tokens("req-1", f"<{i}>") for i in range(20)))
            assert markers(replica.client().get("d:{req-1}:text").decode()) == list(range(20))
