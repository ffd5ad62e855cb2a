"""The hot path of the shells (issue 12): the connection a shell keeps for batches of script
calls is its own, beside the client's pool, so it never uses up a pool that several
managers share, and it is closed by the managers' ``close``/``aclose``.
"""

from __future__ import annotations

import os
import uuid

import redis
import redis.asyncio as aredis

from flo_coord import AsyncFailoverManager, FailoverManager, LeaseLostError
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


def test_a_forked_child_holds_none_of_its_parents_requests(redis_server: RedisServer) -> None:
    """A child forked while the parent streams must not write under the parent's owner,
    epoch and seqs: its append would take the seq the parent uses next, and the parent's
    text would be acknowledged as a duplicate and dropped (found by a new user's trial).
    The child gets LeaseLostError on the parent's request, works on its own requests under
    a worker id of its own, and the parent's answer stays exact."""
    manager = FailoverManager(redis=redis_server.client(), namespace=f"fork{uuid.uuid4().hex[:8]}")
    manager.start_tracking("f1", "p")
    manager.append_tokens("f1", "parent1;")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        outcome = "appended"
        try:
            manager.append_tokens("f1", "child1;")
        except LeaseLostError:
            outcome = "lease lost"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        try:
            manager.start_tracking("c1", "p")
            manager.append_tokens("c1", "own;")
            ctx = manager.get_context("c1")
            own = f"{ctx.generated_prefix if ctx else None}|{manager.worker_id}"
        except BaseException as exc:
            own = f"{type(exc).__name__}: {exc}"
        os.write(write, f"{outcome}\n{own}".encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        outcome, own = pipe.read().split("\n")
    parent_id = manager.worker_id
    ack = manager.append_tokens("f1", "parent2;")
    ctx = manager.get_context("f1")
    manager.close()
    assert outcome == "lease lost"
    text, child_id = own.split("|")
    assert text == "own;" and child_id != parent_id
    assert ack is not None and ack.applied
    assert ctx is not None and ctx.generated_prefix == "parent1;parent2;"


def test_a_client_on_a_blocking_pool_is_accepted_with_its_retries_off(redis_server: RedisServer) -> None:
    """redis-py 8.1's BlockingConnectionPool cannot take ``set_retry`` (AttributeError); the
    manager still switches its retries off (one retry layer: ours) and works on it."""
    pool = redis.BlockingConnectionPool(host=redis_server.host, port=redis_server.port, max_connections=2, timeout=5)
    client = redis.Redis(connection_pool=pool, socket_timeout=5)
    manager = FailoverManager(redis=client, namespace=f"bp{uuid.uuid4().hex[:8]}")
    manager.start_tracking("r1", "p")
    manager.append_tokens("r1", "a")
    ctx = manager.get_context("r1")
    manager.close()
    assert ctx is not None and ctx.generated_prefix == "a"
    assert pool.connection_kwargs["retry"]._retries == 0
