"""What every subcommand shares: user errors, configuration (flags > env > TOML > defaults), Redis checks."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from flo_coord.execution.backends import BackendSpec
    from flo_coord.settings import Settings
    from flo_coord.store.facade import AsyncFailoverManager

log = logging.getLogger("flo_coord.cli")

T = TypeVar("T")

REDIS_HINT = "point --redis-url (or FLO_REDIS_URL) at a running Redis, or try 'flo-coord demo', which starts its own"


class UsageError(Exception):
    """A mistake the user can fix (bad flag value, unreachable Redis, unknown request): exit code 2."""


class CommandFailedError(Exception):
    """Something went wrong that is not the user's input (a request failed): exit code 1."""


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print; flo_coord.redact)."""
    from flo_coord.redact import redact_url

    return redact_url(url)


def env_value(key: str, cast: Callable[[str], T], what: str) -> T | None:
    """A CLI-only setting from its environment variable (``settings.CLI_ENVIRONMENT``), or None."""
    from flo_coord.settings import CLI_ENVIRONMENT

    name = CLI_ENVIRONMENT[key]
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return cast(raw)
    except (ValueError, TypeError):
        raise UsageError(f"${name}={raw!r} is not {what}") from None


def pick(flag: T | None, key: str, cast: Callable[[str], T], what: str, default: T) -> T:
    """A CLI-only setting: the flag, else its environment variable, else ``default``."""
    if flag is not None:
        return flag
    value = env_value(key, cast, what)
    return default if value is None else value


_BACKEND_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)=(?P<url>[^,]+),(?P<model>[^,]+)"
    r"(?:,(?P<kind>[a-z]*))?(?:,(?P<provider>[A-Za-z0-9]+))?$"
)


def parse_backend(value: str) -> BackendSpec:
    """``NAME=URL,MODEL[,KIND[,PROVIDER]]`` as a BackendSpec (a deployment).

    KIND: openai (default), ollama or anthropic; PROVIDER: a ServingBackend, needed when
    NAME is not one (``vllm-a=http://h:8000,llama,,Vllm``).
    """
    from flo_coord.errors import ConfigError
    from flo_coord.execution.backends import BackendSpec

    match = _BACKEND_RE.match(value.strip())
    if match is None:
        raise UsageError(
            f"--backend {value!r}: expected NAME=URL,MODEL[,KIND[,PROVIDER]], e.g. Vllm=http://localhost:8000,llama"
        )
    try:
        if match["kind"] not in (None, "", "openai", "ollama", "anthropic"):
            raise UsageError(f"--backend {value!r}: KIND must be openai, ollama or anthropic, got {match['kind']!r}")
        kind: Any = match["kind"] or None
        return BackendSpec(
            name=match["name"], provider=match["provider"], base_url=match["url"], model=match["model"], kind=kind
        )
    except ConfigError as exc:
        raise UsageError(f"--backend {value!r}: {exc}") from None


def load(args: Any) -> Settings:
    """Settings for a subcommand: its flags, then FLO_* variables, then the TOML file, then the defaults."""
    import msgspec

    from flo_coord.errors import ConfigError
    from flo_coord.settings import load_settings

    overrides = {
        ("redis", "url"): getattr(args, "redis_url", None),
        ("redis", "namespace"): getattr(args, "namespace", None),
        ("ownership", "lease_ttl"): getattr(args, "lease_ttl", None),
    }
    specs = [parse_backend(v) for v in getattr(args, "backend", None) or []]
    if specs:
        from flo_coord.execution.groups import check_unique

        try:
            check_unique(specs)  # a second --backend with the same NAME never silently replaces the first
        except ConfigError as exc:
            raise UsageError(f"--backend: {exc}") from None
    # Flags win over the file: these backends (which the file's [[models]] may name), tried in
    # the order given (deployments of one provider share its place, load-balanced), then the file's order.
    settings = load_settings(getattr(args, "config", None), overrides=overrides, backends=specs)
    if specs:
        order = [s.backend for s in specs] + list(settings.failover.fallback_order)
        settings.failover = msgspec.structs.replace(settings.failover, fallback_order=list(dict.fromkeys(order)))
    return settings


def unused_backends(settings: Settings) -> list[str]:
    """Configured backends that ``failover.fallback_order`` never reaches (a worker warns about them)."""
    reached = {b.value for b in settings.failover.fallback_order}
    reached |= {entry.name for group in settings.models for entry in group.entries}
    return [s.name for s in settings.backends if not {s.name, s.backend.value} & reached]


def check_redis(url: str, timeout: float = 3.0, *, unreachable_ok: bool = False) -> bool:
    """Fail fast, with a message saying what to do, when Redis at ``url`` cannot be used.

    Returns True when Redis answers PING within ``timeout`` seconds. A bad URL, refused
    credentials or an error reply raise UsageError. Unreachable (connection refused, timeout)
    raises UsageError too, unless ``unreachable_ok``: then it returns False, for the long-running
    commands that wait an outage out (issue 10: a worker rides out an outage of any length).
    """
    import redis.exceptions as rex

    from flo_coord.errors import ConfigError
    from flo_coord.store import connect

    shown = redact(url)
    try:
        client = connect(url, timeout=timeout)
    except (ConfigError, ValueError) as exc:
        raise UsageError(f"bad Redis URL {shown}: {exc}; {REDIS_HINT}") from None
    try:
        client.ping()
    except (rex.AuthenticationError, rex.AuthorizationError) as exc:
        raise UsageError(f"Redis at {shown} refused the credentials ({exc}); fix the URL's user:password") from None
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        if unreachable_ok:
            return False
        reason = str(exc).rstrip(".") or type(exc).__name__
        raise UsageError(f"cannot reach Redis at {shown} ({reason}); {REDIS_HINT}") from None
    except rex.ResponseError as exc:
        raise UsageError(f"Redis at {shown} answered PING with an error ({exc})") from None
    finally:
        client.close()
    return True


async def wait_for_redis(manager: AsyncFailoverManager, url: str, stop: asyncio.Event) -> bool:
    """PING Redis until it answers, waiting out an outage of any length with the outage
    backoff (``retry.outage_retrying``: capped, jittered exponential), logged once when the
    wait starts and once when it ends. Returns True once Redis answers, False when ``stop``
    is set first (SIGTERM while waiting: the caller exits cleanly)."""
    from flo_coord.errors import CoordinatorUnavailableError
    from flo_coord.store import outage_retrying

    waited = False

    async def ping() -> None:
        nonlocal waited
        async for attempt in outage_retrying():
            with attempt:
                try:
                    await manager.ping()
                except CoordinatorUnavailableError as exc:
                    cause = exc.cause
                    if not waited:
                        log.warning(
                            "Redis at %s is unreachable (%s); waiting for it (SIGTERM stops)", redact(url), cause
                        )
                        waited = True
                    raise CoordinatorUnavailableError("startup", None, cause) from cause

    pinging, stopping = asyncio.ensure_future(ping()), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({pinging, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not pinging.done():
            pinging.cancel()
        await asyncio.gather(pinging, stopping, return_exceptions=True)
    if pinging.cancelled():
        return False
    pinging.result()
    if waited:
        log.warning("Redis at %s answers again; starting", redact(url))
    return True


def client_manager(settings: Settings, worker_id: str | None = None) -> AsyncFailoverManager:
    """An AsyncFailoverManager for a client command (checked Redis first)."""
    from flo_coord.store import AsyncFailoverManager

    check_redis(settings.redis.url)
    return AsyncFailoverManager(
        settings.failover,
        url=settings.redis.url,
        namespace=settings.redis.namespace,
        worker_id=worker_id or f"cli-{os.getpid()}",
        lease_ttl=settings.ownership.lease_ttl,
        max_age=settings.ownership.max_age,
        retention=settings.ownership.retention,
        durability=settings.redis.durability,
    )


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def redis_time(manager: AsyncFailoverManager) -> float:
    """The Redis server's clock (leases are measured on it)."""
    return await manager.server_time()


def setup_logging(args: Any, default_level: str = "WARNING", **fields: Any) -> None:
    from flo_coord import logs

    fmt = pick(getattr(args, "log_format", None), "log_format", str, "a log format", "kv")
    level = pick(getattr(args, "log_level", None), "log_level", str, "a log level", default_level)
    if fmt not in logs.FORMATS:
        raise UsageError(f"log format must be one of {', '.join(logs.FORMATS)}, got {fmt!r}")
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise UsageError(f"log level must be one of debug, info, warning, error, critical, got {level!r}")
    logs.configure(fmt, level, **fields)
