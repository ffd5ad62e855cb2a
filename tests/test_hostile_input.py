"""Hostile input: fuzzed arguments, limits, and foreign or corrupt data in Redis.

- Every public entry point of FailoverManager (and some of AsyncFailoverManager), given
  arbitrary strings, bytes, ints, floats, None and huge values, raises nothing but
  ``FloCoordError`` subclasses, and leaves another request of the namespace untouched.
- Limit violations raise ``ValidationError`` before anything is sent to Redis.
- A key of one request holding foreign data yields ``CorruptStateError`` for that request
  only; stats, history and the other requests keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from conftest import require_redis_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flo_coord import (
    AsyncFailoverManager,
    ChatMessage,
    ConfigError,
    CorruptStateError,
    FailoverAttempt,
    FailoverConfig,
    FailoverManager,
    FailoverResult,
    FloCoordError,
    Limits,
    RetryPolicy,
    ServingBackend,
    StreamState,
    ValidationError,
)
from flo_coord.testing.embedded import RedisServer

pytestmark = pytest.mark.timeout(300)

VICTIM = "victim-request"
NS = "hostile"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def victim(server: RedisServer) -> Iterator[Callable[[], tuple[Any, ...]]]:
    """A request owned by another worker in the fuzzed namespace, and a snapshot of it."""
    with FailoverManager(url=server.url, namespace=NS, worker_id="owner", lease_ttl=3600) as owner:
        owner.start_tracking(VICTIM, "the victim's prompt", messages=None)
        owner.append_tokens(VICTIM, "untouchable ")
        owner.append_tokens(VICTIM, "text")
        raw = server.client()
        keys = owner.core.keys.request(VICTIM)

        def snapshot() -> tuple[Any, ...]:
            return (
                raw.hgetall(keys.ctx),
                raw.get(keys.text),
                raw.hgetall(keys.result),
                raw.zscore(owner.core.keys.active, VICTIM),
            )

        yield snapshot


@pytest.fixture(scope="module")
def fuzzed(server: RedisServer) -> Iterator[FailoverManager]:
    with FailoverManager(url=server.url, namespace=NS, worker_id="fuzzer", lease_ttl=0.5) as manager:
        yield manager


# ------------------------------------------------------------------ strategies

BIG_PROMPT = "p" * ((1 << 20) + 1)
BIG_CHUNK = "c" * ((64 << 10) + 1)

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63),
    st.integers(max_value=-(2**63)),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from([BIG_PROMPT, BIG_CHUNK, "\ud800", "{tag}", "a b", "x" * 10_000, "\x00", "é" * 40_000]),
    st.builds(object),
)
valid_ids = st.from_regex(r"[A-Za-z0-9_.:@/+=-]{1,24}", fullmatch=True).filter(lambda s: s != VICTIM)
ids = st.one_of(valid_ids, junk)
texts = st.one_of(st.text(max_size=200), junk)
backends = st.one_of(st.sampled_from(list(ServingBackend)), st.sampled_from([b.value for b in ServingBackend]), junk)
states = st.one_of(
    st.sampled_from([StreamState.Pending, StreamState.Streaming, StreamState.Completed, StreamState.Recovered]),
    st.builds(StreamState.Failed, st.text(max_size=50)),
    junk,
)
counts = st.one_of(st.integers(min_value=-5, max_value=200_000), junk)
results = st.one_of(
    st.none(),
    st.sampled_from([FailoverResult.Success, FailoverResult.Timeout, FailoverResult.NoBackendsAvailable]),
    st.builds(FailoverResult.BackendError, st.text(max_size=30)),
    junk,
)
attempts = st.one_of(
    st.builds(
        FailoverAttempt,
        backend=backends,
        started_at=st.one_of(st.floats(), junk),
        result=results,
        request_id=st.one_of(st.none(), ids),
        worker_id=st.one_of(st.none(), ids),
        model=st.one_of(st.none(), texts),
        tokens=st.one_of(st.integers(), junk),
        usage=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), junk),
    ),
    junk,
)
messages = st.one_of(
    st.none(),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"role": texts, "content": texts}),
            st.builds(ChatMessage, st.text(max_size=10), st.text(max_size=50)),
            junk,
        ),
        max_size=4,
    ),
    junk,
)


def calls(manager: Any) -> st.SearchStrategy[tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]]:
    """One public call of ``manager`` with fuzzed arguments."""
    m = manager
    return st.one_of(
        st.tuples(
            st.just("start_tracking"),
            st.just(m.start_tracking),
            st.tuples(ids, texts, st.one_of(st.none(), backends)),
            st.fixed_dictionaries({}, optional={"messages": messages, "max_tokens": st.one_of(st.none(), counts)}),
        ),
        st.tuples(
            st.just("append_tokens"),
            st.just(m.append_tokens),
            st.tuples(ids, texts),
            st.fixed_dictionaries({}, optional={"seq": st.one_of(st.none(), counts)}),
        ),
        st.tuples(
            st.just("complete"),
            st.just(m.complete),
            st.tuples(ids),
            st.fixed_dictionaries({}, optional={"backend": texts, "model": texts}),
        ),
        st.tuples(
            st.just("fail"),
            st.just(m.fail),
            st.tuples(ids, texts),
            st.fixed_dictionaries({}, optional={"kind": texts}),
        ),
        *(
            st.tuples(st.just(name), st.just(getattr(m, name)), st.tuples(ids), st.just({}))
            for name in (
                "release",
                "get_context",
                "outcome",
                "should_failover",
                "next_backend_for",
                "prepare_failover",
                "claim",
            )
        ),
        st.tuples(
            st.just("mark_backend_failed"), st.just(m.mark_backend_failed), st.tuples(ids, backends), st.just({})
        ),
        st.tuples(st.just("set_state"), st.just(m.set_state), st.tuples(ids, states), st.just({})),
        st.tuples(st.just("record_attempt"), st.just(m.record_attempt), st.tuples(attempts), st.just({})),
        *(
            st.tuples(st.just(name), st.just(getattr(m, name)), st.one_of(st.just(()), st.tuples(counts)), st.just({}))
            for name in ("history", "orphans", "claim_orphans", "active_requests")
        ),
        st.tuples(st.just("next_backend"), st.just(m.next_backend), st.tuples(backends), st.just({})),
        st.tuples(st.just("heartbeat"), st.just(m.heartbeat), st.just(()), st.just({})),
        st.tuples(st.just("stats"), st.just(m.stats), st.just(()), st.just({})),
    )


def only_flo_errors(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except FloCoordError:
        return None


# ------------------------------------------------------------------ fuzzing


def test_fuzzed_calls_raise_only_flo_errors_and_leave_others_alone(
    fuzzed: FailoverManager, victim: Callable[[], tuple[Any, ...]]
) -> None:
    before = victim()

    @FUZZ
    @given(st.data())
    def run(data: st.DataObject) -> None:
        for _ in range(3):  # short sequences, so later calls meet state earlier ones made
            _, fn, args, kwargs = data.draw(calls(fuzzed))
            only_flo_errors(fn, *args, **kwargs)
        assert victim() == before

    run()
    assert victim() == before


@FUZZ
@given(
    namespace=st.one_of(st.just(NS), ids),
    worker_id=st.one_of(st.none(), ids),
    lease_ttl=st.one_of(st.just(5.0), st.floats(), junk),
    max_age=st.one_of(st.just(60.0), junk),
    retention=st.one_of(st.just(60.0), junk),
    limits=st.one_of(st.none(), st.builds(Limits), junk),
    retry=st.one_of(st.none(), st.builds(RetryPolicy), junk),
    durability=st.one_of(st.sampled_from(["primary", "replica"]), junk),
    config=st.one_of(st.none(), st.builds(FailoverConfig), junk),
)
def test_fuzzed_constructor_raises_only_flo_errors(server: RedisServer, **kwargs: Any) -> None:
    client = redis.Redis(host=server.host, port=server.port, socket_timeout=5)
    config = kwargs.pop("config")
    manager = only_flo_errors(FailoverManager, config, redis=client, **kwargs)
    if manager is not None:
        manager.close()
    client.close()


@FUZZ
@given(
    namespace=st.one_of(st.just(NS), junk),
    worker_id=st.one_of(st.none(), junk),
    limits=st.one_of(st.none(), junk),
    retry=st.one_of(st.none(), junk),
    durability=st.one_of(st.just("primary"), junk),
)
def test_fuzzed_url_and_config_values(**kwargs: Any) -> None:
    # a URL that is never reached: construction alone must only raise FloCoordError
    for url in ("redis://127.0.0.1:1/0", "redis+cluster://", "nonsense", "redis://h:notaport"):
        manager = only_flo_errors(FailoverManager, url=url, **kwargs)
        if manager is not None:
            manager.close()


def test_fuzzed_async_calls_raise_only_flo_errors(server: RedisServer, victim: Callable[[], tuple[Any, ...]]) -> None:
    before = victim()

    async def one(data: st.DataObject) -> None:
        async with AsyncFailoverManager(url=server.url, namespace=NS, worker_id="afuzz", lease_ttl=0.5) as m:
            draws = [
                (m.start_tracking, (data.draw(ids), data.draw(texts)), {}),
                (m.append_tokens, (data.draw(ids), data.draw(texts)), {"seq": data.draw(st.one_of(st.none(), counts))}),
                (m.append_tokens, (data.draw(ids), data.draw(texts)), {}),
                (m.get_context, (data.draw(ids),), {}),
                (m.claim, (data.draw(ids),), {}),
                (m.complete, (data.draw(ids),), {}),
                (m.history, (data.draw(counts),), {}),
                (m.record_attempt, (data.draw(attempts),), {}),
            ]
            for fn, args, kwargs in draws:
                with contextlib.suppress(FloCoordError):
                    await fn(*args, **kwargs)
            # concurrent appends through the batcher, one of them hostile
            rid, hostile = data.draw(valid_ids), data.draw(texts)
            try:
                await m.start_tracking(rid, "p")
                await asyncio.gather(m.append_tokens(rid, "fine "), m.append_tokens(rid, hostile))
            except FloCoordError:
                pass

    @settings(FUZZ, max_examples=30)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        asyncio.run(one(data))
        assert victim() == before

    run()


# ------------------------------------------------------------------ limits before Redis


class Untouchable:
    """A client whose every command fails the test: validation must come first."""

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("touched Redis with invalid input")

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("touched Redis with invalid input")

    def script_load(self, *args: Any) -> Any:
        raise AssertionError("touched Redis with invalid input")

    def close(self) -> None:
        pass


TIGHT = Limits(max_request_id_length=8, max_prompt_bytes=32, max_chunk_bytes=8, max_messages=2, max_label_bytes=10)


@pytest.mark.parametrize(
    ("method", "args", "kwargs"),
    [
        ("start_tracking", ("toolong-id", "p"), {}),
        ("start_tracking", ("a b", "p"), {}),
        ("start_tracking", ("{tag}", "p"), {}),
        ("start_tracking", ("", "p"), {}),
        ("start_tracking", ("é", "p"), {}),
        ("start_tracking", (b"bytes", "p"), {}),
        ("start_tracking", ("r1", "x" * 33), {}),
        ("start_tracking", ("r1", "é" * 17), {}),  # 34 bytes in 17 characters
        ("start_tracking", ("r1", "\ud800"), {}),
        ("start_tracking", ("r1", None), {"messages": [{"role": "u", "content": "x"}] * 3}),
        ("start_tracking", ("r1", None), {"messages": [{"role": "u", "content": "x" * 20}] * 2}),
        ("start_tracking", ("r1", "p"), {"max_tokens": 0}),
        ("start_tracking", ("r1", "p", "NoSuchBackend"), {}),
        ("append_tokens", ("r1", "123456789"), {}),
        ("append_tokens", ("r1", 5), {}),
        ("append_tokens", ("r1", "ok"), {"seq": 0}),
        ("append_tokens", ("r1", "ok"), {"seq": True}),
        ("append_tokens", ("r1", "ok"), {"seq": 2**60}),
        ("fail", ("r1", "123456789"), {}),
        ("get_context", (None,), {}),
        ("history", (0,), {}),
        ("history", (10**9,), {}),
        ("orphans", (-1,), {}),
        ("claim_orphans", ("10",), {}),
        ("active_requests", (1.5,), {}),
        ("set_state", ("r1", "Streaming"), {}),
        ("mark_backend_failed", ("r1", "Nope"), {}),
        ("record_attempt", ("not an attempt",), {}),
    ],
)
def test_limit_violations_raise_before_touching_redis(method: str, args: tuple[Any, ...], kwargs: dict) -> None:
    manager = FailoverManager(redis=Untouchable(), namespace="n", worker_id="w", limits=TIGHT)
    with pytest.raises(ValidationError):
        getattr(manager, method)(*args, **kwargs)


def test_labels_are_limited_too() -> None:
    manager = FailoverManager(redis=Untouchable(), namespace="n", worker_id="w", limits=TIGHT)
    for kwargs in ({"backend": "b" * 11}, {"model": "m" * 11}, {"backend": 5}):
        with pytest.raises(ValidationError):
            manager.complete("r1", **kwargs)
    with pytest.raises(ValidationError):
        manager.fail("r1", "why", kind="k" * 11)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"namespace": "has:colon"},
        {"namespace": "x" * 65},
        {"namespace": "*"},
        {"namespace": ""},
        {"worker_id": "w w"},
        {"worker_id": "w" * 129},
        {"lease_ttl": 0},
        {"lease_ttl": float("nan")},
        {"lease_ttl": 1e300},
        {"max_age": -1},
        {"retention": True},
        {"limits": Limits()},  # fine
    ],
)
def test_configuration_violations(kwargs: dict[str, Any]) -> None:
    if "limits" in kwargs:
        FailoverManager(redis=Untouchable(), **kwargs)
        return
    with pytest.raises(ValidationError):
        FailoverManager(redis=Untouchable(), **kwargs)


@pytest.mark.parametrize("field", ["max_request_id_length", "max_prompt_bytes", "max_chunk_bytes", "max_messages"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "10", True, 2**40])
def test_limits_themselves_are_validated(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        Limits(**{field: value})


def test_limits_are_configurable(server: RedisServer) -> None:
    roomy = Limits(max_request_id_length=300, max_chunk_bytes=200_000)
    with FailoverManager(url=server.url, namespace="roomy", limits=roomy) as manager:
        rid = "r" * 300
        manager.start_tracking(rid, "p")
        manager.append_tokens(rid, "x" * 150_000)
        assert len(manager.get_context(rid).generated_prefix) == 150_000  # type: ignore[union-attr]


def test_invalid_input_sends_no_command(server: RedisServer, fuzzed: FailoverManager) -> None:
    raw = server.client()
    raw.ping()  # connect first: the handshake is counted too

    def commands() -> dict[str, int]:
        stats = raw.info("commandstats")
        return {k: int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info",)}

    before = commands()
    for call in (
        lambda: fuzzed.append_tokens("r1", "c" * ((64 << 10) + 1)),
        lambda: fuzzed.start_tracking("bad id", "p"),
        lambda: fuzzed.get_context(""),
        lambda: fuzzed.history(-3),
        lambda: fuzzed.complete("r1", model="m" * 1000),
    ):
        with pytest.raises(ValidationError):
            call()
    assert commands() == before


# ------------------------------------------------------------------ corrupt data


@pytest.fixture
def corrupt_env(server: RedisServer) -> Iterator[tuple[FailoverManager, FailoverManager, redis.Redis, str]]:
    namespace = f"corrupt{uuid.uuid4().hex[:6]}"
    raw = server.client()
    with (
        FailoverManager(url=server.url, namespace=namespace, worker_id="w1", lease_ttl=0.3) as worker,
        FailoverManager(url=server.url, namespace=namespace, worker_id="w2", lease_ttl=30) as other,
    ):
        yield worker, other, raw, namespace


CORRUPTIONS: dict[str, Callable[[redis.Redis, str], Any]] = {
    "epoch is not a number": lambda r, k: r.hset(f"{k}:ctx", "epoch", "abc"),
    "token_count is not a number": lambda r, k: r.hset(f"{k}:ctx", "token_count", "x"),
    "last_seq is not a number": lambda r, k: r.hset(f"{k}:ctx", "last_seq", "x"),
    "lease is not a number": lambda r, k: r.hset(f"{k}:ctx", "lease", "soon"),
    "created is not a number": lambda r, k: r.hset(f"{k}:ctx", "created", "yesterday"),
    "messages are not JSON": lambda r, k: r.hset(f"{k}:ctx", "messages", "{not json"),
    "owner field missing": lambda r, k: r.hdel(f"{k}:ctx", "owner", "epoch"),
    "ctx is a string": lambda r, k: (r.delete(f"{k}:ctx"), r.set(f"{k}:ctx", "hello")),
    "ctx is a list": lambda r, k: (r.delete(f"{k}:ctx"), r.rpush(f"{k}:ctx", "a")),
    "text is a hash": lambda r, k: (r.delete(f"{k}:text"), r.hset(f"{k}:text", "a", "b")),
    "text is not UTF-8": lambda r, k: r.set(f"{k}:text", b"\xff\xfe\xfd"),
    "feed is a string": lambda r, k: r.set(f"{k}:feed", "x"),
}


def _probe(manager: FailoverManager, rid: str) -> dict[str, str]:
    """Call everything on one request; map call -> 'ok' or the error type."""
    out = {}
    for name, fn in (
        ("get_context", lambda: manager.get_context(rid)),
        ("append_tokens", lambda: manager.append_tokens(rid, "more ")),
        ("prepare_failover", lambda: manager.prepare_failover(rid)),
        ("set_state", lambda: manager.set_state(rid, StreamState.Streaming)),
        ("claim", lambda: manager.claim(rid)),
        ("complete", lambda: manager.complete(rid)),
    ):
        try:
            fn()
            out[name] = "ok"
        except FloCoordError as exc:
            out[name] = type(exc).__name__
    return out


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_request_data_is_contained(corrupt_env: Any, corruption: str) -> None:
    worker, other, raw, namespace = corrupt_env
    worker.start_tracking("bad", "prompt")
    worker.append_tokens("bad", "some text ")
    worker.start_tracking("good", "prompt")
    worker.append_tokens("good", "good text ")
    other.start_tracking("neighbour", "prompt")
    other.append_tokens("neighbour", "neighbour text")
    CORRUPTIONS[corruption](raw, f"{namespace}:{{bad}}")

    errors = _probe(worker, "bad")
    assert "CorruptStateError" in errors.values(), errors
    assert set(errors.values()) <= {"ok", "CorruptStateError", "LeaseLostError"}, errors

    # everything else keeps working
    assert worker.heartbeat() >= 1  # renews "good"; drops "bad" if it cannot be renewed
    assert worker.get_context("good").generated_prefix == "good text "  # type: ignore[union-attr]
    worker.append_tokens("good", "more")
    assert other.get_context("neighbour").generated_prefix == "neighbour text"  # type: ignore[union-attr]
    assert worker.stats().active_contexts >= 2
    worker.history()
    time.sleep(0.35)  # the worker's leases expire: "bad" and "good" become orphans
    claimed = {c.request_id for c in other.claim_orphans()}
    assert "good" in claimed  # the corrupt one does not block the reaper
    assert other.complete("good")
    assert other.complete("neighbour")


def test_foreign_history_entries_are_skipped(corrupt_env: Any) -> None:
    worker, _, raw, namespace = corrupt_env
    worker.record_attempt(
        FailoverAttempt(backend=ServingBackend.Vllm, started_at=time.time(), result=FailoverResult.Success)
    )
    raw.xadd(f"{namespace}:history", {"e": "not json"})
    raw.xadd(f"{namespace}:history", {"other": "field"})
    raw.xadd(f"{namespace}:history", {"e": '{"kind":"attempt","backend":"not, a deployment","started_at":1}'})
    raw.xadd(f"{namespace}:history", {"e": b"\xff\xfe"})
    worker.record_attempt(
        FailoverAttempt(backend=ServingBackend.Groq, started_at=time.time(), result=FailoverResult.Timeout)
    )
    assert [e.backend for e in worker.history()] == [ServingBackend.Vllm, ServingBackend.Groq]  # type: ignore[union-attr]
    stats = worker.stats()
    assert (stats.total_attempts, stats.successful, stats.timeouts) == (2, 1, 1)


def test_foreign_index_members_are_skipped(corrupt_env: Any) -> None:
    worker, other, raw, namespace = corrupt_env
    raw.zadd(f"{namespace}:active", {"not a valid id": 0, "{braces}": 0, "ghost": 0})
    worker.start_tracking("real", "prompt")
    time.sleep(0.35)
    assert other.orphans() == ["real"]
    assert [c.request_id for c in other.claim_orphans()] == ["real"]


def test_wrong_type_namespace_keys_raise_corrupt_state(corrupt_env: Any) -> None:
    worker, _, raw, namespace = corrupt_env
    raw.set(f"{namespace}:history", "not a stream")
    with pytest.raises(CorruptStateError):
        worker.history()
    with pytest.raises(CorruptStateError):
        worker.stats()
    worker.start_tracking("still-works", "prompt")
    assert worker.append_tokens("still-works", "yes") is not None


async def test_async_corrupt_request_is_contained(server: RedisServer) -> None:
    namespace = f"acorrupt{uuid.uuid4().hex[:6]}"
    raw = server.client()
    async with AsyncFailoverManager(redis=aredis.Redis(host=server.host, port=server.port), namespace=namespace) as m:
        await m.start_tracking("bad", "p")
        await m.start_tracking("good", "p")
        raw.hset(f"{namespace}:{{bad}}:ctx", "token_count", "x")
        results = await asyncio.gather(
            m.append_tokens("bad", "x"), m.append_tokens("good", "y"), return_exceptions=True
        )
        assert isinstance(results[0], CorruptStateError)
        assert results[1] is not None and not isinstance(results[1], BaseException)
        assert (await m.get_context("good")).generated_prefix == "y"  # type: ignore[union-attr]


# ------------------------------------------------- issue 16: each failure found, now typed


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _deep_toml(tmp: Any) -> str:
    path = tmp / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000)
    return str(path)


EDGE_CASES: list[tuple[str, Callable[[Any, Any], Any], type[FloCoordError]]] = [
    ("nested usage", lambda m, t: m.record_attempt(
        FailoverAttempt(backend=ServingBackend.Vllm, started_at=1.0, usage=_nested(5000))), ValidationError),
    ("lone surrogate state", lambda m, t: StreamState.Failed("\ud800"), ValidationError),
    ("lone surrogate result", lambda m, t: FailoverResult.BackendError("\udfff"), ValidationError),
    ("BackendSpec headers str", lambda m, t: _spec(headers="x"), ValidationError),
    ("backends not a list", lambda m, t: _coordinator(42), ValidationError),
    ("backends a str", lambda m, t: _coordinator("Vllm"), ValidationError),
    ("url redis://[::1", lambda m, t: FailoverManager(url="redis://[::1", namespace="x"), ValidationError),
    ("from_json int", lambda m, t: FailoverConfig.from_json(5), ValidationError),  # type: ignore[arg-type]
    ("from_json surrogate", lambda m, t: FailoverConfig.from_json("\ud800"), ValidationError),
    ("load_settings int", lambda m, t: _load_settings(5), ValidationError),
    ("load_settings NUL", lambda m, t: _load_settings("a\x00b"), ValidationError),
    ("load_settings deep", lambda m, t: _load_settings(_deep_toml(t)), ValidationError),
]  # fmt: skip


def _spec(**kwargs: Any) -> Any:
    from flo_coord.execution.backends import BackendSpec

    return BackendSpec(name="Vllm", base_url="http://h", model="m", **kwargs)


def _coordinator(backends: Any) -> Any:
    from flo_coord.execution.coordinator import Coordinator

    return Coordinator(backends, url="redis://127.0.0.1:1/0", namespace="x")


def _load_settings(path: Any) -> Any:
    from flo_coord.settings import load_settings

    return load_settings(path, environ={})


@pytest.mark.parametrize(("case", "fn", "error"), EDGE_CASES, ids=[c[0] for c in EDGE_CASES])
def test_issue_16_edge_failures_are_typed(
    case: str, fn: Callable[[Any, Any], Any], error: type[FloCoordError], fuzzed: FailoverManager, tmp_path: Any
) -> None:
    with pytest.raises(error):
        fn(fuzzed, tmp_path)


@pytest.mark.parametrize("wait", [None, float("inf"), float("nan"), -1, "1"])
async def test_follow_refuses_a_bad_wait_before_redis(server: RedisServer, wait: Any) -> None:
    from flo_coord.execution.delivery import follow

    async with AsyncFailoverManager(url=server.url, namespace=NS) as manager:
        with pytest.raises(ValidationError, match="wait"):
            async for _ in follow(manager, "any", wait=wait):
                pass


@pytest.mark.parametrize(
    ("field", "value"),
    [("epoch", b"1e400"), ("epoch", b"nan"), ("epoch", b"abc"), ("owner", b"\xff\xfe"), ("last_seq", b"inf")],
)
def test_corrupt_numbers_and_encodings_are_typed_and_change_nothing(
    server: RedisServer, field: str, value: bytes
) -> None:
    raw = server.client()
    rid = f"num-{uuid.uuid4().hex[:8]}"
    with FailoverManager(url=server.url, namespace=NS, worker_id="numbers") as manager:
        manager.start_tracking(rid, "prompt")
        manager.append_tokens(rid, "kept")
        keys = manager.core.keys.request(rid)
        raw.hset(keys.ctx, field, value)
        before = (raw.hgetall(keys.ctx), raw.get(keys.text))
        calls = [lambda: manager.append_tokens(rid, " more"), lambda: manager.get_context(rid)]
        if field in ("epoch", "owner"):  # what the finish fence reads
            calls.append(lambda: manager.complete(rid))
        for call in calls:
            with pytest.raises(CorruptStateError):
                call()
            assert (raw.hgetall(keys.ctx), raw.get(keys.text)) == before


def test_a_non_utf8_index_member_is_skipped_not_fatal(server: RedisServer) -> None:
    namespace = f"idx{uuid.uuid4().hex[:6]}"
    with FailoverManager(url=server.url, namespace=namespace, worker_id="w", lease_ttl=0.2) as manager:
        manager.start_tracking("good", "prompt")
        server.client().zadd(f"{namespace}:active", {b"\xff\xfe": 0, b"x" * 500: 0})
        time.sleep(0.25)
        assert manager.orphans() == ["good"]
        assert [rid for rid, _ in manager.active_requests()] == ["good"]
        assert [ctx.request_id for ctx in manager.claim_orphans()] == ["good"]


def test_listeners_bind_loopback_unless_told_otherwise() -> None:
    pytest.importorskip("prometheus_client")
    from flo_coord.cli.parser import build_parser
    from flo_coord.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    try:
        metrics.serve(0)
        assert metrics._server is not None and metrics._server.server_address[0] == "127.0.0.1"
    finally:
        metrics.stop()
    parser = build_parser()
    assert parser.parse_args(["worker"]).metrics_addr == "127.0.0.1"
    assert parser.parse_args(["serve-fake-llm"]).host == "127.0.0.1"


# ------------------------------------------ a new user's trial: typed errors at every edge

VLLM = [{"name": "Vllm", "base_url": "http://127.0.0.1:9", "model": "llama"}]


def _built(**options: Any) -> Any:
    """A Coordinator of one Vllm deployment with ``options`` (built, never started: no Redis call)."""
    from flo_coord.execution.backends import BackendSpec

    specs = [BackendSpec(**VLLM[0])]
    return _coordinator_with(specs, **options)


def _coordinator_with(specs: Any, **options: Any) -> Any:
    from flo_coord.execution.coordinator import Coordinator

    return Coordinator(specs, url="redis://127.0.0.1:1/0", namespace="x", **options)


def _untouchable() -> FailoverManager:
    return FailoverManager(redis=Untouchable(), namespace="x")


def _executor(**fields: Any) -> Any:
    from flo_coord.execution.coordinator import ExecutorConfig

    return ExecutorConfig(**fields)


def _heartbeat(**kwargs: Any) -> Any:
    from flo_coord import HeartbeatThread

    return HeartbeatThread(_untouchable(), **kwargs)


def _reaper(*args: Any, **kwargs: Any) -> Any:
    from flo_coord import Reaper

    return Reaper(*args, **kwargs)


def _struct(cls_name: str, **fields: Any) -> Any:
    import flo_coord

    return getattr(flo_coord, cls_name)(**fields)


BOGUS_ROLE = [{"role": "bogus", "content": "hi"}]

#: (case, call, error, text the message must contain): each was accepted, or failed with an
#: untyped or garbled error, in a new user's trial.
TRIAL_CASES: list[tuple[str, Callable[[], Any], type[FloCoordError], str]] = [
    # heartbeat and reaper arguments (a 0 interval busy-looped Redis; a str killed the thread later)
    ("heartbeat interval 0", lambda: _untouchable().start_heartbeat(interval=0), ConfigError, "interval 0 is not"),
    ("heartbeat interval -1", lambda: _untouchable().start_heartbeat(interval=-1), ConfigError, "interval -1"),
    ("heartbeat interval str", lambda: _untouchable().start_heartbeat(interval="x"), ConfigError, "interval 'x'"),
    ("HeartbeatThread interval", lambda: _heartbeat(interval=-1), ConfigError, "HeartbeatThread interval"),
    ("HeartbeatThread manager", lambda: _struct("HeartbeatThread", manager="x"), ConfigError, "needs a Failover"),
    ("Reaper on_claim", lambda: _reaper(_untouchable(), on_claim=5), ConfigError, "on_claim must be callable"),
    ("Reaper limit", lambda: _reaper(_untouchable(), print, limit=-1), ConfigError, "Reaper limit -1"),
    ("Reaper interval", lambda: _reaper(_untouchable(), print, interval=0), ConfigError, "Reaper interval 0"),
    ("Reaper manager", lambda: _reaper("x", print), ConfigError, "needs a FailoverManager"),
    # Coordinator arguments (each was accepted, then every request failed or hung)
    ("Coordinator executor", lambda: _built(executor="x"), ConfigError, "executor 'x' is not an ExecutorConfig"),
    ("Coordinator breaker", lambda: _built(breaker=5), ConfigError, "breaker 5 is not a BreakerConfig"),
    ("Coordinator concurrency -1", lambda: _built(concurrency=-1), ConfigError, "concurrency -1"),
    ("Coordinator concurrency 0", lambda: _built(concurrency=0), ConfigError, "concurrency 0"),
    ("Coordinator concurrency str", lambda: _built(concurrency="x"), ConfigError, "concurrency 'x'"),
    ("Coordinator models str", lambda: _built(models="x"), ConfigError, "models must be a list of ModelGroup"),
    ("Coordinator models item", lambda: _built(models=["x"]), ConfigError, "models[0] 'x' is not a ModelGroup"),
    ("Coordinator capability_ttl", lambda: _built(capability_ttl=-1), ConfigError, "capability_ttl -1"),
    ("Coordinator manager", lambda: _built(manager="x"), ConfigError, "manager must be an AsyncFailoverManager"),
    ("Coordinator unknown option", lambda: _built(bogus=1), ConfigError, "unknown keyword argument(s) bogus"),
    # chat roles the gateway and the CLI refuse: refused at the library's edge too
    ("stream role", lambda: _built().stream("r1", BOGUS_ROLE), ValidationError, "messages[0].role 'bogus'"),
    ("run role", lambda: asyncio.run(_built().run("r1", BOGUS_ROLE)), ValidationError, "is not one of 'system'"),
    ("stream tool role", lambda: _built().stream("r1", [ChatMessage("tool", "x")]), ValidationError, "'tool'"),
    # config Structs: unknown or missing fields, rules across fields, msgspec's words
    ("FailoverConfig unknown", lambda: FailoverConfig(bogus=1), ConfigError, "unexpected keyword argument 'bogus'"),
    ("Limits unknown", lambda: Limits(bogus=1), ConfigError, "Limits: unexpected keyword argument 'bogus'"),
    ("ExecutorConfig unknown", lambda: _executor(bogus=1), ConfigError, "ExecutorConfig: unexpected keyword"),
    ("BackendSpec unknown", lambda: _struct("BackendSpec", **VLLM[0], bogus=1), ConfigError, "BackendSpec: unexp"),
    ("BackendSpec missing", lambda: _struct("BackendSpec", name="Vllm"), ConfigError, "missing required argument"),
    ("ModelGroup unknown", lambda: _struct("ModelGroup", name="m", deployments=["a"], bogus=1), ConfigError, "bogus"),
    ("GroupDeployment unknown", lambda: _struct("GroupDeployment", name="a", bogus=1), ConfigError, "(its fields: "),
    ("backoff_initial > max", lambda: _executor(backoff_initial=10, backoff_max=1), ConfigError, "at most backoff_max"),
    ("fallback_order twice", lambda: FailoverConfig(fallback_order=["Vllm", "Vllm"]), ConfigError, "Vllm more than"),
    ("limits str", lambda: FailoverManager(redis=Untouchable(), limits="x"), ConfigError, "limits 'x' is not a Limits"),
    ("limits unknown", lambda: FailoverManager(redis=Untouchable(), limits={"bogus": 1}), ConfigError, "field 'bogus'"),
    # token counts (a str raised AttributeError; a bad count was dropped or stored as given)
    ("usage str", lambda: _untouchable().set_usage("r1", "x"), ValidationError, "usage 'x' is not a dict"),
    ("usage count str", lambda: _untouchable().set_usage("r1", {"tokens": "x"}), ValidationError, "dict of at"),
    ("usage negative", lambda: _untouchable().complete("r1", usage={"completion_tokens": -7}), ValidationError, "-7"),
    ("usage huge", lambda: _untouchable().fail("r1", "x", usage={"t": 2**80}), ValidationError, "2**53 - 1"),
    ("usage bool", lambda: _untouchable().set_usage("r1", {"t": True}), ValidationError, "usage {'t': True}"),
    # params JSON cannot hold were changed quietly (NaN -> null, a set -> a list, 1 -> "1")
    ("params nan", lambda: _untouchable().start_tracking("r1", "p", params={"t": math.nan}), ValidationError, "nan"),
    ("params set", lambda: _untouchable().start_tracking("r1", "p", params={"s": {1}}), ValidationError, "JSON values"),
    ("params int key", lambda: _untouchable().start_tracking("r1", "p", params={1: "x"}), ValidationError, "str keys"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "fn", "error", "text"), TRIAL_CASES, ids=[c[0] for c in TRIAL_CASES])
def test_a_new_users_mistakes_get_typed_errors_that_say_what_is_wrong(
    case: str, fn: Callable[[], Any], error: type[FloCoordError], text: str
) -> None:
    with pytest.raises(error) as caught:
        fn()
    assert text in str(caught.value)
    assert "Expected `" not in str(caught.value)  # msgspec's own words never reach the user


def test_a_bad_reap_interval_starts_nothing() -> None:
    async def main() -> None:
        coordinator = _built()
        with pytest.raises(ConfigError, match="AsyncReaper interval"):
            await coordinator.start(reap_interval=0)
        assert coordinator._heartbeat is None and coordinator.cancel_watcher._task is None
        await coordinator.manager.aclose()

    asyncio.run(main())
