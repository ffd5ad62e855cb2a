"""Least privilege: the exact ACL a worker needs, and namespaces kept apart.

``WORKER_RULES`` is the ACL documented in docs/OPERATING.md. A worker authenticated as a
user with exactly these rules runs a full stream with takeover by a second worker user,
stats, history, a follower, the intake queue and ``durability="replica"``; it cannot touch
a key outside its namespace; and every rule is needed (each one removed breaks the run).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.exceptions as rex
from conftest import require_redis_server

from flo_coord import (
    AsyncFailoverManager,
    CoordinatorUnavailableError,
    FailoverAttempt,
    FailoverManager,
    FailoverResult,
    LeaseLostError,
    ServingBackend,
    StreamState,
    Takeover,
)
from flo_coord.delivery import follow
from flo_coord.embedded import RedisServer, _wait_until
from flo_coord.queue import Submission, ack, ensure_group, reclaim, submit, take

pytestmark = pytest.mark.timeout(180)

#: The ACL of a worker of namespace ``flo``: docs/OPERATING.md ("Least privilege") shows it.
WORKER_RULES = [
    # commands flo_coord sends
    "+evalsha",
    "+script|load",
    "+hgetall",
    "+xadd",
    "+xrange",
    "+xrevrange",
    "+xread",
    "+zadd",
    "+zcard",
    "+zrange",
    "+zrem",
    # the intake queue (consumer group)
    "+xgroup|create",
    "+xreadgroup",
    "+xautoclaim",
    "+xack",
    # durability="replica": an anchor write, then WAIT
    "+set",
    "+wait",
    # commands the Lua scripts call (ACLs apply inside scripts too)
    "+append",
    "+del",
    "+exists",
    "+get",
    "+getrange",
    "+hget",
    "+hincrby",
    "+hmget",
    "+hset",
    "+pexpire",
    "+pttl",
    "+strlen",
    "+time",
    "+zrangebyscore",
]


def setuser(admin: redis.Redis, user: str, password: str, namespace: str, rules: list[str]) -> None:
    admin.execute_command(
        "ACL", "SETUSER", user, "reset", "on", f">{password}", f"~{namespace}:*", "resetchannels", "-@all", *rules
    )


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary (with the worker users) and a replica, for durability='replica'."""
    require_redis_server()
    with RedisServer() as primary, RedisServer(replicaof=primary.address) as replica:
        _wait_until(lambda: replica.info("replication").get("master_link_status") == "up", 20, "replica sync")
        yield primary, replica


def user_url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@{server.host}:{server.port}/0"


def full_run(primary: RedisServer, namespace: str, users: tuple[str, str], password: str) -> None:
    """Everything a worker does, as two users of the worker ACL."""
    first = FailoverManager(
        url=user_url(primary, users[0], password), namespace=namespace, worker_id="w1", lease_ttl=0.3
    )
    second = FailoverManager(
        url=user_url(primary, users[1], password),
        namespace=namespace,
        worker_id="w2",
        lease_ttl=30,
        durability="replica",
    )
    try:
        # the intake queue
        entry = second.shell.run(submit(second.core, Submission(request_id="req-1", prompt="hi")), "submit")
        second.shell.run(ensure_group(second.core), "queue")
        taken = second.shell.run(take(second.core, 10, 1), "queue")
        assert [e for e, _ in taken] == [entry]
        second.shell.run(reclaim(second.core, 60_000, 10), "queue")
        second.shell.run(ack(second.core, entry), "queue")
        # fenced intake (a duplicate delivery changes nothing) and a poison request ended typed
        assert second.shell.run(second.core.start_new("req-q", "prompt"), "start_tracking") is not None
        assert second.shell.run(second.core.start_new("req-q", "prompt"), "start_tracking") is None
        assert second.complete("req-q")
        assert second.shell.run(second.core.reject("req-p", "poison", kind="PoisonRequestError"), "reject")
        assert second.outcome("req-p").error_kind == "PoisonRequestError"  # type: ignore[union-attr]
        # a stream, a heartbeat, a crash and a takeover
        first.start_tracking("req-1", "prompt", ServingBackend.Vllm)
        first.append_tokens("req-1", "one ")
        first.append_tokens("req-1", "two ")
        assert first.heartbeat() == 1
        first.record_attempt(
            FailoverAttempt(
                backend=ServingBackend.Vllm, started_at=time.time(), result=FailoverResult.BackendError("cut")
            )
        )
        first.set_state("req-1", StreamState.Streaming)
        time.sleep(0.35)  # the first worker "dies": its lease runs out
        assert second.orphans() == ["req-1"]
        (ctx,) = second.claim_orphans()
        assert ctx.generated_prefix == "one two " and ctx.owner == "w2"
        with pytest.raises(LeaseLostError):
            first.append_tokens("req-1", "zombie")
        second.append_tokens("req-1", "three")  # durability="replica": SET + WAIT
        assert second.get_context("req-1").generated_prefix == "one two three"  # type: ignore[union-attr]
        stats = second.stats()
        assert stats.active_contexts == 1 and stats.takeovers == 1 and stats.total_attempts == 1
        assert any(isinstance(e, Takeover) for e in second.history())
        assert second.active_requests()
        assert second.complete("req-1")
        assert second.outcome("req-1").state == "Completed"  # type: ignore[union-attr]
        # a follower (XREAD on the request's feed) as the first user
        asyncio.run(_follow(primary, namespace, users[0], password))
    finally:
        first.close()
        second.close()


async def _follow(primary: RedisServer, namespace: str, user: str, password: str) -> None:
    async with AsyncFailoverManager(url=user_url(primary, user, password), namespace=namespace) as m:
        await m.start_tracking("req-2", "prompt")

        async def produce() -> None:
            for part in ("a ", "b ", "c"):
                await asyncio.sleep(0.05)
                await m.append_tokens("req-2", part)
            await m.complete("req-2")

        producer = asyncio.create_task(produce())
        got = [chunk async for chunk in follow(m, "req-2", poll=0.2)]
        await producer
        assert "".join(got) == "a b c"


def test_a_worker_with_exactly_the_documented_acl_runs_everything(servers: Any) -> None:
    primary, _ = servers
    admin = primary.client()
    namespace = f"flo{uuid.uuid4().hex[:6]}"
    for user in ("flo-worker", "flo-worker-2"):
        setuser(admin, user, "s3cret", namespace, WORKER_RULES)
    admin.script_flush()  # the worker loads its scripts itself
    full_run(primary, namespace, ("flo-worker", "flo-worker-2"), "s3cret")


def test_a_worker_cannot_touch_keys_outside_its_namespace(servers: Any) -> None:
    primary, _ = servers
    admin = primary.client()
    setuser(admin, "flo-worker-a", "pw", "team-a", WORKER_RULES)
    admin.set("team-b:secret", "nope")
    client = redis.Redis.from_url(user_url(primary, "flo-worker-a", "pw"))
    with pytest.raises(rex.NoPermissionError):
        client.get("team-b:secret")
    with pytest.raises(rex.NoPermissionError):
        client.set("team-b:secret", "overwritten")
    with pytest.raises(rex.NoPermissionError):
        client.keys("*")
    with pytest.raises(rex.NoPermissionError):
        client.flushall()
    with pytest.raises(rex.NoPermissionError):
        client.config_get("*")
    # through flo_coord: another namespace is refused, and says so
    with FailoverManager(url=user_url(primary, "flo-worker-a", "pw"), namespace="team-b") as intruder:
        with pytest.raises(CoordinatorUnavailableError) as caught:
            intruder.start_tracking("req-1", "prompt")
        assert isinstance(caught.value.cause, rex.NoPermissionError)
        with pytest.raises(CoordinatorUnavailableError):
            intruder.stats()
    assert admin.get("team-b:secret") == b"nope"
    assert admin.keys("team-b:*") == [b"team-b:secret"]


@pytest.mark.parametrize("rule", WORKER_RULES)
def test_every_rule_of_the_acl_is_needed(servers: Any, rule: str) -> None:
    primary, _ = servers
    admin = primary.client()
    namespace = f"min{uuid.uuid4().hex[:6]}"
    user = f"flo-min-{uuid.uuid4().hex[:6]}"
    setuser(admin, user, "pw", namespace, [r for r in WORKER_RULES if r != rule])
    admin.script_flush()  # so the worker has to load its scripts itself
    with pytest.raises((CoordinatorUnavailableError, rex.NoPermissionError)) as caught:
        full_run(primary, namespace, (user, user), "pw")
    cause = getattr(caught.value, "cause", caught.value)
    # NOPERM for a command sent directly; inside a script Redis words it differently
    assert any(m in str(cause) for m in ("NOPERM", "no permissions", "can't run this command")), cause


def test_namespaces_never_see_each_other(servers: Any) -> None:
    primary, _ = servers
    admin = primary.client()
    setuser(admin, "tenant-a", "pa", "tenant-a", WORKER_RULES)
    setuser(admin, "tenant-b", "pb", "tenant-b", WORKER_RULES)
    a = FailoverManager(url=user_url(primary, "tenant-a", "pa"), namespace="tenant-a", worker_id="wa", lease_ttl=0.2)
    b = FailoverManager(url=user_url(primary, "tenant-b", "pb"), namespace="tenant-b", worker_id="wb", lease_ttl=0.2)
    try:
        a.start_tracking("shared-id", "prompt a")
        a.append_tokens("shared-id", "text a")
        a.record_attempt(
            FailoverAttempt(backend=ServingBackend.Vllm, started_at=time.time(), result=FailoverResult.Success)
        )
        assert b.get_context("shared-id") is None
        b.start_tracking("shared-id", "prompt b")  # same id, other namespace: a different request
        b.append_tokens("shared-id", "text b")
        assert a.get_context("shared-id").generated_prefix == "text a"  # type: ignore[union-attr]
        assert b.get_context("shared-id").generated_prefix == "text b"  # type: ignore[union-attr]
        assert a.stats().total_attempts == 1 and b.stats().total_attempts == 0
        assert b.history() == []
        time.sleep(0.25)
        assert a.orphans() == ["shared-id"] and b.orphans() == ["shared-id"]
        (claimed,) = b.claim_orphans()
        assert claimed.prompt == "prompt b"
        assert a.get_context("shared-id").owner == "wa"  # type: ignore[union-attr]
        assert b.complete("shared-id")
        assert a.get_context("shared-id") is not None and a.stats().active_contexts == 1
        assert b.stats().active_contexts == 0
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------ TLS


def _tls_material(directory: str) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    import subprocess

    paths = {name: f"{directory}/{name}" for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")}
    ext = f"{directory}/san.ext"
    with open(ext, "w") as fh:
        fh.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=flo-test-ca",
         "-keyout", paths["ca.key"], "-out", paths["ca.crt"]],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", paths["server.key"], "-out", paths["server.csr"]],
        ["x509", "-req", "-in", paths["server.csr"], "-CA", paths["ca.crt"], "-CAkey", paths["ca.key"],
         "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", paths["server.crt"]],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(["openssl", *step], check=True, capture_output=True, timeout=60)
    return paths


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, str]]:
    import shutil

    require_redis_server()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    from flo_coord.embedded import free_port

    tls = _tls_material(str(tmp_path_factory.mktemp("tls")))
    port = free_port()
    args = ["--tls-port", str(port), "--tls-cert-file", tls["server.crt"], "--tls-key-file", tls["server.key"],
            "--tls-ca-cert-file", tls["ca.crt"], "--tls-auth-clients", "no"]  # fmt: skip
    server = RedisServer(extra_args=args)
    try:
        server.start()
    except Exception as exc:  # a redis-server built without TLS refuses --tls-port
        server.stop()
        pytest.skip(f"redis-server does not support TLS here: {exc}")
    with server:
        yield server, port, tls["ca.crt"]


def test_rediss_url_with_a_ca(tls_server: tuple[RedisServer, int, str]) -> None:
    server, port, ca = tls_server
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    with FailoverManager(url=url, namespace="tls", worker_id="w1") as manager:
        manager.start_tracking("req-1", "prompt")
        manager.append_tokens("req-1", "over TLS")
        assert manager.get_context("req-1").generated_prefix == "over TLS"  # type: ignore[union-attr]
        assert manager.complete("req-1")
    # the data really went through the TLS port
    assert server.client().get("tls:{req-1}:text") == b"over TLS"


async def test_async_rediss_url(tls_server: tuple[RedisServer, int, str]) -> None:
    _, port, ca = tls_server
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    async with AsyncFailoverManager(url=url, namespace="tls-async") as manager:
        await manager.start_tracking("req-1", "prompt")
        await manager.append_tokens("req-1", "async TLS")
        assert (await manager.get_context("req-1")).generated_prefix == "async TLS"  # type: ignore[union-attr]


def test_an_untrusted_certificate_fails_fast(tls_server: tuple[RedisServer, int, str]) -> None:
    _, port, _ = tls_server
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required"  # system CAs only: the test CA is unknown
    from flo_coord import RetryPolicy

    with FailoverManager(url=url, namespace="tls", retry=RetryPolicy(deadline=30)) as manager:
        started = time.monotonic()
        with pytest.raises(CoordinatorUnavailableError) as caught:
            manager.get_context("req-1")
        assert "certificate" in str(caught.value.cause).lower()
        assert time.monotonic() - started < 10  # not retried: a bad certificate does not heal
