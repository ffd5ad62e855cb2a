"""Least privilege: the exact ACL a worker needs, and namespaces kept apart.

``WORKER_RULES`` is the ACL documented in docs/OPERATING.md. A worker authenticated as a
user with exactly these rules runs a full stream with takeover by a second worker user,
stats, history, a follower, the intake queue and ``durability="replica"``; it cannot touch
a key outside its namespace; and every rule is needed (each one removed breaks the run).
The scripts run as a Redis Functions library an operator loads once, so the worker ACL
refuses EVAL, EVALSHA, SCRIPT and FUNCTION. ``CLIENT_RULES`` (submit and follow only) is
narrower: FCALL of the two read functions only, and no write command but XADD. Both are
tested as sufficient for the CLI commands of their role and necessary rule by rule, and
as the ones README.md and docs/OPERATING.md show.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
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
from flo_coord.cli.common import UsageError, check_redis
from flo_coord.errors import ConfigError
from flo_coord.execution.delivery import follow
from flo_coord.store import functions
from flo_coord.store.queue import Submission, ack, ensure_group, reclaim, submit, take
from flo_coord.store.scripts import HEARTBEAT as HEARTBEAT_SCRIPT
from flo_coord.testing.embedded import RedisServer, _wait_until

pytestmark = pytest.mark.timeout(180)

#: The ACL of a worker of namespace ``flo``: docs/OPERATING.md ("Least privilege") shows it.
WORKER_RULES = [
    # commands flo_coord sends (the scripts run as Functions: FCALL only)
    "+fcall",
    "+ping",
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
    "+type",
    "+zrangebyscore",
]


#: The ACL of a client of namespace ``flo`` that only submits and follows: FCALL of the two
#: read functions only (``+fcall|<name>``: the names carry the library version, so
#: ``install-functions`` prints these two rules), no direct write but XADD (the queue).
CLIENT_RULES = [
    "+ping",
    *functions.client_rules(),
    "+xadd",
    "+xread",
    "+hgetall",
    # commands the two functions call (READ for the "already in use" check, FOLLOW_READ)
    "+exists",
    "+strlen",
    "+xrevrange",
    "+pexpire",
    "+pttl",
    "+getrange",
    "+time",
    "+type",
]


def setuser(admin: redis.Redis, user: str, password: str, namespace: str, rules: list[str], keys: bool = True) -> None:
    """``rules`` with ``{ns}`` filled in; ``keys=False``: the rules carry their own key patterns."""
    patterns = [f"~{namespace}:*"] if keys else []
    admin.execute_command(
        "ACL", "SETUSER", user, "reset", "on", f">{password}", *patterns, "resetchannels", "-@all",
        *[r.format(ns=namespace) for r in rules],
    )  # fmt: skip


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
    check_redis(user_url(primary, users[0], password))  # what every CLI command does first (PING)
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
    admin.script_flush()
    functions.install(admin)  # the operator step: workers may only FCALL the library
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
    functions.install(admin)
    with pytest.raises((CoordinatorUnavailableError, rex.NoPermissionError, UsageError)) as caught:
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
    from flo_coord.testing.embedded import free_port

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


# ------------------------------------------------------- Functions, CLI commands, client ACL


def test_the_worker_acl_refuses_arbitrary_lua_and_library_changes(servers: Any) -> None:
    primary, _ = servers
    admin = primary.client()
    setuser(admin, "flo-nolua", "pw", "nolua", WORKER_RULES)
    functions.install(admin)
    worker = redis.Redis.from_url(user_url(primary, "flo-nolua", "pw"))
    busy = "local t = redis.call('TIME') while true do end"
    refused: list[tuple[str, ...]] = [
        ("EVAL", busy, 0),
        ("EVAL_RO", busy, 0),
        ("EVALSHA", "a" * 40, 0),
        ("SCRIPT", "LOAD", busy),
        ("SCRIPT", "FLUSH"),
        ("FUNCTION", "LOAD", "#!lua name=evil\nredis.register_function('evil', function() while true do end end)"),
        ("FUNCTION", "DELETE", functions.library()[0]),
        ("FUNCTION", "FLUSH"),
    ]
    for command in refused:
        with pytest.raises(rex.NoPermissionError):
            worker.execute_command(*command)
    assert functions.library()[0].encode() in [lib[1] for lib in admin.function_list()]


def test_a_worker_without_the_library_is_told_to_install_it(servers: Any) -> None:
    primary, _ = servers
    admin = primary.client()
    setuser(admin, "flo-early", "pw", "early", WORKER_RULES)
    admin.function_flush()
    try:
        early = FailoverManager(url=user_url(primary, "flo-early", "pw"), namespace="early")
        with early, pytest.raises(ConfigError, match="install-functions"):
            early.start_tracking("req-1", "prompt")
        assert admin.keys("early:*") == []
        # the worker command says so at start (one line, exit 2) instead of failing every round
        url = user_url(primary, "flo-early", "pw")
        worker = _cli(url, "early", "worker", "--backend", "Vllm=http://127.0.0.1:1,m")
        assert worker.returncode == 2 and "install-functions" in worker.stderr, worker.stderr
        assert "Traceback" not in worker.stderr and "pw@" not in worker.stderr
        # a worker whose credential may load the library (here: the admin) loads it at first use
        with FailoverManager(redis=primary.client(), namespace="early") as manager:
            manager.start_tracking("req-1", "prompt")
        assert functions.library()[0].encode() in [lib[1] for lib in admin.function_list()]
    finally:
        functions.install(admin)


def test_a_new_library_version_is_loaded_beside_the_old_and_pruned(servers: Any) -> None:
    primary, _ = servers
    admin = primary.client()
    old = "#!lua name=flo_coord_000000000000\nredis.register_function('flo_000000000000_x', function() return 1 end)"
    admin.function_load(old, replace=True)
    name, removed = functions.install(admin)
    assert removed == [] and name != "flo_coord_000000000000"
    listed = {lib[1].decode() for lib in admin.function_list()}
    assert {name, "flo_coord_000000000000"} <= listed  # workers of the old release keep working
    name, removed = functions.install(admin, prune=True)
    assert removed == ["flo_coord_000000000000"]
    assert {lib[1].decode() for lib in admin.function_list()} == {name}


def _cli(url: str, namespace: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    env.update(FLO_REDIS_URL=url, FLO_NAMESPACE=namespace)
    cmd = [sys.executable, "-m", "flo_coord", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_every_cli_command_runs_under_the_documented_acls(servers: Any, tmp_path: Any) -> None:
    """A worker process, the reaper and the read commands as the worker user; submit and follow as the client."""
    from flo_coord.testing.fakellm import FakeLLMServerThread, full_answer_text

    primary, _ = servers
    admin = primary.client()
    namespace = f"cli{uuid.uuid4().hex[:6]}"
    setuser(admin, "cli-worker", "wpw", namespace, WORKER_RULES)
    setuser(admin, "cli-client", "cpw", namespace, CLIENT_RULES)
    install = _cli(primary.url, namespace, "install-functions", "--json")  # the admin (default user)
    assert install.returncode == 0, install.stderr
    assert json.loads(install.stdout)["library"] == functions.library()[0]
    assert json.loads(install.stdout)["client_fcall_rules"] == " ".join(functions.client_rules())
    worker_url, client_url = user_url(primary, "cli-worker", "wpw"), user_url(primary, "cli-client", "cpw")
    log = tmp_path / "worker.log"
    with FakeLLMServerThread(token_delay=0.005) as fake, open(log, "wb") as out:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
        env.update(FLO_REDIS_URL=worker_url, FLO_NAMESPACE=namespace)
        worker = subprocess.Popen(
            [sys.executable, "-m", "flo_coord", "worker", "--worker-id", "acl-w1", "--lease-ttl", "1",
             "--backend", f"Vllm={fake.base_url},acl-model", "--exit-with-parent", "--log-level", "info"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            submitted = _cli(client_url, namespace, "submit", "least privilege", "--request-id", "acl-r1")
            assert submitted.returncode == 0, (submitted.stderr, log.read_text())
            assert submitted.stdout == full_answer_text("least privilege") + "\n"
            followed = _cli(client_url, namespace, "follow", "acl-r1", "--offset", "3")
            assert followed.returncode == 0 and followed.stdout == full_answer_text("least privilege")[3:] + "\n"
            for argv in (["inspect", "acl-r1", "--json"], ["stats", "--json"], ["history", "--json"],
                         ["top", "--once"], ["reap"]):  # fmt: skip
                done = _cli(worker_url, namespace, *argv)
                assert done.returncode == 0, (argv, done.stderr)
            assert "worker_url" not in log.read_text() and "wpw" not in log.read_text()  # no credential logged
        finally:
            worker.terminate()
            worker.wait(15)
    assert worker.returncode == 0, log.read_text()
    # the client may not write a worker's keys, nor call the writing functions of the library
    client = redis.Redis.from_url(client_url)
    with pytest.raises(rex.NoPermissionError):
        client.hset(f"{namespace}:{{acl-r1}}:ctx", "owner", "evil")
    with pytest.raises(rex.NoPermissionError):
        keys = (f"{namespace}:{{x}}:ctx", f"{namespace}:{{x}}:result")
        client.fcall(functions.function_name(HEARTBEAT_SCRIPT), 2, *keys, "w", 1, 1000)
    for command in (("DEL", f"{namespace}:{{acl-r1}}:text"), ("ZADD", f"{namespace}:active", 1, "x"),
                    ("XREADGROUP", "GROUP", "g", "c", "STREAMS", f"{namespace}:queue", ">")):  # fmt: skip
        with pytest.raises(rex.NoPermissionError):
            client.execute_command(*command)


def _client_run(primary: RedisServer, namespace: str, url: str, rid: str, capsys: Any) -> None:
    """Submit (in process, as the CLI does) and follow a request a worker (admin) streams meanwhile."""
    import threading

    from flo_coord.cli import main

    os.environ.update(FLO_REDIS_URL=url, FLO_NAMESPACE=namespace)
    try:
        assert main(["submit", "hello", "--request-id", rid, "--no-follow"]) == 0
        worker = FailoverManager(redis=primary.client(), namespace=namespace, worker_id="w")
        worker.start_tracking(rid, "hello")
        codes: list[int] = []
        follower = threading.Thread(target=lambda: codes.append(main(["follow", rid, "--timeout", "5"])))
        follower.start()
        for part in ("a ", "b ", "c"):
            time.sleep(0.15)
            worker.append_tokens(rid, part)
        worker.complete(rid)
        follower.join(30)
        worker.close()
        out, err = capsys.readouterr()
        # the follower never lost its way (a refused XREAD makes it reconnect again and again)
        assert codes == [0] and out == f"{rid}\na b c\n" and "lost Redis" not in err, err
    finally:
        for name in ("FLO_REDIS_URL", "FLO_NAMESPACE"):
            os.environ.pop(name, None)


def test_the_client_acl_suffices_for_submit_and_follow(servers: Any, capsys: pytest.CaptureFixture[str]) -> None:
    primary, _ = servers
    admin = primary.client()
    namespace = f"cl{uuid.uuid4().hex[:6]}"
    setuser(admin, "flo-client", "pw", namespace, CLIENT_RULES)
    functions.install(admin)
    _client_run(primary, namespace, user_url(primary, "flo-client", "pw"), "cl-r1", capsys)


@pytest.mark.parametrize("rule", CLIENT_RULES)
def test_every_rule_of_the_client_acl_is_needed(servers: Any, rule: str, capsys: pytest.CaptureFixture[str]) -> None:
    primary, _ = servers
    admin = primary.client()
    namespace = f"cm{uuid.uuid4().hex[:6]}"
    user = f"flo-cmin-{uuid.uuid4().hex[:6]}"
    setuser(admin, user, "pw", namespace, [r for r in CLIENT_RULES if r != rule])
    functions.install(admin)
    with pytest.raises(AssertionError) as caught:
        _client_run(primary, namespace, user_url(primary, user, "pw"), "cm-r1", capsys)
    err = str(caught.value) + capsys.readouterr().err
    assert any(m in err for m in ("NOPERM", "no permissions", "can't run this command", "lost Redis")), err


def _documented_rules(path: str, user: str) -> list[str]:
    """The ``+rule`` tokens of the ``ACL SETUSER <user>`` block of a doc file."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / path).read_text(encoding="utf-8")
    block = re.search(rf"```\nACL SETUSER {user} (.*?)```", text, re.S)
    assert block is not None, f"no ACL SETUSER {user} block in {path}"
    return [token for token in block.group(1).split() if token.startswith("+")]


@pytest.mark.parametrize("path", ["README.md", "docs/OPERATING.md"])
def test_the_documented_acls_are_the_tested_ones(path: str) -> None:
    assert sorted(_documented_rules(path, "flo-worker")) == sorted(WORKER_RULES)
    version = functions.library()[0].removeprefix(functions.LIBRARY_PREFIX)
    client = [r.replace("flo_<version>_", f"flo_{version}_") for r in _documented_rules(path, "flo-client")]
    assert sorted(client) == sorted(CLIENT_RULES)
