"""The reference worker: take submitted requests from the queue and run them.

A worker runs a Coordinator (heartbeats, reaper), reads the intake stream with a
consumer group, starts each request with one fenced script before acknowledging it, and
runs up to ``concurrency`` requests at once. On SIGTERM it stops taking work, gives
in-flight requests ``grace`` seconds to finish, then hands the rest back (their leases
end at once, so other replicas take them over immediately) within
``defaults.HAND_BACK_TIMEOUT`` seconds, and logs the ones it could not hand back.

A worker never exits because of Redis or of one request:
- Redis unreachable (``CoordinatorUnavailableError``) is a state it waits out with
  capped, jittered backoff (``retry.outage_retrying``), logged once per change of state
  (``Coordinator.redis_available`` says which state it is in). An entry it could not start
  stays pending in the group and is taken again after the outage.
- A queue entry it cannot run (a ``Poison``, store/queue.py, or input ``start_tracking`` refuses, or
  a stored context that is corrupt) is ended as failed with a typed reason its followers
  see (``error_kind`` = the error's class name), acknowledged, and the worker goes on.
- A late or duplicate delivery of a request that exists or has an outcome is refused by
  the start script itself (START_NEW) and acknowledged: never started twice.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from flo_coord.errors import CoordinatorUnavailableError, CorruptStateError, FloCoordError, PoisonRequestError
from flo_coord.execution.coordinator import Coordinator
from flo_coord.store import Entry, Poison, Submission, outage_retrying

T = TypeVar("T")
log = logging.getLogger("flo_coord.worker")

#: A test hook: awaited with (entry id, submission) just before a submission is started
#: (a test pauses here to let another worker finish the request first). None in production.
BeforeStart = Callable[[str, Submission], Awaitable[None]]


class Worker:
    def __init__(
        self,
        coordinator: Coordinator,
        *,
        concurrency: int = 64,
        grace: float = 10.0,
        block: float = 1.0,
        before_start: BeforeStart | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.manager = coordinator.manager
        self.concurrency = concurrency
        self.grace = grace
        self.block_ms = max(1, int(block * 1000))
        self.before_start = before_start
        self._stop = asyncio.Event()
        self._running: set[asyncio.Task[Any]] = set()
        self._group_checked = False
        #: request ids this worker could not hand back at its last shutdown
        self.not_handed_back: list[str] = []

    def request_stop(self) -> None:
        """Stop taking work (SIGTERM/SIGINT call this)."""
        self._stop.set()

    @property
    def stopping(self) -> asyncio.Event:
        """Set once a stop was requested (for callers that wait on something before ``run``)."""
        return self._stop

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def _until_stopped(self, make: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run ``make()``, waiting out Redis outages, until it returns or a stop is requested.

        Returns (True, result), or (False, None) when stopped first (the step is cancelled:
        an entry it had taken stays pending in the group and is handed out again).
        """

        async def patiently() -> T:
            async for attempt in outage_retrying():
                with attempt:
                    try:
                        return await make()
                    except CoordinatorUnavailableError:
                        self._group_checked = False  # a restarted Redis without AOF has no group
                        raise
            raise AssertionError("unreachable")  # pragma: no cover

        step = asyncio.ensure_future(patiently())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if step.done():
            return True, step.result()
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
        return False, None

    async def _take(self, free: int) -> list[Entry]:
        queue = self.manager.queue
        if not self._group_checked:
            await queue.ensure_group()
            self._group_checked = True
        entries = await queue.reclaim(int(self.manager.lease_ttl * 2000), free)
        if not entries:
            entries = await queue.take(free, self.block_ms)
        return entries

    async def run(self) -> None:
        started, _ = await self._until_stopped(self.manager.queue.ensure_group)
        self._group_checked = started
        await self.coordinator.start()
        log.info("worker %s started (namespace %s)", self.manager.worker_id, self.manager.namespace)
        try:
            while not self._stop.is_set():
                free = self.concurrency - len(self._running)
                if free <= 0:
                    stop = asyncio.ensure_future(self._stop.wait())
                    await asyncio.wait({*self._running, stop}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    continue
                taken, entries = await self._until_stopped(lambda n=free: self._take(n))  # type: ignore[misc]
                if not taken or not await self._accept_all(entries or []):
                    break
        finally:
            await self._shutdown()

    async def _accept_all(self, entries: list[Entry]) -> bool:
        """Accept each entry (waiting out outages); False when a stop came first."""
        for entry_id, item in entries:
            done, _ = await self._until_stopped(lambda e=entry_id, i=item: self._accept(e, i))  # type: ignore[misc]
            if not done:
                return False
        return True

    async def _accept(self, entry_id: str, item: Submission | Poison) -> None:
        """Start one entry's request and acknowledge the entry; never raises but for Redis
        being unreachable (then the entry stays pending and is taken again later)."""
        try:
            if isinstance(item, Poison):
                raise PoisonRequestError(item.reason)
            await self._start(entry_id, item)
        except CoordinatorUnavailableError:
            raise
        except Exception as exc:  # a request no worker can run must not stop this one
            await self._reject(entry_id, item, exc)

    async def _start(self, entry_id: str, submission: Submission) -> None:
        rid = submission.request_id
        if self.before_start is not None:
            await self.before_start(entry_id, submission)
        if submission.model is not None:
            self.coordinator.router.group(submission.model)  # UnknownModelError: rejected before it starts
        ctx = await self.manager.start_new(
            rid, submission.prompt, submission.primary, messages=submission.messages, max_tokens=submission.max_tokens
        )
        if ctx is None:
            # Started before (a late or duplicate delivery): leases cover it. A corrupt stored
            # context raises CorruptStateError here and is ended by _reject.
            await self.manager.get_context(rid)
            await self.manager.queue.ack(entry_id)
            log.info("request %s already started: duplicate queue entry %s dropped", rid, entry_id)
            return
        # Run it first, then acknowledge: a failed ack is retried, and the retry finds the
        # request started (EXISTS) and only acknowledges.
        if submission.model is not None:
            await self.coordinator.assign_model(ctx, submission.model)
        task = self.coordinator.resume_in_background(ctx)
        self._running.add(task)
        task.add_done_callback(self._done)
        log.info("request %s accepted", rid, extra={"request_id": rid, "epoch": ctx.epoch})
        await self.manager.queue.ack(entry_id)

    async def _reject(self, entry_id: str, item: Submission | Poison, exc: Exception) -> None:
        """End an entry's request as failed (when it names a valid request id) and acknowledge it."""
        rid = item.request_id
        kind = type(exc).__name__ if isinstance(exc, FloCoordError) else "InternalError"
        reason = f"the request cannot be run: {exc}"
        log.warning("queue entry %s (request %r) cannot be run: %s", entry_id, rid, exc)
        if rid is not None:
            try:
                ended = await self.manager.reject(rid, reason, kind=kind)
                if not ended and isinstance(exc, CorruptStateError):
                    log.warning("request %r is corrupt but its lease is live; left to its owner", rid)
            except CoordinatorUnavailableError:
                raise
            except FloCoordError as error:  # an invalid request id: nobody can follow it anyway
                log.warning("request %r not ended: %s", rid, error)
        await self.manager.queue.ack(entry_id)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s ended with %s", task.get_name(), task.exception())

    async def _shutdown(self) -> None:
        if self._running:
            log.info("stopping: giving %d requests %.1fs to finish", len(self._running), self.grace)
            await asyncio.wait(self._running, timeout=self.grace)
        # cancels the rest and hands them back, within defaults.HAND_BACK_TIMEOUT
        self.not_handed_back = await self.coordinator.aclose(hand_back=True)
        log.info("worker %s stopped", self.manager.worker_id)
