"""Tests for flo_coord.testing.embedded against real redis-server processes (and the fakeredis fallback).

Every test owns what it starts through a context manager, so processes and temp dirs are gone even on failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from flo_coord.testing.embedded import (
    MAX_PORT,
    FakeRedisTCPServer,
    RedisCluster,
    RedisServer,
    SentinelGroup,
    free_ports,
    redis_cli_binary,
    redis_server_binary,
    start_embedded_redis,
)

requires_redis = pytest.mark.skipif(redis_server_binary() is None, reason="redis-server binary not installed")
requires_cli = pytest.mark.skipif(
    redis_server_binary() is None or redis_cli_binary() is None, reason="redis-server/redis-cli not installed"
)


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` still names a redis process (a recycled pid running something else does not count)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"redis" in fh.read()
    except FileNotFoundError:
        return False


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


def test_free_ports_are_distinct_and_leave_room_for_the_bus_port() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    assert all(1024 < p <= MAX_PORT for p in ports)
    assert not {p + 10000 for p in ports} & set(ports)


@requires_redis
def test_server_starts_answers_and_stops_cleanly() -> None:
    srv = RedisServer()
    try:
        srv.start()
        pid, directory = srv.pid, srv.directory
        assert pid is not None and _pid_alive(pid)
        assert srv.url == f"redis://127.0.0.1:{srv.port}/0"
        with srv.client(decode_responses=True) as conn:
            assert conn.ping()
            assert conn.config_get("save") == {"save": ""}
            assert conn.config_get("appendonly") == {"appendonly": "no"}
        with redis.Redis.from_url(srv.url) as conn:
            assert conn.ping()
    finally:
        srv.stop()
    assert srv.pid is None
    assert not _pid_alive(pid)
    assert not os.path.exists(directory)
    srv.stop()  # idempotent


@requires_redis
def test_password_is_required_and_part_of_the_url() -> None:
    with RedisServer(password="s3cr:t") as srv:
        # No retries: redis-py 8 would otherwise back off for seconds before surfacing the auth error.
        no_retry = Retry(NoBackoff(), 0)
        with srv.client(password=None, retry=no_retry) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.set("k", "v")
        with redis.Redis.from_url(srv.url) as conn:
            assert conn.set("k", "v")


@requires_redis
def test_aof_restart_keeps_a_key_written_before_kill() -> None:
    with RedisServer(appendonly=True) as srv:
        port, directory = srv.port, srv.directory
        with srv.client() as conn:
            conn.set("survivor", "yes")
        old_pid = srv.pid
        srv.kill()
        assert srv.pid is None and os.path.isdir(directory)
        srv.restart()
        assert srv.port == port and srv.pid != old_pid
        with srv.client() as conn:
            assert conn.get("survivor") == b"yes"


@requires_redis
def test_pause_stalls_the_whole_server(server: RedisServer) -> None:
    with server.client() as conn:
        conn.ping()
        started = time.monotonic()
        thread = server.pause(0.5)
        conn.ping()
        assert time.monotonic() - started >= 0.4
        thread.join(5)
        assert not thread.is_alive()


@requires_cli
def test_cluster_reaches_ok_and_serves_keys_in_different_slots() -> None:
    with RedisCluster(3) as cluster:
        for node in cluster.nodes:
            with node.client(decode_responses=True) as conn:
                info = conn.cluster("INFO")
            assert info["cluster_state"] == "ok"
            assert int(info["cluster_slots_assigned"]) == 16384
        with cluster.client(decode_responses=True) as client:
            keys = [f"key-{i}" for i in range(30)]
            slots = {client.keyslot(k) for k in keys}
            owners = {client.get_node_from_key(k).port for k in keys}
            assert len(slots) > 1 and len(owners) == 3  # the keys really live on different masters
            for key in keys:
                client.set(key, key.upper())
            assert [client.get(k) for k in keys] == [k.upper() for k in keys]
    assert cluster.nodes == []


@requires_redis
def test_sentinel_fails_over_to_the_replica_which_then_accepts_writes() -> None:
    with SentinelGroup() as group:
        assert group.primary is not None and group.replica is not None
        assert len(group.sentinel_addresses) == 3
        assert group.primary_address() == group.primary.address
        with group.primary.client() as conn:
            conn.set("before", "failover")
        killed_pid = group.primary.pid
        group.kill_primary()
        assert killed_pid is not None and not _pid_alive(killed_pid)

        new_primary = group.wait_for_failover(timeout=30)
        assert new_primary == group.replica.address
        with group.replica.client() as conn:
            assert conn.set("after", "failover")
            assert conn.get("before") == b"failover"
        # Sentinels agree on the new primary's flags a moment after the promotion: wait for it.
        sentinel = group.sentinel_client(socket_timeout=1.0)
        deadline = time.monotonic() + 15
        while True:
            try:
                sentinel.discover_master(group.service_name)
                break
            except redis.sentinel.MasterNotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with sentinel.master_for(group.service_name) as conn:
            assert conn.get("after") == b"failover"
        pids = [s.pid for s in (*group.sentinels, group.replica)]
    assert not any(pid is not None and _pid_alive(pid) for pid in pids)


def test_fake_tcp_server_answers_ping_and_eval() -> None:
    with FakeRedisTCPServer() as fake, redis.Redis.from_url(fake.url) as conn:
        assert conn.ping()
        assert conn.eval("redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[1])", 1, "k", "v") == b"v"


def test_start_embedded_redis_falls_back_to_the_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLO_REDIS_SERVER", "/nonexistent/redis-server")
    fake = start_embedded_redis()
    try:
        assert isinstance(fake, FakeRedisTCPServer)
        with fake.client() as conn:
            assert conn.ping()
    finally:
        fake.stop()


@requires_redis
def test_start_embedded_redis_prefers_the_binary() -> None:
    srv = start_embedded_redis()
    try:
        assert isinstance(srv, RedisServer) and srv.pid is not None
    finally:
        srv.stop()
