"""Shared fixtures: real redis-server processes the tests start themselves, and fakeredis.

Real-Redis tests are skipped (with the reason) only when no ``redis-server`` binary
exists and ``CI`` is unset; with ``CI`` set, a missing binary fails them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest

from flo_coord import AsyncFailoverManager, FailoverManager
from flo_coord.testing.embedded import RedisServer, redis_server_binary


def require_redis_server() -> None:
    if redis_server_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, and CI is set: real-Redis tests must run")
        pytest.skip("redis-server is not installed (set CI=1 to make this a failure)")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session, on a free port in a temporary directory."""
    require_redis_server()
    with RedisServer() as server:
        yield server


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A real redis-server of the test's own (for tests that kill, pause or restart it)."""
    require_redis_server()
    with RedisServer(appendonly=True) as server:
        yield server


@dataclass
class Store:
    """One Redis (real or fake) and a fresh namespace, handing out managers."""

    kind: str
    sync_client: Any
    async_client_factory: Any
    namespace: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    url: str | None = None

    def manager(self, config: Any = None, **kwargs: Any) -> FailoverManager:
        kwargs.setdefault("namespace", self.namespace)
        return FailoverManager(config, redis=self.sync_client, **kwargs)

    def async_manager(self, config: Any = None, **kwargs: Any) -> AsyncFailoverManager:
        kwargs.setdefault("namespace", self.namespace)
        return AsyncFailoverManager(config, redis=self.async_client_factory(), **kwargs)


def _real_store(server: RedisServer) -> Store:
    import redis
    import redis.asyncio as aredis

    client = redis.Redis(host=server.host, port=server.port)
    return Store("redis", client, lambda: aredis.Redis(host=server.host, port=server.port), url=server.url)


def _fake_store() -> Store:
    server = fakeredis.FakeServer()
    return Store(
        "fakeredis",
        fakeredis.FakeRedis(server=server),
        lambda: fakeredis.FakeAsyncRedis(server=server),
    )


@pytest.fixture(params=["fakeredis", "redis"])
def store(request: pytest.FixtureRequest) -> Store:
    """Parametrised: every test using it runs once on fakeredis and once on real Redis."""
    if request.param == "fakeredis":
        return _fake_store()
    return _real_store(request.getfixturevalue("redis_server"))


@pytest.fixture
def real_store(redis_server: RedisServer) -> Store:
    return _real_store(redis_server)
