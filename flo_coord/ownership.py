"""Background helpers that keep ownership alive and recover orphans.

- ``start_heartbeat(manager)`` (``HeartbeatThread`` / ``HeartbeatTask``, store-level lease
  renewal kept in ``flo_coord.store.heartbeat``) renews every lease a manager holds, every
  ``lease_ttl * HEARTBEAT_FRACTION`` seconds, so a live worker never loses a request.
- ``CancelWatcher`` stops the local generation of a request cancelled from anywhere.
- ``Reaper`` / ``AsyncReaper`` claim requests whose lease expired (their worker died or
  froze) and hand each claimed context to a callback, such as the executor's resume.

A failed round is retried at the next tick: leases are sized so that one missed renewal
does not lose them. Redis being unreachable (``CoordinatorUnavailableError``) is a state
the shell's ``RedisHealth`` logs once per change, so a round failing for that reason is
not logged again; any other failure is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flo_coord import defaults
from flo_coord.models import StreamingContext
from flo_coord.store import AsyncPeriodic, HeartbeatTask, HeartbeatThread, Periodic, start_heartbeat

if TYPE_CHECKING:
    from flo_coord.store.facade import AsyncFailoverManager, FailoverManager

__all__ = [
    "AsyncReaper",
    "CancelWatcher",
    "HeartbeatTask",
    "HeartbeatThread",
    "Reaper",
    "reaper_interval",
    "start_heartbeat",
]

log = logging.getLogger("flo_coord.ownership")


def reaper_interval(lease_ttl: float, interval: float | None) -> float:
    """``interval``, or by default ``lease_ttl * defaults.REAPER_FRACTION`` (seconds)."""
    return interval if interval is not None else lease_ttl * defaults.REAPER_FRACTION


def _hand_over(on_claim: Callable[[StreamingContext], Any], ctx: StreamingContext) -> Any:
    """Log a claim (with the request's fields) and pass the context on."""
    log.info(
        "claimed request %s at epoch %d",
        ctx.request_id,
        ctx.epoch,
        extra={"request_id": ctx.request_id, "epoch": ctx.epoch, "worker_id": ctx.owner},
    )
    return on_claim(ctx)


class Reaper(Periodic):
    """Every ``interval`` s, claim up to ``limit`` orphans and call ``on_claim`` with each."""

    def __init__(
        self,
        manager: FailoverManager,
        on_claim: Callable[[StreamingContext], Any],
        interval: float | None = None,
        limit: int = 100,
    ) -> None:
        self.manager, self.on_claim, self.limit = manager, on_claim, limit
        super().__init__("flo-reaper", reaper_interval(manager.lease_ttl, interval), self.reap_once)

    def reap_once(self) -> list[StreamingContext]:
        """One round: claim up to ``limit`` orphans, hand each to ``on_claim``; returns the claimed contexts."""
        claimed = self.manager.claim_orphans(self.limit)
        for ctx in claimed:
            _hand_over(self.on_claim, ctx)
        return claimed


class AsyncReaper(AsyncPeriodic):
    """The asyncio reaper: ``on_claim`` may be a coroutine function (it is awaited)."""

    def __init__(
        self,
        manager: AsyncFailoverManager,
        on_claim: Callable[[StreamingContext], Any],
        interval: float | None = None,
        limit: int = 100,
    ) -> None:
        self.manager, self.on_claim, self.limit = manager, on_claim, limit
        super().__init__("flo-reaper", reaper_interval(manager.lease_ttl, interval), self.reap_once)

    async def reap_once(self) -> list[StreamingContext]:
        """One round: claim up to ``limit`` orphans, hand each to ``on_claim`` (awaited when it
        returns a coroutine); returns the claimed contexts."""
        claimed = await self.manager.claim_orphans(self.limit)
        for ctx in claimed:
            result = _hand_over(self.on_claim, ctx)
            if asyncio.iscoroutine(result):
                await result
        return claimed


class CancelWatcher(AsyncPeriodic):
    """Every ``interval`` seconds (default 0.25), one pipelined check of the cancel flag of
    every request the manager holds; ``on_cancel(request_id)`` stops the local generation of
    a flagged one (the Coordinator then ends it failed, kind "Cancelled", fenced by its epoch).

    ``last_ok``: monotonic seconds of the last round that reached Redis or had nothing to
    check (a readiness probe uses it).
    """

    def __init__(
        self, manager: AsyncFailoverManager, on_cancel: Callable[[str], bool], interval: float | None = None
    ) -> None:
        self.manager, self.on_cancel = manager, on_cancel
        self.last_ok = time.monotonic()
        super().__init__("flo-cancel-watcher", interval if interval is not None else defaults.CANCEL_POLL, self.check)

    async def check(self) -> list[str]:
        """One round; returns the ids whose local generation it stopped."""
        held = self.manager.held()
        flagged = await self.manager.cancel_flags(held) if held else []
        self.last_ok = time.monotonic()
        stopped = [rid for rid in flagged if self.on_cancel(rid)]
        for rid in stopped:
            log.info("request %s cancelled by the caller: stopping its generation", rid)
        return stopped
