"""The one retry layer: tenacity around batches whose calls are idempotent by construction.

flo_coord turns off redis-py's own retries on every client it uses, so a fault is never
retried twice over. A transient fault (connection reset or refused, timeout, LOADING,
BUSY, READONLY after a failover, TRYAGAIN, CLUSTERDOWN) is retried with exponential
backoff and full jitter until ``deadline`` seconds have passed; then the operation raises
``CoordinatorUnavailableError``. Anything else is raised at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry
from tenacity import retry_if_exception, stop_after_delay, wait_random_exponential

from flo_coord import defaults

_TRANSIENT_PREFIXES = ("BUSY", "LOADING", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "NOREPLICAS")


def is_transient(exc: BaseException) -> bool:
    """True for faults that go away on their own (and so are worth a retry)."""
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError | TimeoutError | ConnectionError | OSError):
        return True
    if isinstance(exc, rex.BusyLoadingError | rex.ReadOnlyError):
        return True
    if isinstance(exc, rex.ResponseError):
        return str(exc).split(" ", 1)[0] in _TRANSIENT_PREFIXES  # not BUSYGROUP
    return isinstance(exc, rex.ClusterDownError | rex.TryAgainError | rex.MasterDownError)


def no_client_retries() -> Retry:
    """redis-py's retry object that never retries (flo_coord's layer owns retrying)."""
    return Retry(NoBackoff(), 0)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by a total deadline (seconds)."""

    deadline: float = defaults.RETRY_DEADLINE
    initial: float = defaults.RETRY_INITIAL
    maximum: float = defaults.RETRY_MAX

    def tenacity_kwargs(self) -> dict[str, Any]:
        return {
            "stop": stop_after_delay(self.deadline),
            "wait": wait_random_exponential(multiplier=self.initial, max=self.maximum),
            "retry": retry_if_exception(is_transient),
            "reraise": True,
        }
