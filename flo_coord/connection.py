"""Redis clients from URLs: plain, TLS, Cluster and Sentinel, sync or asyncio.

| URL | client |
| --- | --- |
| ``redis://[user:password@]host:port/db`` | one Redis (``rediss://`` for TLS, ``unix://`` for a socket) |
| ``redis+cluster://[user:password@]host:port[,host:port...]`` | Redis Cluster (any reachable nodes) |
| ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` | the primary Sentinel names |

Clients built here have redis-py's own retries off (flo_coord's retry layer owns that)
and a socket timeout, so a dead server fails a call instead of hanging it.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from flo_coord import defaults
from flo_coord.errors import ConfigError
from flo_coord.retry import no_client_retries


def resolve_url(url: str | None) -> str:
    """The explicit URL, else ``$FLO_REDIS_URL``, else ``redis://localhost:6379/0``."""
    return url or os.environ.get(defaults.REDIS_URL_ENV) or defaults.REDIS_URL


def _hosts(netloc: str) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"expected host:port in Redis URL, got {part!r}")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _credentials(netloc: str) -> dict[str, Any]:
    if "@" not in netloc:
        return {}
    userinfo = netloc.rsplit("@", 1)[0]
    user, sep, password = userinfo.partition(":")
    if not sep:
        return {"password": unquote(user)}
    return {"username": unquote(user) or None, "password": unquote(password)}


def _common(timeout: float) -> dict[str, Any]:
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": no_client_retries()}


def connect(url: str | None = None, *, asyncio: bool = False, timeout: float = defaults.SOCKET_TIMEOUT) -> Any:
    """A redis-py client (sync, or ``redis.asyncio`` when ``asyncio=True``) for ``url``."""
    url = resolve_url(url)
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss", "unix"):
        if asyncio:
            import redis.asyncio as aredis

            return aredis.Redis.from_url(url, **_common(timeout))
        import redis

        return redis.Redis.from_url(url, **_common(timeout))
    if parts.scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster(parts, asyncio, timeout)
    if parts.scheme in ("redis+sentinel", "rediss+sentinel"):
        return _sentinel(parts, asyncio, timeout)
    raise ConfigError(
        f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, rediss://, unix://, "
        "redis+cluster:// or redis+sentinel://"
    )


def _cluster(parts: Any, asyncio: bool, timeout: float) -> Any:
    kwargs: dict[str, Any] = {
        **_credentials(parts.netloc),
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "ssl": parts.scheme.startswith("rediss"),
    }
    hosts = _hosts(parts.netloc)
    if asyncio:
        from redis.asyncio.cluster import ClusterNode as AsyncNode
        from redis.asyncio.cluster import RedisCluster as AsyncCluster

        return AsyncCluster(startup_nodes=[AsyncNode(h, p) for h, p in hosts], **kwargs)
    from redis.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **kwargs)


def _sentinel(parts: Any, asyncio: bool, timeout: float) -> Any:
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigError("redis+sentinel:// URLs need the service name as their path, e.g. /mymaster")
    service = path[0]
    db = int(path[1]) if len(path) > 1 and path[1].isdigit() else 0
    creds = _credentials(parts.netloc)
    query = parse_qs(parts.query)
    sentinel_kwargs = {"password": query["sentinel_password"][0]} if "sentinel_password" in query else {}
    kwargs = {**creds, **_common(timeout), "db": db, "ssl": parts.scheme.startswith("rediss")}
    if asyncio:
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        return AsyncSentinel(_hosts(parts.netloc), sentinel_kwargs=sentinel_kwargs, **kwargs).master_for(service)
    from redis.sentinel import Sentinel

    return Sentinel(_hosts(parts.netloc), sentinel_kwargs=sentinel_kwargs, **kwargs).master_for(service)
