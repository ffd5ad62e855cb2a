"""Fuzz suite: every public entry point, and every stored key holding corrupt values.

Two hypothesis searches, with a fixed budget (examples below; about 30 s together on a
shared 2-core machine):

- ``test_edge_entry_points``: the entry points outside the manager (follow, BackendSpec,
  Coordinator, FailoverConfig.from_json, load_settings, connect, the state and result
  constructors, the configs) with hostile arguments: only FloCoordError subclasses.
- ``test_corrupt_stored_data``: a live or finished request, then one of its keys (or a
  namespace key: the active index, the history, a breaker) overwritten with corrupt data
  (a field that is nan, 1e400, abc, 1.5 or not UTF-8, a key of the wrong type); then a
  sequence of public calls on it (the manager's, follow(), the breaker's). Every call
  either works or raises a FloCoordError, and a call that raised changed no key of the
  namespace (notification feeds excepted: following creates one by design).

Every call is counted per entry point; ``test_figures`` (last) asserts that no untyped
exception was seen and prints the figures (``pytest -s``; also written to the file named
by ``$FLO_FUZZ_REPORT``). The manager's own fuzzing lives in test_hostile_input.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import require_redis_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_input import junk

from flo_coord import (
    AsyncFailoverManager,
    FailoverConfig,
    FailoverManager,
    FailoverResult,
    FloCoordError,
    Limits,
    RetryPolicy,
    ServingBackend,
    StreamState,
)
from flo_coord.execution.backends import BackendSpec
from flo_coord.execution.breaker import BreakerConfig
from flo_coord.execution.coordinator import Coordinator
from flo_coord.execution.delivery import follow
from flo_coord.redact import redact_secrets
from flo_coord.settings import load_settings
from flo_coord.store.breakers import BreakerStore
from flo_coord.store.connection import connect
from flo_coord.testing.embedded import RedisServer

pytestmark = pytest.mark.timeout(300)

BUDGET = settings(
    max_examples=int(os.environ.get("FLO_FUZZ_EXAMPLES", "1000")),
    deadline=None,
    derandomize=True,  # a fixed budget and a fixed sequence in CI
    suppress_health_check=list(HealthCheck),
)
CALLS: Counter[str] = Counter()
UNTYPED: list[str] = []


def call(entry: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Run one entry point: (raised, result or the FloCoordError). Untyped exceptions are recorded."""
    CALLS[entry] += 1
    try:
        result = fn(*args, **kwargs)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return False, result
    except FloCoordError as exc:
        return True, exc
    except Exception as exc:
        UNTYPED.append(f"{entry}: {type(exc).__name__}: {exc!s:.200}")
        return True, None


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer() as srv:
        yield srv


# ------------------------------------------------------------- entry points at the edge


async def _follow(url: str, rid: Any, **kwargs: Any) -> list[str] | None:
    async with AsyncFailoverManager(url=url, namespace="fz-edge") as manager:
        try:  # a valid but long wait= (the fuzzer draws 10**6 s) is a legitimate wait: cut it
            return await asyncio.wait_for(_drain(follow(manager, rid, **kwargs)), 1.0)
        except TimeoutError:
            return None


async def _drain(chunks: Any) -> list[str]:
    return [c async for c in chunks]


def _toml(content: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8") as fh:
        fh.write(content)
    return fh.name


deep_toml = st.integers(min_value=1, max_value=5000).map(lambda n: "a = " + "[" * n + "]" * n)
deep_json = st.integers(min_value=1, max_value=100_000).map(lambda n: ("[" * n + "]" * n).encode())
urls = st.one_of(
    st.sampled_from(
        ["redis://[::1", "redis://h:99999/0", "redis://h/notadb", "redis+cluster://", "x://y", "", "redis://:@"]
    ),
    st.text(max_size=30),
    junk,
)


@BUDGET
@given(st.data())
def test_edge_entry_points(server: RedisServer, data: st.DataObject) -> None:
    untyped_before = len(UNTYPED)
    one_edge_call(server, data.draw)
    assert len(UNTYPED) == untyped_before, UNTYPED[untyped_before:][:5]


def one_edge_call(server: RedisServer, draw: Callable[..., Any]) -> None:
    kind = draw(st.sampled_from(["follow", "spec", "coordinator", "json", "toml", "connect", "variants", "configs"]))
    if kind == "follow":
        kwargs = draw(st.fixed_dictionaries({}, optional={"wait": junk, "poll": junk, "offset": junk}))
        call("follow", _follow, server.url, draw(st.one_of(st.just("nope"), junk)), **kwargs)
    elif kind == "spec":
        fields = {
            "name": draw(st.one_of(st.just("Vllm"), junk)),
            "base_url": draw(st.one_of(st.just("http://h"), junk)),
            "model": draw(st.one_of(st.just("m"), junk)),
        }
        fields.update(draw(st.fixed_dictionaries({}, optional={"headers": junk, "api_key_env": junk, "kind": junk})))
        call("BackendSpec", BackendSpec, **fields)
    elif kind == "coordinator":
        backends = draw(
            st.one_of(junk, st.lists(junk, max_size=3), st.dictionaries(st.text(max_size=5), junk, max_size=2))
        )
        refused, coordinator = call("Coordinator", Coordinator, backends, url=server.url, namespace="fz-edge")
        if not refused:
            asyncio.run(coordinator.aclose())
    elif kind == "json":
        call(
            "FailoverConfig.from_json",
            FailoverConfig.from_json,
            draw(st.one_of(junk, deep_json, st.binary(max_size=40))),
        )
    elif kind == "toml":
        path = draw(st.one_of(junk, deep_toml.map(_toml), st.text(max_size=40).map(_toml)))
        call("load_settings", load_settings, path, environ={})
        if isinstance(path, str) and path.endswith(".toml") and os.path.exists(path):
            os.unlink(path)
    elif kind == "connect":
        refused, client = call("connect", connect, draw(urls), timeout=draw(st.one_of(st.just(1.0), junk)))
        if not refused:
            client.close()
    elif kind == "variants":
        call("StreamState.Failed", StreamState.Failed, draw(st.one_of(st.text(max_size=10), junk)))
        call("FailoverResult.BackendError", FailoverResult.BackendError, draw(st.one_of(st.text(max_size=10), junk)))
        text = draw(st.one_of(st.text(max_size=60), st.sampled_from(["\ud800", "redis://u:p@h"])))
        CALLS["redact_secrets"] += 1
        assert isinstance(redact_secrets(text), str)  # never raises, for any str
    else:
        configs = (
            ("BreakerConfig", BreakerConfig, ["threshold", "window", "cooldown", "probe_ttl"]),
            ("Limits", Limits, list(Limits.__struct_fields__)),
            ("RetryPolicy", RetryPolicy, ["deadline", "initial", "maximum"]),
        )
        for name, cls, names in configs:
            fields = {f: draw(junk) for f in draw(st.sets(st.sampled_from(names), max_size=2))}
            call(name, cls, **fields)


# ------------------------------------------------------------------ corrupt stored data

NS = "fz"
CTX_FIELDS = ["request_id", "prompt", "primary_backend", "owner", "epoch", "lease", "last_seq", "token_count", "state",
              "created", "messages", "max_tokens", "failed_backends", "takeovers", "claim_nonce"]  # fmt: skip
RESULT_FIELDS = ["state", "owner", "epoch", "error", "error_kind", "backend", "model", "token_count", "finished"]
BAD_VALUES = st.one_of(
    st.sampled_from([b"nan", b"1e400", b"-inf", b"abc", b"1.5", b"-1", b"", b"\xff\xfe", b"{", b"[[[[[", b"9" * 40]),
    st.binary(max_size=12),
)


def corruptions(rid: str) -> st.SearchStrategy[tuple[str, Any]]:
    tag = f"{NS}:{{{rid}}}"
    return st.one_of(
        st.tuples(st.just("ctx field"), st.tuples(st.sampled_from(CTX_FIELDS), BAD_VALUES)),
        st.tuples(st.just("result field"), st.tuples(st.sampled_from(RESULT_FIELDS), BAD_VALUES)),
        st.tuples(st.just("text"), BAD_VALUES),
        st.tuples(
            st.just("wrong type"), st.sampled_from([f"{tag}:ctx", f"{tag}:text", f"{tag}:result", f"{tag}:feed"])
        ),
        st.tuples(st.just("index member"), st.sampled_from([b"\xff\xfe", b"x" * 300, b"{bad}", b"a b"])),
        st.tuples(st.just("history entry"), BAD_VALUES),
        st.tuples(
            st.just("breaker field"),
            st.tuples(st.sampled_from(["state", "open_until", "probe_until", "failures", "window_start"]), BAD_VALUES),
        ),
    )


def corrupt(raw: redis.Redis, rid: str, kind: str, what: Any) -> None:
    tag = f"{NS}:{{{rid}}}"
    if kind == "ctx field":
        raw.hset(f"{tag}:ctx", what[0], what[1])
    elif kind == "result field":
        raw.hset(f"{tag}:result", what[0], what[1])
    elif kind == "text":
        raw.set(f"{tag}:text", what)
    elif kind == "wrong type":
        raw.delete(what)
        raw.rpush(what, "foreign") if what.endswith(":text") else raw.set(what, "foreign")
    elif kind == "index member":
        raw.zadd(f"{NS}:active", {what: 0})
    elif kind == "history entry":
        raw.xadd(f"{NS}:history", {"e": what})
    else:
        raw.hset(f"{NS}:breaker:Vllm", what[0], what[1])


def snapshot(raw: redis.Redis) -> dict[bytes, Any]:
    """Every key of the namespace but the notification feeds, with its type and content.

    The active index is compared by members only: its scores are lease hints that a call
    may refresh (start_tracking sends its index touch in the same round trip as START).
    """
    keys = sorted(k for k in raw.keys(f"{NS}:*") if not k.endswith(b":feed"))
    return {k: raw.zrange(k, 0, -1) if k == f"{NS}:active".encode() else raw.dump(k) for k in keys}


def operations(manager: FailoverManager, url: str, rid: str) -> list[tuple[str, Callable[[], Any]]]:
    breaker = BreakerStore(manager.core, manager.shell)  # the store's breaker operations, run by the sync shell
    policy = BreakerConfig()

    async def follow_it() -> list[str]:
        async with AsyncFailoverManager(url=url, namespace=NS) as reader:
            return [c async for c in follow(reader, rid, poll=0.01)][:3]

    async def followed_briefly() -> Any:
        try:
            return await asyncio.wait_for(follow_it(), 0.3)
        except TimeoutError:
            return None

    m = manager
    return [
        ("append_tokens", lambda: m.append_tokens(rid, "more ")),
        ("heartbeat", m.heartbeat),
        ("get_context", lambda: m.get_context(rid)),
        ("outcome", lambda: m.outcome(rid)),
        ("set_state", lambda: m.set_state(rid, StreamState.Streaming)),
        ("mark_backend_failed", lambda: m.mark_backend_failed(rid, ServingBackend.Vllm)),
        ("should_failover", lambda: m.should_failover(rid)),
        ("prepare_failover", lambda: m.prepare_failover(rid)),
        ("claim", lambda: m.claim(rid)),
        ("complete", lambda: m.complete(rid)),
        ("fail", lambda: m.fail(rid, "reason")),
        ("release", lambda: m.release(rid)),
        ("orphans", m.orphans),
        ("claim_orphans", m.claim_orphans),
        ("active_requests", m.active_requests),
        ("stats", m.stats),
        ("history", m.history),
        ("follow", followed_briefly),
        ("breaker.allow", lambda: m.shell.run(breaker.allow_op("Vllm", "fz", policy.probe_ttl), "breaker")),
        (
            "breaker.record",
            lambda: m.shell.run(
                breaker.record_op("Vllm", False, policy.threshold, policy.window, policy.cooldown), "breaker"
            ),
        ),
        ("start_tracking", lambda: m.start_tracking(rid, "again")),
    ]


@pytest.fixture(scope="module")
def corrupt_env(server: RedisServer) -> Iterator[tuple[FailoverManager, redis.Redis]]:
    with FailoverManager(url=server.url, namespace=NS, worker_id="fz-owner", lease_ttl=0.2) as manager:
        yield manager, server.client()


@BUDGET
@given(st.data())
def test_corrupt_stored_data(server: RedisServer, corrupt_env: Any, data: st.DataObject) -> None:
    manager, raw = corrupt_env
    untyped_before = len(UNTYPED)
    rid = f"r-{uuid.uuid4().hex[:10]}"
    manager.start_tracking(rid, "prompt", ServingBackend.Vllm, messages=[{"role": "user", "content": "hi"}])
    manager.append_tokens(rid, "committed ")
    if data.draw(st.booleans(), label="finished"):
        manager.complete(rid)
    kind, what = data.draw(corruptions(rid), label="corruption")
    corrupt(raw, rid, kind, what)
    ops = operations(manager, server.url, rid)
    for index in data.draw(st.lists(st.integers(0, len(ops) - 1), min_size=1, max_size=5), label="calls"):
        name, fn = ops[index]
        before = snapshot(raw)
        refused, error = call(name, fn)
        if refused and name != "heartbeat":  # heartbeat renews the leases it can and drops the others
            after = snapshot(raw)
            if name == "start_tracking":  # its index hint goes first by design (orphans() drops a stale one)
                for snap in (before, after):
                    snap.pop(f"{NS}:active".encode(), None)
            assert after == before, f"{name} refused ({error}) but changed state ({kind} {what!r:.60})"
    assert len(UNTYPED) == untyped_before, UNTYPED[untyped_before:][:5]
    for key in raw.keys(f"{NS}:*"):  # the next example starts from a clean namespace
        raw.delete(key)


def test_figures() -> None:
    """The closing figures: calls, entry points, untyped errors (must be 0)."""
    figures = {"calls": sum(CALLS.values()), "entry_points": len(CALLS), "untyped_errors": len(UNTYPED),
               "per_entry_point": dict(sorted(CALLS.items()))}  # fmt: skip
    print(f"\nfuzz figures: {json.dumps(figures)}")
    if os.environ.get("FLO_FUZZ_REPORT"):
        with open(os.environ["FLO_FUZZ_REPORT"], "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)
    assert not UNTYPED, UNTYPED[:10]
