"""Redis clients from URLs: plain, TLS, Cluster and Sentinel, sync or asyncio.

| URL | client |
| --- | --- |
| ``redis://[user:password@]host:port/db`` | one Redis (``rediss://`` for TLS, ``unix:///path.sock`` for a socket) |
| ``redis+cluster://[user:password@]host:port[,host:port...]`` | Redis Cluster (any reachable nodes) |
| ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` | the primary Sentinel names |

``rediss+cluster://`` and ``rediss+sentinel://`` use TLS to the data nodes. Query parameters
are passed to redis-py as it parses them for ``redis://`` URLs: ``socket_timeout``,
``socket_connect_timeout``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs`` (``required``/``optional``/``none``), ``ssl_check_hostname``, ``protocol``...;
``sentinel_password`` (and ``sentinel_username``) authenticate to the Sentinels themselves.
User name and password are percent-decoded.

Clients built here have redis-py's own retries off (flo_coord's retry layer owns that)
and a socket timeout, so a dead or frozen server fails a call instead of hanging it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.exceptions import RedisClusterException, RedisError

from flo_coord import defaults
from flo_coord.errors import ConfigError, CoordinatorUnavailableError
from flo_coord.store.retry import no_client_retries

#: The smallest socket timeout the shells give a client they built when it sends blocking
#: calls (a WAIT of ``durability="replica"`` must fit in it).
MIN_SOCKET_TIMEOUT = 2.0
#: The smallest socket timeout of a sync client that sends no blocking call.
MIN_PLAIN_SOCKET_TIMEOUT = 0.1

_SCHEMES = "redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, redis+sentinel:// or rediss+sentinel://"


@dataclass(frozen=True, slots=True)
class ConnectSpec:
    """How ``connect`` built a client (kept on it as ``flo_coord_connect``)."""

    url: str
    asyncio: bool
    timeout: float


def resolve_url(url: str | None) -> str:
    """The explicit URL, else ``$FLO_REDIS_URL``, else ``redis://localhost:6379/0``."""
    if url is not None and not isinstance(url, str):
        raise ConfigError(f"Redis URL must be a str, got {type(url).__name__}")
    return url or os.environ.get(defaults.REDIS_URL_ENV) or defaults.REDIS_URL


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and error messages; never raises)."""
    from flo_coord.redact import redact_url

    return redact_url(url)


def _hosts(netloc: str) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
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


def _query(parts: Any) -> dict[str, Any]:
    """Query parameters, converted the way redis-py converts them for ``redis://`` URLs."""
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    out: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query):
        parser: Any = URL_QUERY_ARGUMENT_PARSERS.get(name)
        try:
            out[name] = parser(value) if parser else value
        except (TypeError, ValueError):
            raise ConfigError(f"invalid value for {name!r} in Redis URL") from None
    return out


def _common(timeout: float, asyncio: bool) -> dict[str, Any]:
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": no_client_retries(asyncio)}


def connect(url: str | None = None, *, asyncio: bool = False, timeout: float = defaults.SOCKET_TIMEOUT) -> Any:
    """A redis-py client (sync, or ``redis.asyncio`` when ``asyncio=True``) for ``url``.

    ``timeout`` is the socket connect and read timeout (a URL's ``socket_timeout`` query
    parameter overrides it); the client's own retries are off.
    """
    url = resolve_url(url)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
        raise ConfigError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. redis://[::1 (an unclosed IPv6 bracket)
        raise ConfigError(f"invalid Redis URL {redact(url)!r}: {exc}") from None
    try:
        if parts.scheme in ("redis", "rediss", "unix"):
            if parts.scheme != "unix" and parts.path.strip("/") and not parts.path.strip("/").isdigit():
                raise ConfigError(f"expected a database number as the path of {redact(url)!r}")
            client = _single(url, asyncio, timeout)
        elif parts.scheme in ("redis+cluster", "rediss+cluster"):
            client = _cluster(parts, asyncio, timeout)
        elif parts.scheme in ("redis+sentinel", "rediss+sentinel"):
            client = _sentinel(parts, asyncio, timeout)
        else:
            raise ConfigError(f"unsupported Redis URL scheme {parts.scheme!r} in {redact(url)!r}: use {_SCHEMES}")
    except ConfigError:
        raise
    except (RedisError, RedisClusterException) as exc:
        # a Cluster client maps the cluster while it is built: the nodes may be unreachable
        # or refuse the credentials (ACL: a cluster client also needs +cluster|slots +command)
        raise CoordinatorUnavailableError("connect", None, exc) from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid Redis URL {redact(url)!r}: {exc}") from None
    client.flo_coord_connect = ConnectSpec(url, asyncio, float(timeout))
    return client


def _single(url: str, asyncio: bool, timeout: float) -> Any:
    if asyncio:
        import redis.asyncio as aredis

        # redis-py's asyncio pool stops at 100 connections by default (then every extra call
        # fails); followers each hold one while they wait, so allow as many as Redis does.
        # A plain pool: a blocking one costs every call ~10 us on the hot path.
        return aredis.Redis.from_url(url, max_connections=defaults.MAX_CONNECTIONS, **_common(timeout, True))
    import redis

    return redis.Redis.from_url(url, **_common(timeout, False))


def _cluster(parts: Any, asyncio: bool, timeout: float) -> Any:
    if parts.path not in ("", "/", "/0"):
        raise ConfigError("redis+cluster:// URLs take no database number (a Cluster has only db 0)")
    kwargs: dict[str, Any] = {
        **_credentials(parts.netloc),
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        **_query(parts),
    }
    if parts.scheme.startswith("rediss"):
        kwargs["ssl"] = True
    kwargs.pop("db", None)
    hosts = _hosts(parts.netloc)
    # ``retry`` is the Cluster client's own re-routing retry count (10 by default): off.
    if asyncio:
        from redis.asyncio.cluster import ClusterNode as AsyncNode
        from redis.asyncio.cluster import RedisCluster as AsyncCluster

        return AsyncCluster(startup_nodes=[AsyncNode(h, p) for h, p in hosts], retry=no_client_retries(True), **kwargs)
    from redis.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], retry=no_client_retries(False), **kwargs)


def _sentinel(parts: Any, asyncio: bool, timeout: float) -> Any:
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigError("redis+sentinel:// URLs need the service name as their path, e.g. /mymaster")
    service = path[0]
    if len(path) > 1 and not path[1].isdigit():
        raise ConfigError(f"expected a database number after the service name, got {path[1]!r}")
    db = int(path[1]) if len(path) > 1 else 0
    query = _query(parts)
    # The Sentinels themselves: same timeouts, no retries, their own credentials if given.
    sentinel_kwargs: dict[str, Any] = _common(timeout, asyncio)
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query.pop("sentinel_password")
    if "sentinel_username" in query:
        sentinel_kwargs["username"] = query.pop("sentinel_username")
    kwargs: dict[str, Any] = {**_credentials(parts.netloc), **_common(timeout, asyncio), "db": db, **query}
    if parts.scheme.startswith("rediss"):
        kwargs["ssl"] = True
    if asyncio:
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        return AsyncSentinel(_hosts(parts.netloc), sentinel_kwargs=sentinel_kwargs, **kwargs).master_for(service)
    from redis.sentinel import Sentinel

    return Sentinel(_hosts(parts.netloc), sentinel_kwargs=sentinel_kwargs, **kwargs).master_for(service)


def attempt_timeout(deadline: float, timeout: float, floor: float = MIN_SOCKET_TIMEOUT) -> float:
    """The socket timeout for a client built with ``timeout`` under a retry ``deadline``.

    A sync call cannot be interrupted, so a client flo_coord built gets at most half the
    deadline: two attempts on a frozen server end by the deadline (the sync shell starts no
    attempt that could end later). ``floor`` keeps room for blocking calls (WAIT of
    ``durability="replica"``); without any, the shells pass a small one.
    """
    return min(timeout, max(floor, deadline / 2))


def rebuilt_for_deadline(client: Any, deadline: float, floor: float = MIN_SOCKET_TIMEOUT) -> Any:
    """``client`` itself, or (for a sync client ``connect`` built with a socket timeout
    above ``attempt_timeout``) a replacement with that smaller timeout."""
    spec = getattr(client, "flo_coord_connect", None)
    if not isinstance(spec, ConnectSpec) or spec.asyncio:
        return client  # asyncio shells cut every attempt at the deadline themselves
    wanted = attempt_timeout(deadline, spec.timeout, floor)
    if wanted >= spec.timeout:
        return client
    replacement = connect(spec.url, asyncio=False, timeout=wanted)
    client.close()
    return replacement
