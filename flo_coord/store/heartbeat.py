"""Lease renewal in the background, and the periodic runners it is built on.

- ``HeartbeatThread`` / ``HeartbeatTask`` renew every lease a manager holds, every
  ``lease_ttl * defaults.HEARTBEAT_FRACTION`` seconds, so a live worker never loses a
  request (``manager.start_heartbeat()`` starts one). Renewal is the store's own
  protocol (the HEARTBEAT script), so it lives here; recovery of other workers' requests
  (the reaper) and the cancel watcher are above the store, in ``flo_coord.ownership``.
- ``Periodic`` (a daemon thread) and ``AsyncPeriodic`` (an asyncio task) call a tick
  every ``interval`` seconds until stopped; the reaper and the cancel watcher use them too.

A failed round is retried at the next tick: leases are sized so that one missed renewal
does not lose them. Redis being unreachable (``CoordinatorUnavailableError``) is a state
the shell's ``RedisHealth`` logs once per change, so a round failing for that reason is
not logged again; any other failure is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from flo_coord import defaults
from flo_coord.errors import CoordinatorUnavailableError

log = logging.getLogger("flo_coord.ownership")  # the logger these rounds always used


def _round_failed(name: str, interval: float, exc: Exception) -> None:
    if isinstance(exc, CoordinatorUnavailableError):  # an outage: logged once by RedisHealth
        log.debug("%s round failed (%s); retrying in %.2fs", name, exc, interval)
    else:
        log.error("%s round failed; retrying in %.2fs", name, interval, exc_info=exc)


class Periodic:
    """Call ``tick()`` every ``interval`` seconds in a daemon thread named ``name`` until
    ``stop``; a tick that raises is logged and the next one runs on time."""

    def __init__(self, name: str, interval: float, tick: Callable[[], Any]) -> None:
        self.interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Periodic:
        """Start the thread; returns self (usable as a context manager that stops it)."""
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except Exception as exc:
                _round_failed(self._thread.name, self.interval, exc)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop ticking; waits up to ``timeout`` seconds for a running tick (not from the tick itself)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Periodic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AsyncPeriodic:
    """Await ``tick()`` every ``interval`` seconds in a task named ``name`` until ``stop``;
    a tick that raises is logged and the next one runs on time."""

    def __init__(self, name: str, interval: float, tick: Callable[[], Awaitable[Any]]) -> None:
        self.name = name
        self.interval = interval
        self._tick = tick
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> AsyncPeriodic:
        """Start the task on the running loop; returns self (an async context manager that stops it)."""
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
        """Stop ticking and wait for the task to end (a tick in flight is cancelled)."""
        if self._task is not None:
            self._stopping = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def __aenter__(self) -> AsyncPeriodic:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _Renews(Protocol):
    """A FailoverManager: what a heartbeat needs of it."""

    @property
    def lease_ttl(self) -> float: ...

    def heartbeat(self) -> int: ...


class _RenewsAsync(Protocol):
    """An AsyncFailoverManager: what a heartbeat task needs of it."""

    @property
    def lease_ttl(self) -> float: ...

    async def heartbeat(self) -> int: ...


def heartbeat_interval(lease_ttl: float, interval: float | None) -> float:
    """``interval``, or by default ``lease_ttl * defaults.HEARTBEAT_FRACTION`` (seconds)."""
    return interval if interval is not None else lease_ttl * defaults.HEARTBEAT_FRACTION


class HeartbeatThread(Periodic):
    """Renew every lease ``manager`` (a FailoverManager) holds every ``interval`` seconds
    (default ``heartbeat_interval``), in a daemon thread; ``start()`` it."""

    def __init__(self, manager: _Renews, interval: float | None = None) -> None:
        super().__init__("flo-heartbeat", heartbeat_interval(manager.lease_ttl, interval), manager.heartbeat)


class HeartbeatTask(AsyncPeriodic):
    """Renew every lease ``manager`` (an AsyncFailoverManager) holds every ``interval``
    seconds (default ``heartbeat_interval``), in an asyncio task; ``start()`` it."""

    def __init__(self, manager: _RenewsAsync, interval: float | None = None) -> None:
        super().__init__("flo-heartbeat", heartbeat_interval(manager.lease_ttl, interval), manager.heartbeat)


def start_heartbeat(manager: Any, interval: float | None = None) -> HeartbeatThread | HeartbeatTask:
    """Start renewing every lease ``manager`` holds every ``interval`` seconds (default
    ``heartbeat_interval``): a started HeartbeatTask for an AsyncFailoverManager (call it
    in a running event loop), a started HeartbeatThread for a FailoverManager. Stop it
    with ``stop()`` (awaited for the task) or use it as a (async) context manager."""
    if inspect.iscoroutinefunction(manager.heartbeat):
        return HeartbeatTask(manager, interval).start()  # type: ignore[return-value]
    return HeartbeatThread(manager, interval).start()  # type: ignore[return-value]
