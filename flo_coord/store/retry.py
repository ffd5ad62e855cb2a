"""The one retry layer: tenacity around batches whose calls are safe to send again.

flo_coord turns off redis-py's own retries on every client it uses (``disable_client_retries``),
so a fault is never retried twice over. A transient fault (connection reset or refused,
timeout, LOADING, BUSY, READONLY after a failover, TRYAGAIN, CLUSTERDOWN, MASTERDOWN,
NOREPLICAS, UNBLOCKED) is retried with exponential backoff and full jitter until the
operation's ``deadline`` (seconds, counted from the start of the whole operation, not of
one batch); then the operation raises ``CoordinatorUnavailableError``. Anything else is
raised at once.

A batch holding a call that is not idempotent (an XADD: a history entry or a queued
submission) is retried only when the fault proves the call did not run: Redis refused it
(LOADING, READONLY, ...) or the connection could not even be opened. A reply lost after
the call was sent leaves it unknown, so it is not repeated.
"""

from __future__ import annotations

import inspect
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.exceptions as rex
from redis.backoff import NoBackoff
from tenacity import RetryCallState, wait_random_exponential

from flo_coord import defaults
from flo_coord.errors import ConfigError

_log = logging.getLogger("flo_coord.redis")

#: First word of an error reply that means "not now": Redis refused the command without
#: running it, and the same command may succeed shortly.
REFUSALS = frozenset({"BUSY", "LOADING", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "NOREPLICAS"})
#: Error replies that are transient but may come after the command ran (a blocked
#: command unblocked by a failover).
_OTHER_TRANSIENT = frozenset({"UNBLOCKED"})


def _first_word(exc: BaseException) -> str:
    message = str(exc)
    return message.split(" ", 1)[0] if message else ""


def is_refusal(exc: BaseException) -> bool:
    """True when Redis refused the command without running it (so a retry cannot repeat it)."""
    if isinstance(exc, rex.BusyLoadingError | rex.ReadOnlyError | rex.TryAgainError | rex.ClusterDownError):
        return True
    return isinstance(exc, rex.ResponseError) and _first_word(exc) in REFUSALS


def _bad_certificate(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):  # redis-py raises its ConnectionError while handling the ssl error
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_transient(exc: BaseException) -> bool:
    """True for faults that go away on their own (and so are worth a retry)."""
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError) or _bad_certificate(exc):
        return False  # wrong credentials or an untrusted certificate do not heal; report them at once
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, rex.SlotNotCoveredError):
        return True  # a cluster in the middle of a failover or resharding
    if is_refusal(exc):
        return True
    return isinstance(exc, rex.ResponseError) and _first_word(exc) in _OTHER_TRANSIENT


def not_sent(exc: BaseException) -> bool:
    """True when the fault proves a command was not run: refused, or no connection was made."""
    if is_refusal(exc):
        return True
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return False
    if isinstance(exc, ConnectionRefusedError):
        return True
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
        # redis-py words connect-phase failures "Error 111 connecting to host:port" and
        # "Timeout connecting to server"; anything later may have reached the server.
        cause = exc.__cause__ or exc.__context__
        return "connecting to" in str(exc) or isinstance(cause, ConnectionRefusedError)
    return False


def no_client_retries(asyncio: bool = False) -> Any:
    """redis-py's retry object that never retries (flo_coord's layer owns retrying).

    Asyncio clients need ``redis.asyncio.retry.Retry`` (its ``call_with_retry`` awaits the
    call and runs the disconnect callback on errors); sync clients ``redis.retry.Retry``.
    """
    if asyncio:
        from redis.asyncio.retry import Retry as AsyncRetry

        return AsyncRetry(NoBackoff(), 0)
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def is_async_client(client: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(client, "execute_command", None))


def disable_client_retries(client: Any) -> None:
    """Switch off a redis-py client's own retries (plain, Sentinel-managed or Cluster).

    redis-py 6+ retries a failed command up to 10 times with backoff by default (the
    ``Retry`` of a plain client's connections; a Cluster client's ``retry`` counts its
    re-routing attempts after connection errors). Left on, a dead server would cost
    10 x (socket timeout + backoff) inside one of our attempts and blow the deadline.
    MOVED/ASK redirects of a Cluster client are not retries and keep working.
    """
    set_retry = getattr(client, "set_retry", None)
    if set_retry is None:
        return
    asynchronous = is_async_client(client)
    retry = no_client_retries(asynchronous)
    try:
        set_retry(retry)
    except AttributeError:
        # redis-py 8.1's BlockingConnectionPool inherits a set_retry that walks lists it does
        # not have: set what that method would, on the connections this pool does have.
        pool = client.connection_pool
        pool.connection_kwargs["retry"] = retry
        for conn in getattr(pool, "_connections", None) or []:
            conn.retry = retry
    # A Sentinel-managed client also asks the Sentinels for the primary on every connect.
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", None) or []:
        if hasattr(sentinel, "set_retry"):
            sentinel.set_retry(no_client_retries(asynchronous))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by a total deadline (seconds).

    ``deadline`` bounds one whole operation (all of its batches and retries). The first
    pause is drawn from [0, ``initial``], each next window doubles up to ``maximum``.
    """

    deadline: float = defaults.RETRY_DEADLINE
    initial: float = defaults.RETRY_INITIAL
    maximum: float = defaults.RETRY_MAX

    def __post_init__(self) -> None:
        for name in ("deadline", "initial", "maximum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"RetryPolicy.{name} must be a finite number of seconds > 0, got {value!r}")
        if self.maximum < self.initial:
            raise ConfigError(f"RetryPolicy.maximum ({self.maximum}) must be >= initial ({self.initial})")

    def deadline_at(self) -> float:
        """The ``time.monotonic()`` instant by which an operation starting now must end."""
        return time.monotonic() + self.deadline

    def tenacity_kwargs(self, deadline_at: float, may_retry: Callable[[BaseException], bool]) -> dict[str, Any]:
        """Arguments of ``tenacity.Retrying``/``AsyncRetrying`` for one batch of an operation.

        Stops once ``deadline_at`` has passed; a pause never reaches past it, so the last
        attempt starts before the deadline. ``may_retry`` decides per fault.
        """
        jitter = wait_random_exponential(multiplier=self.initial, max=self.maximum)

        def wait(state: RetryCallState) -> float:
            return max(0.0, min(jitter(state), deadline_at - time.monotonic()))

        def stop(state: RetryCallState) -> bool:
            return time.monotonic() >= deadline_at

        def retry(state: RetryCallState) -> bool:
            outcome = state.outcome
            if outcome is None or not outcome.failed:
                return False
            exc = outcome.exception()
            return exc is not None and may_retry(exc)

        return {"stop": stop, "wait": wait, "retry": retry, "reraise": True}


class RedisHealth:
    """Whether Redis answered this client's last call, and since when (for readiness and metrics).

    The shells report every operation's end here: ``success()`` or ``failure(exc)`` (a
    ``CoordinatorUnavailableError``). A change of state is logged once (an outage at
    WARNING, the recovery at INFO with its length), never once per call. Times are
    ``time.monotonic()`` seconds (``last_success`` is None before the first success).
    """

    def __init__(self) -> None:
        self.available = True
        self.changed_at = time.monotonic()
        self.last_success: float | None = None
        self.outages = 0
        self.last_error: str | None = None

    def success(self) -> None:
        now = time.monotonic()
        self.last_success = now
        if not self.available:
            self.available, down = True, now - self.changed_at
            self.changed_at = now
            _log.info("Redis reachable again after %.1fs; resuming", down)

    def failure(self, exc: BaseException) -> None:
        self.last_error = str(exc)
        if self.available:
            self.available = False
            self.changed_at = time.monotonic()
            self.outages += 1
            _log.warning("Redis unreachable (%s); waiting it out with backoff", exc)

    def down_for(self) -> float:
        """Seconds since Redis stopped answering (0.0 while it answers)."""
        return 0.0 if self.available else time.monotonic() - self.changed_at


def outage_retrying(
    initial: float = defaults.OUTAGE_BACKOFF_INITIAL, maximum: float = defaults.OUTAGE_BACKOFF_MAX
) -> Any:
    """A tenacity ``AsyncRetrying`` that waits out ``CoordinatorUnavailableError`` for ever:
    capped exponential backoff with full jitter (``initial``..``maximum`` seconds). Any
    other error is raised at once; cancel the task to stop waiting."""
    from tenacity import AsyncRetrying, retry_if_exception_type, stop_never

    from flo_coord.errors import CoordinatorUnavailableError

    return AsyncRetrying(
        retry=retry_if_exception_type(CoordinatorUnavailableError),
        wait=wait_random_exponential(multiplier=initial, max=maximum),
        stop=stop_never,
        reraise=True,
    )
