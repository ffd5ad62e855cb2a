"""The hot path of the shells (issue 12): the connection a shell keeps for batches of script
calls is its own, beside the client's pool, so it never uses up a pool that several
managers share, and it is closed by the managers' ``close``/``aclose``.
"""

from __future__ import annotations

import uuid

import redis
import redis.asyncio as aredis

from flo_coord import AsyncFailoverManager, FailoverManager
from flo_coord.testing.embedded import RedisServer


def test_sync_managers_sharing_a_small_pool_never_exhaust_it(redis_server: RedisServer) -> None:
    # Two connections for everyone: the managers' appends must still go through, because each
    # manager's kept connection is its own and the pool only lends for the rest.
    shared = redis.Redis(host=redis_server.host, port=redis_server.port, max_connections=2)
    namespace = f"hp{uuid.uuid4().hex[:8]}"
    managers = [FailoverManager(redis=shared, namespace=namespace, worker_id=f"w{i}") for i in range(6)]
    for i, manager in enumerate(managers):
        manager.start_tracking(f"r{i}", "prompt")
        for _ in range(3):
            ack = manager.append_tokens(f"r{i}", "tok ")
            assert ack is not None and ack.applied
    assert managers[0].get_context("r5") is not None  # the pool still lends for plain reads
    kept = [manager.shell._hot.conn for manager in managers]
    assert all(conn is not None and conn.is_connected for conn in kept)
    for manager in managers:
        manager.shell.close()  # what FailoverManager.close does before closing the shared client
    assert not any(conn.is_connected for conn in kept)  # each manager's own connection is closed
    shared.close()


async def test_async_managers_sharing_a_small_pool_never_exhaust_it(redis_server: RedisServer) -> None:
    shared = aredis.Redis(host=redis_server.host, port=redis_server.port, max_connections=2)
    namespace = f"hp{uuid.uuid4().hex[:8]}"
    managers = [AsyncFailoverManager(redis=shared, namespace=namespace, worker_id=f"w{i}") for i in range(6)]
    for i, manager in enumerate(managers):
        await manager.start_tracking(f"r{i}", "prompt")
        for _ in range(3):
            ack = await manager.append_tokens(f"r{i}", "tok ")
            assert ack is not None and ack.applied
    for manager in managers:
        await manager.shell.aclose()
    await shared.aclose()
