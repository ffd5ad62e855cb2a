"""Cross-process takeover: real redis-server, real worker processes, real signals.

Worker processes are ``tests/procs.py`` children: each has its own FailoverManager and
worker id and answers one command per line, after Redis answered (so an ``append``
reply is that worker's acknowledgement). Every child is killed and reaped in a finally
block (``procs.children``).
"""

from __future__ import annotations

import asyncio
import collections
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from procs import call_all, children, dump_namespace, wait_for

from flo_coord import (
    AsyncReaper,
    FailoverManager,
    HeartbeatTask,
    LeaseLostError,
    Reaper,
    StreamingContext,
    Takeover,
)
from flo_coord.testing.embedded import RedisServer

pytestmark = pytest.mark.timeout(120)


def claim_when_possible(manager: FailoverManager, request_id: str, timeout: float) -> tuple[StreamingContext, float]:
    """Poll ``claim`` until it wins; returns the context and the seconds it took."""
    start = time.monotonic()
    ctx = wait_for(lambda: manager.claim(request_id), timeout, f"a claim of {request_id}", pause=0.01)
    return ctx, time.monotonic() - start


# ------------------------------------------------------------------ kill, freeze


def test_killed_worker_is_taken_over_from_its_last_acknowledged_append(real_store):
    store = real_store
    lease_ttl = 1.0
    heartbeat_interval = lease_ttl / 3
    rid = "req-kill"
    rescuer = store.manager(worker_id="rescuer", lease_ttl=30)
    with children(store.url, store.namespace, ["victim"], lease_ttl=lease_ttl, heartbeat=True) as (victim,):
        epoch = victim.call("start", rid=rid, prompt="Count slowly: ")["ok"]["epoch"]
        acknowledged, last_ack = "", None
        streaming_started = time.monotonic()
        for i in range(30):
            chunk = f"chunk-{i} é{'✓' * (i % 3)} "
            reply = victim.call("append", rid=rid, text=chunk)
            last_ack = reply["ok"]
            acknowledged += chunk
            assert last_ack["applied"] and last_ack["length"] == len(acknowledged.encode())
            time.sleep(0.04)
        # streamed for more than a lease: only the child's heartbeat thread kept the lease alive
        assert time.monotonic() - streaming_started > lease_ttl
        assert rescuer.claim(rid) is None
        assert rescuer.orphans() == []

        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.proc.wait(10)
        ctx, _ = claim_when_possible(rescuer, rid, timeout=lease_ttl + 5)
        took = time.monotonic() - killed_at

    assert took <= lease_ttl + heartbeat_interval + 0.5, f"claimed {took:.2f}s after the kill"
    assert ctx.generated_prefix.encode() == acknowledged.encode()
    assert len(ctx.generated_prefix.encode()) == last_ack["length"]
    assert ctx.token_count == last_ack["token_count"] == 60
    assert ctx.last_seq == last_ack["seq"] == 30
    assert (ctx.owner, ctx.epoch, ctx.prompt, ctx.state, ctx.takeovers) == (
        "rescuer",
        epoch + 1,
        "Count slowly: ",
        "Recovered",
        1,
    )
    assert ctx.continuation_prompt() == "Count slowly: " + acknowledged
    # the new owner continues the numbering
    ack = rescuer.append_tokens(rid, "resumed")
    assert (ack.applied, ack.seq) == (True, 31)
    takeover = rescuer.history()[-1]
    assert isinstance(takeover, Takeover)
    assert (takeover.request_id, takeover.old_owner, takeover.new_owner, takeover.epoch) == (
        rid,
        "victim",
        "rescuer",
        epoch + 1,
    )
    assert takeover.prefix_chars == len(acknowledged)


def test_frozen_worker_loses_its_lease_and_its_late_writes_change_nothing(real_store):
    store = real_store
    rid = "req-freeze"
    rescuer = store.manager(worker_id="rescuer", lease_ttl=30)
    with children(store.url, store.namespace, ["sleeper"], lease_ttl=0.6, heartbeat=True) as (sleeper,):
        epoch = sleeper.call("start", rid=rid)["ok"]["epoch"]
        assert sleeper.call("append", rid=rid, text="before the freeze ")["ok"]["applied"]
        sleeper.signal(signal.SIGSTOP)
        ctx, _ = claim_when_possible(rescuer, rid, timeout=10)
        assert (ctx.owner, ctx.epoch, ctx.generated_prefix) == ("rescuer", epoch + 1, "before the freeze ")
        before = dump_namespace(store.sync_client, store.namespace)
        sleeper.signal(signal.SIGCONT)

        late = sleeper.call("append", rid=rid, text="written after the thaw ")
        assert late["error"] == "LeaseLostError"
        assert (late["current_owner"], late["current_epoch"], late["completed"]) == ("rescuer", epoch + 1, False)
        assert sleeper.call("append", rid=rid, text="again", seq=99)["error"] == "LeaseLostError"
        assert sleeper.call("complete", rid=rid)["error"] == "LeaseLostError"
        assert sleeper.call("heartbeat") == {"ok": 0}
        time.sleep(0.3)  # the thawed heartbeat thread runs too: it must not write either
        assert dump_namespace(store.sync_client, store.namespace) == before
    assert rescuer.get_context(rid).generated_prefix == "before the freeze "


def test_eight_processes_claim_200_orphans_exactly_once(real_store):
    store = real_store
    doomed = store.manager(worker_id="doomed", lease_ttl=0.2)
    rids = [f"orphan-{i}" for i in range(200)]
    for rid in rids:
        doomed.start_tracking(rid, "prompt")
        doomed.append_tokens(rid, f"text of {rid}")
    # the owner stops heartbeating: wait until every lease has run out
    wait_for(lambda: len(store.manager().orphans(1000)) == 200, 10, "200 orphans")
    racer_ids = [f"racer-{i}" for i in range(8)]
    with children(store.url, store.namespace, racer_ids, lease_ttl=60) as racers:
        replies = call_all(racers, "race_claim", timeout=90)
    claims = [
        (racer, rid, epoch) for racer, reply in zip(racer_ids, replies, strict=True) for rid, epoch in reply["ok"]
    ]
    counts = collections.Counter(rid for _, rid, _ in claims)
    assert sorted(counts) == sorted(rids)
    assert set(counts.values()) == {1}, [rid for rid, n in counts.items() if n > 1]
    reader = store.manager()
    for racer, rid, epoch in claims:
        assert epoch == 2
        ctx = reader.get_context(rid)
        assert (ctx.owner, ctx.epoch, ctx.takeovers, ctx.generated_prefix) == (racer, 2, 1, f"text of {rid}")
    assert reader.orphans(1000) == []
    assert reader.stats().takeovers == 100  # the history keeps the newest 100 entries
    with pytest.raises(LeaseLostError):
        doomed.append_tokens(rids[0], "too late")


# ------------------------------------------------------------- idempotency, fencing


def test_duplicate_seq_is_applied_once_and_a_new_owner_continues_the_numbering(store):
    first = store.manager(worker_id="first")
    second = store.manager(worker_id="second")
    first.start_tracking("req-1", "prompt")
    one = first.append_tokens("req-1", "alpha ", seq=1)
    again = first.append_tokens("req-1", "alpha ", seq=1)
    assert (one.applied, again.applied) == (True, False)
    assert (again.seq, again.length, again.token_count) == (1, one.length, one.token_count)
    assert first.get_context("req-1").generated_prefix == "alpha "
    assert first.append_tokens("req-1", "beta ").seq == 2  # auto seq follows explicit ones
    assert first.append_tokens("req-1", "gamma ", seq=5).applied
    stale = first.append_tokens("req-1", "delta ", seq=3)  # at or below the last seq: not applied
    assert (stale.applied, stale.seq) == (False, 3)
    ctx = first.get_context("req-1")
    assert (ctx.generated_prefix, ctx.last_seq, ctx.token_count) == ("alpha beta gamma ", 5, 3)

    first.release("req-1")
    claimed = second.claim("req-1")
    assert (claimed.owner, claimed.epoch, claimed.last_seq) == ("second", ctx.epoch + 1, 5)
    nxt = second.append_tokens("req-1", "epsilon ")
    assert (nxt.applied, nxt.seq) == (True, 6)
    assert second.append_tokens("req-1", "epsilon ", seq=6).applied is False
    with pytest.raises(LeaseLostError):
        first.append_tokens("req-1", "zeta ", seq=7)
    assert second.get_context("req-1").generated_prefix == "alpha beta gamma epsilon "


def test_restarted_process_with_the_same_worker_id_holds_no_epoch(real_store):
    store = real_store
    rid = "req-restart"
    with children(store.url, store.namespace, ["phoenix"], lease_ttl=30) as (old,):
        epoch = old.call("start", rid=rid)["ok"]["epoch"]
        old.call("append", rid=rid, text="from the first life ")
        old.signal(signal.SIGKILL)
    before = dump_namespace(store.sync_client, store.namespace)
    with children(store.url, store.namespace, ["phoenix"], lease_ttl=30) as (new,):
        for command in (
            {"op": "append", "rid": rid, "text": "from the second life"},
            {"op": "append", "rid": rid, "text": "with a seq", "seq": 2},
            {"op": "complete", "rid": rid},
        ):
            reply = new.call(**command)
            assert reply["error"] == "LeaseLostError", reply
            assert (reply["held_epoch"], reply["current_owner"], reply["current_epoch"]) == (0, "phoenix", epoch)
        assert new.call("heartbeat") == {"ok": 0}
    assert dump_namespace(store.sync_client, store.namespace) == before
    assert store.manager().stats().active_contexts == 1  # the refused complete left the index alone


def test_stale_worker_learns_that_the_new_owner_completed_the_request(store):
    stale = store.manager(worker_id="stale", lease_ttl=0.15)
    fresh = store.manager(worker_id="fresh", lease_ttl=30)
    stale.start_tracking("req-1", "prompt")
    stale.append_tokens("req-1", "partial ")
    ctx, _ = claim_when_possible(fresh, "req-1", timeout=5)
    fresh.append_tokens("req-1", "rest")
    assert fresh.complete("req-1") is True
    before = dump_namespace(store.sync_client, store.namespace)
    with pytest.raises(LeaseLostError) as lost:
        stale.complete("req-1")
    assert (lost.value.completed, lost.value.current_owner, lost.value.current_epoch) == (True, "fresh", ctx.epoch)
    with pytest.raises(LeaseLostError) as lost:
        stale.append_tokens("req-1", "late")
    assert (lost.value.completed, lost.value.current_owner, lost.value.current_epoch) == (True, "fresh", ctx.epoch)
    assert "completed by 'fresh'" in str(lost.value)
    assert dump_namespace(store.sync_client, store.namespace) == before
    assert fresh.outcome("req-1").owner == "fresh"


def test_stale_worker_heartbeat_drops_what_it_lost(store):
    stale = store.manager(worker_id="stale", lease_ttl=0.15)
    fresh = store.manager(worker_id="fresh", lease_ttl=30)
    stale.start_tracking("req-1", "prompt")
    stale.start_tracking("req-2", "prompt")
    claim_when_possible(fresh, "req-1", timeout=5)
    assert stale.heartbeat() == 1
    assert stale.held() == ["req-2"]


# --------------------------------------------------------------- heartbeat, reaper


def test_heartbeat_renews_every_held_lease_in_one_call(store):
    manager = store.manager(worker_id="beater", lease_ttl=5)
    other = store.manager(worker_id="other")
    for i in range(3):
        manager.start_tracking(f"req-{i}", "prompt")
    other.start_tracking("not-mine", "prompt")
    before = {i: manager.get_context(f"req-{i}").lease_deadline for i in range(3)}
    time.sleep(0.02)
    assert manager.heartbeat() == 3
    for i in range(3):
        assert manager.get_context(f"req-{i}").lease_deadline > before[i]
    manager.complete("req-0")
    assert manager.heartbeat() == 2
    assert store.manager(worker_id="idle").heartbeat() == 0


def test_heartbeat_thread_keeps_requests_alive_and_stops_cleanly(store):
    lease_ttl = 0.3
    manager = store.manager(worker_id="alive", lease_ttl=lease_ttl)
    rival = store.manager(worker_id="rival", lease_ttl=30)
    manager.start_tracking("req-1", "prompt")
    manager.start_tracking("req-2", "prompt")
    thread = manager.start_heartbeat()
    try:
        deadline = time.monotonic() + 4 * lease_ttl
        while time.monotonic() < deadline:
            assert rival.claim("req-1") is None
            assert rival.orphans() == []
            time.sleep(lease_ttl / 4)
    finally:
        thread.stop()
    assert not thread._thread.is_alive()
    assert sorted(manager.held()) == ["req-1", "req-2"]
    # without the thread, the lease runs out
    ctx, _ = claim_when_possible(rival, "req-1", timeout=5)
    assert ctx.owner == "rival"


async def test_heartbeat_task_keeps_requests_alive_and_stops_cleanly(store):
    lease_ttl = 0.3
    manager = store.async_manager(worker_id="alive", lease_ttl=lease_ttl)
    rival = store.manager(worker_id="rival", lease_ttl=30)
    try:
        await manager.start_tracking("req-1", "prompt")
        task = manager.start_heartbeat()
        try:
            for _ in range(16):
                assert rival.claim("req-1") is None
                await asyncio.sleep(lease_ttl / 4)
        finally:
            await task.stop()
        assert task._task is None
        assert manager.held() == ["req-1"]
        deadline = time.monotonic() + 5
        while rival.claim("req-1") is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await manager.aclose()


async def test_heartbeat_task_stops_even_when_a_tick_swallows_the_cancellation():
    """redis.asyncio can swallow a CancelledError that lands while a command is in flight
    (and return the reply): stop() must end the task all the same."""
    ticks = 0
    in_tick = asyncio.Event()

    class Stubborn:
        lease_ttl = 0.03

        async def heartbeat(self) -> int:
            nonlocal ticks
            ticks += 1
            in_tick.set()
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                await asyncio.sleep(0.01)  # finishes the "command" and returns its reply
            return 0

    task = HeartbeatTask(Stubborn()).start()  # type: ignore[arg-type]
    await asyncio.wait_for(in_tick.wait(), 5)
    await asyncio.wait_for(task.stop(), 5)
    assert task._task is None
    count = ticks
    await asyncio.sleep(0.1)
    assert ticks == count


def _dead_worker_requests(store: Any, count: int) -> dict[str, str]:
    dead = store.manager(worker_id="dead", lease_ttl=0.1)
    texts = {}
    for i in range(count):
        rid = f"req-{i}"
        dead.start_tracking(rid, "prompt")
        texts[rid] = f"text {i} "
        dead.append_tokens(rid, texts[rid])
    return texts


def test_reaper_hands_claimed_contexts_to_its_callback(store):
    texts = _dead_worker_requests(store, 3)
    manager = store.manager(worker_id="reaper", lease_ttl=30)
    got: list[StreamingContext] = []
    lock = threading.Lock()

    def on_claim(ctx: StreamingContext) -> None:
        with lock:
            got.append(ctx)

    with Reaper(manager, on_claim, interval=0.05).start():
        wait_for(lambda: len(got) == 3, 10, "3 claimed contexts")
    assert {c.request_id: c.generated_prefix for c in got} == texts
    assert {(c.owner, c.epoch, c.state) for c in got} == {("reaper", 2, "Recovered")}
    assert sorted(manager.held()) == sorted(texts)
    history = [e for e in manager.history() if isinstance(e, Takeover)]
    assert sorted((e.request_id, e.old_owner, e.new_owner, e.epoch) for e in history) == [
        (rid, "dead", "reaper", 2) for rid in sorted(texts)
    ]
    assert manager.stats().takeovers == 3


async def test_async_reaper_awaits_its_callback(store):
    texts = _dead_worker_requests(store, 3)
    manager = store.async_manager(worker_id="reaper", lease_ttl=30)
    got: list[StreamingContext] = []

    async def on_claim(ctx: StreamingContext) -> None:
        await asyncio.sleep(0)
        got.append(ctx)

    try:
        reaper = AsyncReaper(manager, on_claim, interval=0.05).start()
        try:
            deadline = time.monotonic() + 10
            while len(got) < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        finally:
            await reaper.stop()
        assert {c.request_id: c.generated_prefix for c in got} == texts
        assert {(c.owner, c.epoch) for c in got} == {("reaper", 2)}
        assert (await manager.stats()).takeovers == 3
        history = [e for e in await manager.history() if isinstance(e, Takeover)]
        assert {(e.old_owner, e.new_owner) for e in history} == {("dead", "reaper")}
    finally:
        await manager.aclose()


# -------------------------------------------------------------------- orphans cost


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, so its command statistics count only this test."""
    from conftest import require_redis_server

    require_redis_server()
    with RedisServer() as server:
        yield server


def _command_calls(client: Any) -> dict[str, int]:
    return {name: int(stats["calls"]) for name, stats in client.info("commandstats").items()}


def test_orphans_cost_grows_with_expired_leases_not_with_active_requests(private_redis):
    client = private_redis.client()
    healthy = FailoverManager(redis=client, namespace="cost", worker_id="healthy", lease_ttl=600)
    dying = FailoverManager(redis=client, namespace="cost", worker_id="dying", lease_ttl=0.05)
    for i in range(2000):
        healthy.start_tracking(f"live-{i}", "prompt")
    dead = [f"dead-{i}" for i in range(3)]
    for rid in dead:
        dying.start_tracking(rid, "prompt")
    reaper = FailoverManager(redis=client, namespace="cost", worker_id="reaper")
    wait_for(lambda: len(reaper.orphans()) == 3, 5, "the 3 leases to expire")

    before = _command_calls(client)
    orphans = reaper.orphans()
    after = _command_calls(client)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v and k != "cmdstat_info"}
    assert sorted(orphans) == dead
    assert reaper.stats().active_contexts == 2003
    # one index query plus one confirmation per candidate: 3 candidates, not 2,000
    assert delta["cmdstat_fcall"] == 4, delta  # the scripts run as Redis Functions
    assert delta.get("cmdstat_hmget", 0) == 3, delta
    assert sum(delta.values()) < 20, delta
    client.close()
