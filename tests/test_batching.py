"""The async hot path: appends of many requests share one APPEND_MANY call per turn."""

from __future__ import annotations

import asyncio

import pytest

from flo_coord import CoordinatorUnavailableError, CorruptStateError
from flo_coord.store.core import merge_appends
from flo_coord.store.scripts import APPEND, APPEND_MANY


async def test_concurrent_appends_of_many_requests_are_all_committed_in_order(store):
    manager = store.async_manager(worker_id="w")
    ids = [f"req-{i}" for i in range(40)]
    for rid in ids:
        await manager.start_tracking(rid, "p")

    async def stream(rid: str) -> None:
        for n in range(15):
            await manager.append_tokens(rid, f" {rid}:{n}")

    await asyncio.gather(*(stream(rid) for rid in ids))
    for rid in ids:
        ctx = await manager.get_context(rid)
        assert ctx.generated_prefix == "".join(f" {rid}:{n}" for n in range(15))
    await manager.aclose()


async def test_appends_share_script_calls(real_store):
    manager = real_store.async_manager(worker_id="w")
    ids = [f"req-{i}" for i in range(30)]
    for rid in ids:
        await manager.start_tracking(rid, "p")
    before = (await manager.redis.info("commandstats")).get("cmdstat_fcall", {}).get("calls", 0)
    await asyncio.gather(*(manager.append_tokens(rid, " x") for rid in ids for _ in range(5)))
    after = (await manager.redis.info("commandstats")).get("cmdstat_fcall", {}).get("calls", 0)
    assert after - before < len(ids) * 5 / 3  # merged: far fewer script calls than appends
    for rid in ids:
        assert (await manager.get_context(rid)).generated_prefix == " x" * 5
    await manager.aclose()


async def test_a_corrupt_request_does_not_disturb_the_others_in_its_merged_call(store):
    manager = store.async_manager(worker_id="w")
    ids = [f"req-{i}" for i in range(10)]
    for rid in ids:
        await manager.start_tracking(rid, "p")
    await manager.redis.hset(manager.core.keys.request("req-3").ctx, "last_seq", "not-a-number")
    results = await asyncio.gather(*(manager.append_tokens(rid, " ok") for rid in ids), return_exceptions=True)
    assert isinstance(results[3], CorruptStateError)
    assert all(not isinstance(r, BaseException) and r.applied for i, r in enumerate(results) if i != 3)
    for rid in ids:
        if rid != "req-3":
            assert (await manager.get_context(rid)).generated_prefix == " ok"
    await manager.aclose()


def test_merge_appends_maps_replies_back_to_each_call():
    from flo_coord.store.core import Cmd, Eval

    batch = [
        Eval(APPEND, ("a1", "a2", "a3", "a4"), ("w", 1, 1, "x", 1)),
        Cmd(("ZCARD", "k")),
        Eval(APPEND, ("b1", "b2", "b3", "b4"), ("w", 1, 1, "y", 1)),
    ]
    merged, unmerge = merge_appends(batch)
    assert [type(c) for c in merged] == [Eval, Cmd]
    assert merged[0].script is APPEND_MANY
    assert merged[0].keys == ("a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4")
    assert merged[0].args == (2, "w", 1, 1, "x", 1, "w", 1, 1, "y", 1)
    assert unmerge([["ra", "rb"], 7]) == ["ra", 7, "rb"]
    error = ConnectionError("gone")
    assert unmerge([error, 7]) == [error, 7, error]


@pytest.mark.parametrize("count", [0, 1])
def test_a_single_append_is_not_merged(count):
    from flo_coord.store.core import Eval

    batch = [Eval(APPEND, ("a1", "a2", "a3", "a4"), ("w", 1, 1, "x", 1))] * count
    merged, unmerge = merge_appends(batch)
    assert merged == batch
    assert unmerge(["r"] * count) == ["r"] * count


async def test_hundreds_of_concurrent_calls_on_a_url_built_client_do_not_fail(redis_server):
    from flo_coord import AsyncFailoverManager, RetryPolicy

    # redis-py's asyncio pool refuses more than 100 connections by default; followers each
    # hold one while blocked, so a client built from a URL must allow many more.
    manager = AsyncFailoverManager(
        url=redis_server.url, namespace="manyconns", worker_id="w", retry=RetryPolicy(deadline=5.0)
    )
    assert manager.redis.connection_pool.max_connections >= 1000
    ids = [f"req-{n}" for n in range(300)]
    for rid in ids:
        await manager.start_tracking(rid, "p")
    # unbatched appends and reads: each holds a connection while in flight
    acks = await asyncio.gather(*(manager.append_direct(rid, " x") for rid in ids))
    contexts = await asyncio.gather(*(manager.get_context(rid) for rid in ids))
    assert all(ack.applied for ack in acks)
    assert all(ctx.generated_prefix == " x" for ctx in contexts)
    await manager.aclose()


async def test_offered_tokens_are_committed_in_order_and_their_futures_resolve(store):
    from flo_coord import ValidationError

    manager = store.async_manager(worker_id="w")
    await manager.start_tracking("req-1", "p")
    futures = [manager.offer_tokens("req-1", f" t{n}") for n in range(50)]
    acks = await asyncio.gather(*futures)
    assert all(ack.applied for ack in acks)
    assert (await manager.get_context("req-1")).generated_prefix == "".join(f" t{n}" for n in range(50))
    assert len({id(f) for f in futures}) < 50  # tokens offered while an append was in flight shared one
    with pytest.raises(ValidationError):
        manager.offer_tokens("req-1", b"bytes")
    with pytest.raises(ValidationError):
        manager.offer_tokens("bad id", "x")
    assert (await manager.get_context("req-1")).token_count == 50
    await manager.aclose()


def test_an_append_whose_reply_was_lost_is_resent_first_under_its_own_seq(store):
    manager = store.manager(worker_id="w")
    manager.start_tracking("req-1", "p")
    manager.append_tokens("req-1", "one ")
    op = manager.core.append_tokens("req-1", "two ")
    manager.shell.execute(next(op))  # Redis applies "two " under seq 2...
    with pytest.raises(ConnectionError):
        op.throw(ConnectionError("reply lost"))  # ...but the reply never arrives: the outcome is unknown
    ack = manager.append_tokens("req-1", "three")
    # "two " was settled first under seq 2 (DUP), so "three" got seq 3 and was not taken for its duplicate
    assert ack is not None and ack.applied and ack.seq == 3
    assert manager.get_context("req-1").generated_prefix == "one two three"
    manager.close()


async def test_a_shared_round_trip_that_failed_leaves_each_append_unknown_and_settled_later(store):
    manager = store.async_manager(worker_id="w")
    ids = ["req-1", "req-2", "req-3"]
    for rid in ids:
        await manager.start_tracking(rid, "p")
    shared = manager.shell.run_batch

    async def applied_but_reply_lost(batch, *args):
        await shared(batch, *args)
        raise CoordinatorUnavailableError("append_tokens", None, ConnectionError("reply lost"))

    manager.shell.run_batch = applied_but_reply_lost
    # the first goes alone at once; the other two share one commit (run_together), whose reply is lost
    results = await asyncio.gather(*(manager.append_tokens(rid, "one ") for rid in ids), return_exceptions=True)
    assert not isinstance(results[0], BaseException)
    for rid, result in zip(ids[1:], results[1:], strict=True):
        assert isinstance(result, CoordinatorUnavailableError) and result.request_id == rid
    manager.shell.run_batch = shared
    await asyncio.gather(*(manager.append_tokens(rid, "two") for rid in ids))
    for rid in ids:
        assert (await manager.get_context(rid)).generated_prefix == "one two"
    await manager.aclose()
