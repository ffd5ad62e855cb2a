"""Background helpers that keep ownership alive and recover orphans.

- ``HeartbeatThread`` / ``HeartbeatTask`` renew every lease a manager holds, every
  ``lease_ttl * HEARTBEAT_FRACTION`` seconds, so a live worker never loses a request.
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
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from flo_coord import defaults
from flo_coord.errors import CoordinatorUnavailableError
from flo_coord.models import StreamingContext

if TYPE_CHECKING:
    from flo_coord.store.facade import AsyncFailoverManager, FailoverManager

log = logging.getLogger("flo_coord.ownership")


def _round_failed(name: str, interval: float, exc: Exception) -> None:
    if isinstance(exc, CoordinatorUnavailableError):  # an outage: logged once by RedisHealth
        log.debug("%s round failed (%s); retrying in %.2fs", name, exc, interval)
    else:
        log.error("%s round failed; retrying in %.2fs", name, interval, exc_info=exc)


class _Periodic:
    """Call ``tick`` every ``interval`` seconds in a daemon thread until ``stop``."""

    def __init__(self, name: str, interval: float, tick: Callable[[], Any]) -> None:
        self.interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> _Periodic:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except Exception as exc:
                _round_failed(self._thread.name, self.interval, exc)

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> _Periodic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _AsyncPeriodic:
    """Await ``tick`` every ``interval`` seconds in a task until ``stop``."""

    def __init__(self, name: str, interval: float, tick: Callable[[], Awaitable[Any]]) -> None:
        self.name = name
        self.interval = interval
        self._tick = tick
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> _AsyncPeriodic:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)
        return self

    async def _loop(self) -> None:
        # The flag, not only the cancellation, ends the loop: redis.asyncio (8.x) can swallow
        # a CancelledError that arrives while a command is in flight and return its reply.
        while not self._stopping:
            await asyncio.sleep(self.interval)
            if self._stopping:
                return
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _round_failed(self.name, self.interval, exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def __aenter__(self) -> _AsyncPeriodic:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def heartbeat_interval(lease_ttl: float, interval: float | None) -> float:
    return interval if interval is not None else lease_ttl * defaults.HEARTBEAT_FRACTION


def reaper_interval(lease_ttl: float, interval: float | None) -> float:
    return interval if interval is not None else lease_ttl * defaults.REAPER_FRACTION


class HeartbeatThread(_Periodic):
    def __init__(self, manager: FailoverManager, interval: float | None = None) -> None:
        super().__init__("flo-heartbeat", heartbeat_interval(manager.lease_ttl, interval), manager.heartbeat)


class HeartbeatTask(_AsyncPeriodic):
    def __init__(self, manager: AsyncFailoverManager, interval: float | None = None) -> None:
        super().__init__("flo-heartbeat", heartbeat_interval(manager.lease_ttl, interval), manager.heartbeat)


def _hand_over(on_claim: Callable[[StreamingContext], Any], ctx: StreamingContext) -> Any:
    """Log a claim (with the request's fields) and pass the context on."""
    log.info(
        "claimed request %s at epoch %d",
        ctx.request_id,
        ctx.epoch,
        extra={"request_id": ctx.request_id, "epoch": ctx.epoch, "worker_id": ctx.owner},
    )
    return on_claim(ctx)


class Reaper(_Periodic):
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
        claimed = self.manager.claim_orphans(self.limit)
        for ctx in claimed:
            _hand_over(self.on_claim, ctx)
        return claimed


class AsyncReaper(_AsyncPeriodic):
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
        claimed = await self.manager.claim_orphans(self.limit)
        for ctx in claimed:
            result = _hand_over(self.on_claim, ctx)
            if asyncio.iscoroutine(result):
                await result
        return claimed


class CancelWatcher(_AsyncPeriodic):
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
        flagged = await self.manager.shell.run(self.manager.core.cancel_flags(held), "cancel") if held else []
        self.last_ok = time.monotonic()
        stopped = [rid for rid in flagged if self.on_cancel(rid)]
        for rid in stopped:
            log.info("request %s cancelled by the caller: stopping its generation", rid)
        return stopped
