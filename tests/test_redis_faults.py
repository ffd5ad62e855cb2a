"""Redis itself misbehaving: clients killed, the server frozen, restarted, or gone for good.

Every test starts its own redis-server processes (flo_coord.testing.embedded) and stops them.
The property checked throughout: the final text holds every acknowledged chunk exactly
once, in order; and when Redis does not come back, every call fails with
CoordinatorUnavailableError within its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
import redis.exceptions as rex
from conftest import require_redis_server

from flo_coord import (
    AsyncFailoverManager,
    CoordinatorUnavailableError,
    FailoverAttempt,
    FailoverManager,
    FailoverResult,
    RetryPolicy,
    ServingBackend,
    StreamState,
)
from flo_coord.errors import ConfigError
from flo_coord.store.connection import MIN_SOCKET_TIMEOUT, connect
from flo_coord.store.retry import is_refusal, is_transient, not_sent
from flo_coord.testing.embedded import RedisServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """One server for the tests that kill clients or pause it (it survives them)."""
    require_redis_server()
    with RedisServer(appendonly=True) as srv:
        yield srv


class ClientKiller(threading.Thread):
    """Kills every normal client connection (but its own) every ``interval`` seconds."""

    def __init__(self, server: RedisServer, interval: float = 0.01) -> None:
        super().__init__(daemon=True, name="client-killer")
        self.server = server
        self.interval = interval
        self.kills = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        with self.server.client(socket_timeout=5) as conn:
            while not self._stop_event.wait(self.interval):
                with contextlib.suppress(rex.RedisError, OSError):
                    self.kills += int(conn.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))

    def __enter__(self) -> ClientKiller:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join(10)


def chunks(n: int, tag: str = "") -> list[str]:
    return [f"<{tag}{i}> " for i in range(n)]


def assert_exact(text: str, acked: list[str]) -> None:
    """Every acknowledged chunk exactly once, in order (nothing else)."""
    assert text == "".join(acked)


# ------------------------------------------------------------------ classification


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (rex.ConnectionError("Connection closed by server."), True),
        (rex.TimeoutError("Timeout reading from socket"), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (rex.BusyLoadingError("LOADING Redis is loading the dataset in memory"), True),
        (rex.ReadOnlyError("READONLY You can't write against a read only replica."), True),
        (rex.ResponseError("BUSY Redis is busy running a script."), True),
        (rex.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"), True),
        (rex.ClusterDownError("CLUSTERDOWN The cluster is down"), True),
        (rex.ResponseError("MASTERDOWN Link with MASTER is down"), True),
        (rex.ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (rex.ResponseError("UNBLOCKED force unblock from blocking operation"), True),
        # look-alikes that must not be retried
        (rex.ResponseError("BUSYGROUP Consumer Group name already exists"), False),
        (rex.ResponseError("BUSYKEY Target key name already exists."), False),
        (rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (rex.NoPermissionError("NOPERM this user has no permissions"), False),
        (rex.AuthenticationError("invalid username-password pair"), False),
        (rex.ResponseError("ERR unknown command"), False),
        (ValueError("x"), False),
    ],
)
def test_transient_classification(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_not_sent_only_for_refusals_and_failed_connects() -> None:
    assert not_sent(rex.ReadOnlyError("READONLY You can't write against a read only replica."))
    assert not_sent(rex.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."))
    assert not_sent(rex.TimeoutError("Timeout connecting to server"))
    assert is_refusal(rex.ResponseError("LOADING Redis is loading"))
    # a reply lost after the command went out: it may have run
    assert not not_sent(rex.ConnectionError("Connection closed by server."))
    assert not not_sent(rex.TimeoutError("Timeout reading from 127.0.0.1:1"))
    assert not not_sent(TimeoutError())


@pytest.mark.parametrize(
    "kwargs",
    [{"deadline": 0}, {"deadline": -1}, {"deadline": float("inf")}, {"initial": 0}, {"deadline": "10"},
     {"maximum": 0.01, "initial": 0.1}, {"deadline": True}],
)  # fmt: skip
def test_retry_policy_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)


def _retries(client: Any) -> int:
    return int(client.connection_pool.connection_kwargs["retry"].get_retries())


def test_client_retries_are_off_on_built_and_given_clients(server: RedisServer) -> None:
    # redis-py 8 retries 10 times by default
    given = redis.Redis(host=server.host, port=server.port, socket_timeout=5)
    assert _retries(given) > 0
    with FailoverManager(redis=given, namespace="retries") as manager:
        assert _retries(manager.redis) == 0
        assert manager.redis.ping()
    with FailoverManager(url=server.url, namespace="retries") as manager:
        assert _retries(manager.redis) == 0
        assert manager.redis.connection_pool.connection_kwargs["socket_timeout"] is not None


async def test_async_client_retries_are_off_with_the_asyncio_retry_class(server: RedisServer) -> None:
    from redis.asyncio.retry import Retry as AsyncRetry

    given = aredis.Redis(host=server.host, port=server.port, socket_timeout=5)
    async with AsyncFailoverManager(redis=given, namespace="retries") as manager:
        retry = manager.redis.connection_pool.connection_kwargs["retry"]
        assert isinstance(retry, AsyncRetry) and retry.get_retries() == 0
        assert await manager.redis.ping()
    async with AsyncFailoverManager(url=server.url, namespace="retries") as manager:
        retry = manager.redis.connection_pool.connection_kwargs["retry"]
        assert isinstance(retry, AsyncRetry) and retry.get_retries() == 0


def test_sync_socket_timeout_follows_a_short_deadline(server: RedisServer) -> None:
    # half the deadline: two attempts on a frozen server still end by the deadline (issue 10)
    with FailoverManager(url=server.url, namespace="t", retry=RetryPolicy(deadline=1.0)) as manager:
        assert manager.redis.connection_pool.connection_kwargs["socket_timeout"] == 0.5
    # a blocking WAIT (durability="replica") keeps room in the socket timeout
    policy = RetryPolicy(deadline=1.0)
    with FailoverManager(url=server.url, namespace="t", retry=policy, durability="replica") as manager:
        assert manager.redis.connection_pool.connection_kwargs["socket_timeout"] == MIN_SOCKET_TIMEOUT
    with FailoverManager(url=server.url, namespace="t", retry=RetryPolicy(deadline=60.0)) as manager:
        assert manager.redis.connection_pool.connection_kwargs["socket_timeout"] == 5.0


def test_wrong_client_kind_is_a_config_error(server: RedisServer) -> None:
    with pytest.raises(ConfigError):
        AsyncFailoverManager(redis=server.client(), namespace="t")
    with pytest.raises(ConfigError):
        FailoverManager(redis=aredis.Redis(host=server.host, port=server.port), namespace="t")
    with pytest.raises(ConfigError):
        FailoverManager(redis=server.client(), namespace="t", durability="disk")


# ------------------------------------------------------------------ clients killed


def test_sync_appends_survive_clients_killed_mid_stream(server: RedisServer) -> None:
    parts = chunks(400)
    with FailoverManager(url=server.url, namespace="kill-sync", worker_id="w1") as manager:
        manager.start_tracking("req-1", "prompt")
        acked: list[str] = []
        with ClientKiller(server) as killer:
            for part in parts:
                ack = manager.append_tokens("req-1", part)
                assert ack is not None
                acked.append(part)
                if len(acked) % 50 == 0:
                    manager.heartbeat()
                    manager.set_state("req-1", StreamState.Streaming)
        assert killer.kills > 0
        ctx = manager.get_context("req-1")
        assert ctx is not None
        assert_exact(ctx.generated_prefix, acked)
        assert ctx.last_seq == len(parts)
        assert manager.complete("req-1")


async def test_async_streams_survive_clients_killed_mid_stream(server: RedisServer) -> None:
    streams = 12
    async with AsyncFailoverManager(url=server.url, namespace="kill-async", worker_id="w1") as manager:
        acked: dict[str, list[str]] = {}

        async def stream(rid: str) -> None:
            await manager.start_tracking(rid, "prompt")
            acked[rid] = []
            for part in chunks(60, rid):
                await manager.append_tokens(rid, part)
                acked[rid].append(part)
            await manager.heartbeat()

        with ClientKiller(server) as killer:
            await asyncio.gather(*(stream(f"req-{i}") for i in range(streams)))
        assert killer.kills > 0
        for rid, parts in acked.items():
            ctx = await manager.get_context(rid)
            assert ctx is not None
            assert_exact(ctx.generated_prefix, parts)
            assert await manager.complete(rid)


def test_history_entries_are_never_duplicated_by_retries(server: RedisServer) -> None:
    """XADD is not idempotent: a lost reply fails the call instead of adding a second entry."""
    with FailoverManager(url=server.url, namespace="kill-history", worker_id="w1") as manager:
        recorded, unknown = [], []
        with ClientKiller(server, interval=0.005) as killer:
            for i in range(300):
                attempt = FailoverAttempt(
                    backend=ServingBackend.Vllm, started_at=time.time(), result=FailoverResult.Success, model=f"m{i}"
                )
                try:
                    manager.record_attempt(attempt)
                    recorded.append(i)
                except CoordinatorUnavailableError as exc:
                    assert exc.operation == "record_attempt"
                    unknown.append(i)
        assert killer.kills > 0
        models = [int(e.model[1:]) for e in manager.history()]  # type: ignore[union-attr]
        assert len(models) == len(set(models)), "a history entry was written twice"
        assert models == sorted(models)
        # the stream keeps the newest 100 entries: every acknowledged one among them is there
        assert {i for i in recorded if i >= models[0]} <= set(models) <= set(recorded) | set(unknown)


# ------------------------------------------------------------------ server frozen


def freeze(server: RedisServer, seconds: float) -> threading.Thread:
    """DEBUG SLEEP ``seconds`` in a thread (a connection whose timeout outlasts the sleep)."""

    def run() -> None:
        with server.client(socket_timeout=seconds + 30) as conn:
            conn.execute_command("DEBUG", "SLEEP", seconds)

    thread = threading.Thread(target=run, daemon=True, name="freeze")
    thread.start()
    time.sleep(0.05)  # let the server take the command before anyone else's
    return thread


class Freezer(threading.Thread):
    """Freezes the server for 0.4 s (DEBUG SLEEP or CLIENT PAUSE ALL) every 0.15 s."""

    def __init__(self, server: RedisServer, how: str) -> None:
        super().__init__(daemon=True, name="freezer")
        self.server = server
        self.how = how
        self.freezes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        with self.server.client(socket_timeout=10) as conn:
            while not self._stop_event.wait(0.15):
                if self.how == "debug-sleep":
                    self.server.pause(0.4).join()
                else:
                    conn.execute_command("CLIENT", "PAUSE", 400, "ALL")
                    time.sleep(0.4)
                self.freezes += 1

    def __enter__(self) -> Freezer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join(10)


@pytest.mark.parametrize("how", ["debug-sleep", "client-pause"])
def test_sync_appends_through_a_frozen_server(server: RedisServer, how: str) -> None:
    # A socket timeout shorter than the freeze: calls time out while Redis may still run
    # them later, so retries meet already-applied appends (acknowledged as DUP).
    client = redis.Redis(host=server.host, port=server.port, socket_timeout=0.15, socket_connect_timeout=0.5)
    with FailoverManager(redis=client, namespace=f"pause-sync-{how}", worker_id="w1") as manager:
        manager.start_tracking("req-1", "prompt")
        acked: list[str] = []
        dups = 0
        with Freezer(server, how) as freezer:
            for part in chunks(100_000):
                ack = manager.append_tokens("req-1", part)
                assert ack is not None
                dups += not ack.applied
                acked.append(part)
                if freezer.freezes >= 3:
                    break
                time.sleep(0.002)
        assert freezer.freezes >= 3
        print(f"{dups} appends were acknowledged as already applied (DUP) after a timed-out attempt")
        ctx = manager.get_context("req-1")
        assert ctx is not None
        assert_exact(ctx.generated_prefix, acked)
        assert manager.complete("req-1")


@pytest.mark.parametrize("how", ["debug-sleep", "client-pause"])
async def test_async_appends_through_a_frozen_server(server: RedisServer, how: str) -> None:
    client = aredis.Redis(host=server.host, port=server.port, socket_timeout=0.15, socket_connect_timeout=0.5)
    async with AsyncFailoverManager(redis=client, namespace=f"pause-async-{how}", worker_id="w1") as manager:
        acked: dict[str, list[str]] = {}

        async def stream(rid: str, freezer: Freezer) -> None:
            await manager.start_tracking(rid, "prompt")
            acked[rid] = []
            for part in chunks(100_000, rid):
                await manager.append_tokens(rid, part)
                acked[rid].append(part)
                if freezer.freezes >= 3:
                    break
                await asyncio.sleep(0.002)

        with Freezer(server, how) as freezer:
            await asyncio.gather(*(stream(f"req-{i}", freezer) for i in range(8)))
        for rid, parts in acked.items():
            ctx = await manager.get_context(rid)
            assert ctx is not None
            assert_exact(ctx.generated_prefix, parts)


# ------------------------------------------------------------------ restarts


async def test_aof_restart_in_the_middle_of_50_async_streams() -> None:
    require_redis_server()
    with RedisServer(appendonly=True) as srv:
        async with AsyncFailoverManager(url=srv.url, namespace="aof", worker_id="w1", lease_ttl=30) as manager:
            acked: dict[str, list[str]] = {}
            before_restart: dict[str, int] = {}
            restarted = asyncio.Event()
            halfway = asyncio.Event()
            progress = 0

            async def stream(rid: str) -> None:
                nonlocal progress
                await manager.start_tracking(rid, f"prompt {rid}")
                acked[rid] = []
                for part in chunks(40, rid):
                    await manager.append_tokens(rid, part)
                    acked[rid].append(part)
                    progress += 1
                    if progress == 50 * 15:
                        halfway.set()
                    if not restarted.is_set():
                        await asyncio.sleep(0.005)
                assert await manager.complete(rid)

            async def crash() -> None:
                await halfway.wait()
                before_restart.update({rid: len("".join(parts)) for rid, parts in acked.items()})
                await asyncio.to_thread(srv.kill)  # SIGKILL: only the AOF survives
                await asyncio.sleep(0.3)
                await asyncio.to_thread(srv.restart)
                restarted.set()

            await asyncio.gather(crash(), *(stream(f"req-{i:02d}") for i in range(50)))
            assert restarted.is_set() and len(before_restart) == 50
            assert sum(before_restart.values()) > 0
            assert sum(len("".join(p)) for p in acked.values()) > sum(before_restart.values())  # went on after
            for rid, parts in acked.items():
                outcome = await manager.outcome(rid)
                assert outcome is not None and outcome.state == "Completed"
                text = (await manager.redis.get(manager.core.keys.request(rid).text)).decode()
                assert_exact(text, parts)
                assert len(text) >= before_restart[rid]  # nothing acknowledged before the crash was lost


def test_scripts_survive_script_flush_and_restart() -> None:
    require_redis_server()
    with (
        RedisServer(appendonly=True) as srv,
        FailoverManager(url=srv.url, namespace="flush", worker_id="w1") as manager,
    ):
        manager.start_tracking("req-1", "prompt")
        manager.append_tokens("req-1", "one ")
        srv.client().function_flush()  # the library workers FCALL
        srv.client().script_flush()
        manager.append_tokens("req-1", "two ")
        srv.restart()  # graceful: AOF reloaded, script cache empty
        manager.append_tokens("req-1", "three ")
        assert manager.heartbeat() == 1
        ctx = manager.get_context("req-1")
        assert ctx is not None and ctx.generated_prefix == "one two three "
        srv.client().function_flush()  # the library workers FCALL
        srv.client().script_flush()
        assert manager.complete("req-1")


async def test_async_scripts_survive_script_flush() -> None:
    require_redis_server()
    with RedisServer() as srv:
        async with AsyncFailoverManager(url=srv.url, namespace="flush", worker_id="w1") as manager:
            await manager.start_tracking("req-1", "prompt")
            await manager.append_tokens("req-1", "one ")
            srv.client().function_flush()  # the library workers FCALL
            srv.client().script_flush()
            await manager.append_tokens("req-1", "two ")
            srv.client().function_flush()  # the library workers FCALL
            srv.client().script_flush()
            ctx = await manager.get_context("req-1")
            assert ctx is not None and ctx.generated_prefix == "one two "


# ------------------------------------------------------------------ gone for good

DEADLINE = 0.5
#: Generous slack over the deadline: one sync socket timeout plus scheduling noise.
SLACK = MIN_SOCKET_TIMEOUT + 2.0

SYNC_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], str | None]] = [
    ("start_tracking", ("req-new", "prompt"), {}, "req-new"),
    ("append_tokens", ("req-1", "more"), {}, "req-1"),
    ("append_tokens", ("req-1", "more"), {"seq": 99}, "req-1"),
    ("complete", ("req-1",), {}, "req-1"),
    ("fail", ("req-1", "boom"), {}, "req-1"),
    ("release", ("req-1",), {}, "req-1"),
    ("get_context", ("req-1",), {}, "req-1"),
    ("outcome", ("req-1",), {}, "req-1"),
    ("should_failover", ("req-1",), {}, "req-1"),
    ("next_backend_for", ("req-1",), {}, "req-1"),
    ("mark_backend_failed", ("req-1", ServingBackend.Vllm), {}, "req-1"),
    ("set_state", ("req-1", StreamState.Streaming), {}, "req-1"),
    ("set_current_backend", ("req-1", ServingBackend.Groq), {}, "req-1"),
    ("set_usage", ("req-1", {"completion_tokens": 3}), {}, "req-1"),
    ("prepare_failover", ("req-1",), {}, "req-1"),
    ("history", (), {}, None),
    ("stats", (), {}, None),
    ("heartbeat", (), {}, None),
    ("orphans", (), {}, None),
    ("claim", ("req-1",), {}, "req-1"),
    ("claim_orphans", (), {}, None),
    ("active_requests", (), {}, None),
]


#: Public methods that do no Redis I/O (or only start a background task / close).
NO_IO = {
    "close",
    "aclose",
    "config",
    "held",
    "next_backend",
    "start_heartbeat",
    "with_defaults",
    # the async store's local state (store/surface.py)
    "attach_stores",
    "forget",
    "holding",
    "register_deployments",
}


def _public_io_methods(cls: type) -> set[str]:
    import inspect

    return {n for n, f in inspect.getmembers(cls) if not n.startswith("_") and callable(f)} - NO_IO


def _attempt() -> FailoverAttempt:
    return FailoverAttempt(backend=ServingBackend.Vllm, started_at=time.time(), request_id="req-1")


def test_every_sync_call_fails_within_its_deadline_when_redis_is_gone() -> None:
    require_redis_server()
    srv = RedisServer().start()
    try:
        manager = FailoverManager(url=srv.url, namespace="gone", worker_id="w1", retry=RetryPolicy(deadline=DEADLINE))
        manager.start_tracking("req-1", "prompt")
        manager.append_tokens("req-1", "x")
    finally:
        srv.stop()

    def call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            getattr(manager, name)(*args, **kwargs)
        except Exception as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    calls = [*SYNC_CALLS, ("record_attempt", (_attempt(),), {}, "req-1")]
    assert {c[0] for c in calls} == _public_io_methods(FailoverManager)  # every public call is covered
    # all at once (each has its own deadline), so the test takes one deadline, not 21
    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(lambda c: call(*c[:3]), calls))
    for (name, _, _, rid), (error, elapsed) in zip(calls, results, strict=True):
        assert isinstance(error, CoordinatorUnavailableError), f"{name} raised {error!r}"
        assert elapsed < DEADLINE + SLACK, f"{name} took {elapsed:.2f}s"
        assert error.operation == name
        assert error.request_id == rid
        assert rid is None or repr(rid) in str(error)
    manager.close()


async def test_every_async_call_fails_within_its_deadline_when_redis_is_gone() -> None:
    require_redis_server()
    srv = RedisServer().start()
    try:
        manager = AsyncFailoverManager(
            url=srv.url, namespace="gone", worker_id="w1", retry=RetryPolicy(deadline=DEADLINE)
        )
        await manager.start_tracking("req-1", "prompt")
        await manager.append_tokens("req-1", "x")
    finally:
        srv.stop()

    async def call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            await getattr(manager, name)(*args, **kwargs)
        except Exception as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    calls = [
        *SYNC_CALLS,
        ("record_attempt", (_attempt(),), {}, "req-1"),
        ("append_direct", ("req-1", "y"), {}, "req-1"),
        ("offer_tokens", ("req-1", "z"), {}, "req-1"),
        # the async store's operations for the layers above (store/surface.py)
        ("start_new", ("req-2", "prompt"), {}, "req-2"),
        ("reject", ("req-1", "poison"), {"kind": "PoisonRequestError"}, "req-1"),
        ("set_model_group", ("req-1", "m"), {}, "req-1"),
        ("cancel", ("req-1",), {}, "req-1"),
        ("cancel_flags", (["req-1"],), {}, None),
        ("follow_read", ("req-1", 0), {}, "req-1"),
        ("wait_feed", ("req-1", "0-0", 10), {}, "req-1"),
        ("committed_text", ("req-1",), {}, "req-1"),
        ("history_from", (), {}, None),
        ("server_time", (), {}, None),
        ("ping", (), {}, None),
    ]
    assert {c[0] for c in calls} == _public_io_methods(AsyncFailoverManager)
    results = await asyncio.gather(*(call(*c[:3]) for c in calls))
    for (name, _, _, rid), (error, elapsed) in zip(calls, results, strict=True):
        assert isinstance(error, CoordinatorUnavailableError), f"{name} raised {error!r}"
        # asyncio attempts are cut at the deadline itself
        assert elapsed < DEADLINE + 1.5, f"{name} took {elapsed:.2f}s"
        # appends through the batcher may be named after its internal step
        appends = ("append_tokens", "append_direct", "offer_tokens")
        expected = {"append_tokens", "append"} if name in appends else {name}
        assert error.operation in expected
        # appends share round trips across requests, so the batcher's error may name no request
        assert error.request_id in (rid, None)
    await manager.aclose()


async def test_every_sub_store_call_fails_within_its_deadline_when_redis_is_gone() -> None:
    """The operations of the layers above the store (breakers, in-flight counts, capability
    memory, queue, gateway) fail typed and in time like every manager call."""
    from flo_coord.store import Presentation, Submission

    require_redis_server()
    srv = RedisServer().start()
    manager = AsyncFailoverManager(url=srv.url, namespace="gone", worker_id="w1", retry=RetryPolicy(deadline=DEADLINE))
    srv.stop()
    shape = Presentation(object="chat.completion", model="m", created=0)
    calls = {
        "breakers.allow": manager.breakers.allow("Vllm", "w1/r", probe_ttl=1.0),
        "breakers.allow_each": manager.breakers.allow_each(["Vllm", "Groq"], "w1/r", probe_ttl=1.0),
        "breakers.record": manager.breakers.record("Vllm", False, threshold=3, window=1.0, cooldown=1.0),
        "inflight.pick": manager.inflight.pick([("a", 1.0)], "w1/r"),
        "inflight.pick_if_allowed": manager.inflight.pick_if_allowed("a", 1.0, "w1/r", probe_ttl=1.0),
        "inflight.release": manager.inflight.release("a", "w1/r"),
        "inflight.renew": manager.inflight.renew({"w1/r": "a"}),
        "inflight.counts": manager.inflight.counts(["a"]),
        "capabilities.remember_missing": manager.capabilities.remember_missing("Vllm", "prefill", 1.0),
        "capabilities.missing": manager.capabilities.missing([("Vllm", "prefill")]),
        "queue.submit": manager.queue.submit(Submission(request_id="req-9", prompt="hi")),
        "queue.ensure_group": manager.queue.ensure_group(),
        "queue.take": manager.queue.take(1, 10),
        "queue.reclaim": manager.queue.reclaim(1000, 1),
        "queue.ack": manager.queue.ack("1-0"),
        "gateway.claim_idempotency": manager.gateway.claim_idempotency("k", "h", "req-9", 1.0),
        "gateway.save_presentation": manager.gateway.save_presentation("req-9", shape, 1.0),
        "gateway.load_presentation": manager.gateway.load_presentation("req-9"),
        "gateway.committed_length": manager.gateway.committed_length("req-9"),
    }

    async def timed(call: Any) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            await call
        except Exception as exc:
            return exc, time.monotonic() - started
        return None, time.monotonic() - started

    results = await asyncio.gather(*(timed(c) for c in calls.values()))
    for name, (error, elapsed) in zip(calls, results, strict=True):
        assert isinstance(error, CoordinatorUnavailableError), f"{name} raised {error!r}"
        assert elapsed < DEADLINE + 1.5, f"{name} took {elapsed:.2f}s"
    await manager.aclose()


def test_a_frozen_server_cannot_hold_a_sync_call_far_past_its_deadline(server: RedisServer) -> None:
    with FailoverManager(url=server.url, namespace="frozen", retry=RetryPolicy(deadline=DEADLINE)) as manager:
        manager.start_tracking("req-1", "prompt")
        frozen = freeze(server, DEADLINE + MIN_SOCKET_TIMEOUT + 0.5)
        try:
            started = time.monotonic()
            with pytest.raises(CoordinatorUnavailableError):
                manager.append_tokens("req-1", "x")
            elapsed = time.monotonic() - started
            assert elapsed < DEADLINE + SLACK, f"append took {elapsed:.2f}s"
        finally:
            frozen.join(30)


async def test_a_frozen_server_cannot_hold_an_async_call_past_its_deadline(server: RedisServer) -> None:
    # a user-supplied client with a long socket timeout: the shell's own cut still holds
    client = aredis.Redis(host=server.host, port=server.port, socket_timeout=30)
    async with AsyncFailoverManager(redis=client, namespace="frozen", retry=RetryPolicy(deadline=DEADLINE)) as manager:
        await manager.start_tracking("req-1", "prompt")
        frozen = freeze(server, DEADLINE + 1.0)
        try:
            started = time.monotonic()
            with pytest.raises(CoordinatorUnavailableError):
                await manager.get_context("req-1")
            elapsed = time.monotonic() - started
            assert elapsed < DEADLINE + 1.5, f"get_context took {elapsed:.2f}s"
        finally:
            await asyncio.to_thread(frozen.join, 30)


def test_connect_rejects_bad_urls() -> None:
    for url in ("http://x:1", "redis+sentinel://h:1", "redis+cluster://h:x", "redis://h:1/notadb", 5):
        with pytest.raises(ConfigError):
            connect(url)  # type: ignore[arg-type]


def _unknown_outcome_setup(server: RedisServer) -> threading.Thread:
    """Freeze the server past the caller's deadline: the append in flight runs afterwards."""
    return freeze(server, 1.5)


def test_an_append_with_an_unknown_outcome_never_shadows_the_next(server: RedisServer) -> None:
    client = redis.Redis(host=server.host, port=server.port, socket_timeout=0.3, socket_connect_timeout=0.3)
    with FailoverManager(redis=client, namespace="unknown-sync", retry=RetryPolicy(deadline=0.5)) as manager:
        manager.start_tracking("req-1", "prompt")
        manager.append_tokens("req-1", "one ")
        frozen = _unknown_outcome_setup(server)
        with pytest.raises(CoordinatorUnavailableError):
            manager.append_tokens("req-1", "two ")  # Redis runs it once it wakes up
        frozen.join(30)
        ack = manager.append_tokens("req-1", "three")
        assert ack is not None and ack.applied
        # "two " is there exactly once (it was applied, or re-sent under its own seq)
        assert manager.get_context("req-1").generated_prefix == "one two three"  # type: ignore[union-attr]


async def test_an_async_append_with_an_unknown_outcome_never_shadows_the_next(server: RedisServer) -> None:
    client = aredis.Redis(host=server.host, port=server.port, socket_timeout=0.3, socket_connect_timeout=0.3)
    retry = RetryPolicy(deadline=0.5)
    async with AsyncFailoverManager(redis=client, namespace="unknown-async", retry=retry) as manager:
        await manager.start_tracking("req-1", "prompt")
        await manager.append_tokens("req-1", "one ")
        frozen = _unknown_outcome_setup(server)
        with pytest.raises(CoordinatorUnavailableError) as caught:
            await manager.append_tokens("req-1", "two ")
        assert caught.value.request_id == "req-1"
        await asyncio.to_thread(frozen.join, 30)
        ack = await manager.append_tokens("req-1", "three")
        assert ack is not None
        assert (await manager.get_context("req-1")).generated_prefix == "one two three"  # type: ignore[union-attr]
