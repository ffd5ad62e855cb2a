"""flo_coord on Redis Cluster (three masters started by embedded.RedisCluster).

The core and takeover behaviour through a ``redis+cluster://`` URL and through a given
``redis.cluster.RedisCluster`` (and the asyncio equivalents); that no script or pipeline
call spans two hash slots; that pipelines of EVALSHA work on redis-py's ClusterPipeline;
and that a flushed Functions library is reloaded on every primary.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio.cluster as acluster
import redis.cluster
from conftest import require_redis_server
from redis.crc import key_slot

from flo_coord import (
    AsyncFailoverManager,
    FailoverAttempt,
    FailoverManager,
    FailoverResult,
    LeaseLostError,
    ServingBackend,
    Takeover,
)
from flo_coord.errors import ConfigError
from flo_coord.store import functions
from flo_coord.store.core import Eval
from flo_coord.store.scripts import ALL
from flo_coord.testing.embedded import RedisCluster

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    require_redis_server()
    with RedisCluster(masters=3) as c:
        yield c


def cluster_url(c: RedisCluster) -> str:
    return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in c.nodes)


def ns() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


def ids_on_every_node(c: RedisCluster, namespace: str, per_node: int = 2) -> list[str]:
    """Request ids whose keys land on each of the masters."""
    client = c.client()
    try:
        wanted: dict[str, list[str]] = {}
        i = 0
        while min((len(v) for v in wanted.values()), default=0) < per_node or len(wanted) < len(c.nodes):
            rid = f"req-{i}"
            node = client.get_node_from_key(f"{namespace}:{{{rid}}}:ctx").name
            if len(wanted.setdefault(node, [])) < per_node:
                wanted[node].append(rid)
            i += 1
        return [rid for rids in wanted.values() for rid in rids]
    finally:
        client.close()


@pytest.fixture(params=["url", "client"])
def make_sync(request: pytest.FixtureRequest, cluster: RedisCluster) -> Iterator[Any]:
    made: list[FailoverManager] = []

    def build(**kwargs: Any) -> FailoverManager:
        if request.param == "url":
            manager = FailoverManager(url=cluster_url(cluster), **kwargs)
        else:
            manager = FailoverManager(redis=cluster.client(socket_timeout=5), **kwargs)
        made.append(manager)
        return manager

    yield build
    for manager in made:
        manager.close()


def test_cluster_clients_have_their_own_retries_off(cluster: RedisCluster) -> None:
    given = cluster.client()
    assert given.retry.get_retries() > 0  # redis-py's default
    with FailoverManager(redis=given, namespace=ns()) as manager:
        assert manager.redis.retry.get_retries() == 0
        assert manager.redis.pipeline().retry.get_retries() == 0
    with FailoverManager(url=cluster_url(cluster), namespace=ns()) as manager:
        assert isinstance(manager.redis, redis.cluster.RedisCluster)
        assert manager.redis.retry.get_retries() == 0


def test_durability_replica_is_refused_on_a_cluster(cluster: RedisCluster) -> None:
    with pytest.raises(ConfigError, match="Cluster"):
        FailoverManager(url=cluster_url(cluster), namespace=ns(), durability="replica")


def test_core_behaviour_on_a_cluster(make_sync: Any, cluster: RedisCluster) -> None:
    namespace = ns()
    manager = make_sync(namespace=namespace, worker_id="w1")
    rids = ids_on_every_node(cluster, namespace)
    for rid in rids:
        ctx = manager.start_tracking(rid, f"prompt {rid}", ServingBackend.Vllm)
        assert ctx.epoch == 1
    for rid in rids:
        for part in ("one ", "two ", "three "):
            assert manager.append_tokens(rid, part) is not None
    # a retried seq is acknowledged without being applied again
    dup = manager.append_tokens(rids[0], "two ", seq=2)
    assert dup is not None and not dup.applied
    assert manager.heartbeat() == len(rids)  # one pipeline of EVALSHA spanning every node
    for rid in rids:
        ctx = manager.get_context(rid)
        assert ctx is not None and ctx.generated_prefix == "one two three " and ctx.prompt == f"prompt {rid}"
    manager.record_attempt(
        FailoverAttempt(backend=ServingBackend.Vllm, started_at=time.time(), result=FailoverResult.Success)
    )
    manager.mark_backend_failed(rids[1], ServingBackend.Vllm)
    assert manager.next_backend_for(rids[1]) == ServingBackend.Realizar
    stats = manager.stats()  # XRANGE and ZCARD on two different slots
    assert stats.active_contexts == len(rids) and stats.successful == 1
    assert manager.complete(rids[0])
    assert manager.outcome(rids[0]).state == "Completed"  # type: ignore[union-attr]
    assert manager.get_context(rids[0]) is None
    assert manager.stats().active_contexts == len(rids) - 1
    assert len(manager.active_requests()) == len(rids) - 1


def test_takeover_on_a_cluster(make_sync: Any, cluster: RedisCluster) -> None:
    namespace = ns()
    dead = make_sync(namespace=namespace, worker_id="dead", lease_ttl=0.2)
    rescuer = make_sync(namespace=namespace, worker_id="rescuer", lease_ttl=30)
    rids = ids_on_every_node(cluster, namespace, per_node=1)
    for rid in rids:
        dead.start_tracking(rid, "prompt")
        dead.append_tokens(rid, f"{rid} partial ")
    deadline = time.monotonic() + 10
    while len(rescuer.orphans()) < len(rids):
        assert time.monotonic() < deadline, "leases never expired"
        time.sleep(0.05)
    claimed = rescuer.claim_orphans()
    assert sorted(c.request_id for c in claimed) == sorted(rids)
    for ctx in claimed:
        assert ctx.owner == "rescuer" and ctx.epoch == 2 and ctx.generated_prefix == f"{ctx.request_id} partial "
        rescuer.append_tokens(ctx.request_id, "rest")
    with pytest.raises(LeaseLostError):
        dead.append_tokens(rids[0], "zombie write")
    assert rescuer.claim(rids[0]) is None  # live lease: not claimable again
    for rid in rids:
        assert rescuer.complete(rid)
        assert rescuer.outcome(rid).owner == "rescuer"  # type: ignore[union-attr]
    takeovers = [e for e in rescuer.history() if isinstance(e, Takeover)]
    assert sorted(t.request_id for t in takeovers) == sorted(rids)
    assert rescuer.stats().takeovers == len(rids)


def test_functions_reload_on_every_primary(make_sync: Any, cluster: RedisCluster) -> None:
    namespace = ns()
    manager = make_sync(namespace=namespace, worker_id="w1")
    rids = ids_on_every_node(cluster, namespace, per_node=1)
    for rid in rids:
        manager.start_tracking(rid, "prompt")
    for node in cluster.nodes:
        node.client().function_flush()
    assert manager.heartbeat() == len(rids)
    for rid in rids:
        manager.append_tokens(rid, "after flush")
    library, _ = functions.library()
    for node in cluster.nodes:
        listed = node.client().function_list(library=library)
        assert [entry[1] for entry in listed] == [library.encode()], listed
        assert node.client().info("commandstats").get("cmdstat_evalsha") is None  # FCALL only
    for rid in rids:
        assert manager.get_context(rid).generated_prefix == "after flush"  # type: ignore[union-attr]


def test_no_call_spans_two_slots(cluster: RedisCluster) -> None:
    """Every script's keys share one slot; namespace keys are single keys."""
    namespace = ns()
    with FailoverManager(url=cluster_url(cluster), namespace=namespace, worker_id="w1", lease_ttl=0.2) as manager:
        seen: list[Any] = []
        execute = manager.shell.execute

        def recording(batch: list[Any], deadline_at: float | None = None) -> list[Any]:
            seen.extend(batch)
            return execute(batch, deadline_at)

        manager.shell.execute = recording  # type: ignore[method-assign]
        rids = ["a", "b:c", "x/y", "id@host", "n+1=2", "dots.and-dashes_"]
        for rid in rids:
            manager.start_tracking(rid, "prompt")
            manager.append_tokens(rid, "text ")
            manager.get_context(rid)
        manager.heartbeat()
        manager.record_attempt(FailoverAttempt(backend=ServingBackend.Vllm, started_at=time.time()))
        manager.stats()
        manager.history()
        time.sleep(0.3)
        claimed = manager.claim_orphans()
        manager.release(claimed[0].request_id)
        for ctx in claimed[1:]:
            manager.complete(ctx.request_id)
    scripts_run = set()
    for call in seen:
        keys = call.keys if isinstance(call, Eval) else ()
        if isinstance(call, Eval):
            scripts_run.add(call.script.name)
            assert len({key_slot(k.encode()) for k in keys}) == 1, f"{call.script.name} spans slots: {keys}"
            assert all(k.startswith(f"{namespace}:") for k in keys)
    assert {"start", "append", "heartbeat", "read", "claim", "finish", "index_touch"} <= scripts_run
    # every per-request script declares its keys in one slot for any valid id
    for script in ALL:
        assert "KEYS[5]" not in script.source


async def test_async_manager_on_a_cluster(cluster: RedisCluster) -> None:
    namespace = ns()
    rids = ids_on_every_node(cluster, namespace, per_node=1)
    given = acluster.RedisCluster(
        startup_nodes=[acluster.ClusterNode(n.host, n.port) for n in cluster.nodes], socket_timeout=5
    )
    async with (
        AsyncFailoverManager(url=cluster_url(cluster), namespace=namespace, worker_id="w1", lease_ttl=0.3) as first,
        AsyncFailoverManager(redis=given, namespace=namespace, worker_id="w2", lease_ttl=30) as second,
    ):
        assert first.redis.retry.get_retries() == 0 and second.redis.retry.get_retries() == 0
        for rid in rids:
            await first.start_tracking(rid, "prompt")
        for part in ("a ", "b ", "c "):
            for rid in rids:
                await first.append_tokens(rid, part)
        dup = await first.append_tokens(rids[0], "b ", seq=2)
        assert dup is not None and not dup.applied
        assert await first.heartbeat() == len(rids)
        for node in cluster.nodes:
            node.client().script_flush()
        assert (await second.stats()).active_contexts == len(rids)
        deadline = time.monotonic() + 10
        while len(await second.orphans()) < len(rids):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        claimed = await second.claim_orphans()
        assert len(claimed) == len(rids)
        for ctx in claimed:
            assert ctx.generated_prefix == "a b c "
            await second.append_tokens(ctx.request_id, "d")
            assert await second.complete(ctx.request_id)
        with pytest.raises(LeaseLostError):
            await first.append_direct(rids[0], "late")
        assert (await second.stats()).active_contexts == 0
        assert len([e for e in await second.history() if isinstance(e, Takeover)]) == len(rids)


def test_cluster_appends_survive_clients_killed_on_every_node(make_sync: Any, cluster: RedisCluster) -> None:
    from test_redis_faults import ClientKiller

    namespace = ns()
    manager = make_sync(namespace=namespace, worker_id="w1")
    rids = ids_on_every_node(cluster, namespace, per_node=1)
    for rid in rids:
        manager.start_tracking(rid, "prompt")
    killers = [ClientKiller(node, interval=0.01) for node in cluster.nodes]
    for killer in killers:
        killer.start()
    try:
        for i in range(100):
            for rid in rids:
                assert manager.append_tokens(rid, f"<{i}>") is not None
            if i % 20 == 0:
                assert manager.heartbeat() == len(rids)
    finally:
        for killer in killers:
            killer.__exit__()
    assert sum(k.kills for k in killers) > 0
    for rid in rids:
        assert manager.get_context(rid).generated_prefix == "".join(f"<{i}>" for i in range(100))  # type: ignore[union-attr]
