"""The reference worker: take submitted requests from the queue and run them.

A worker runs a Coordinator (heartbeats, reaper), reads the intake stream with a
consumer group, tracks each request before acknowledging it, and runs up to
``concurrency`` requests at once. On SIGTERM it stops taking work, gives in-flight
requests ``grace`` seconds to finish, then hands the rest back (their leases end at
once, so other replicas take them over immediately).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from flo_coord import queue
from flo_coord.errors import UnknownModelError
from flo_coord.executor import Coordinator
from flo_coord.queue import Submission

log = logging.getLogger("flo_coord.worker")


class Worker:
    def __init__(
        self,
        coordinator: Coordinator,
        *,
        concurrency: int = 64,
        grace: float = 10.0,
        block: float = 1.0,
    ) -> None:
        self.coordinator = coordinator
        self.manager = coordinator.manager
        self.concurrency = concurrency
        self.grace = grace
        self.block_ms = max(1, int(block * 1000))
        self._stop = asyncio.Event()
        self._running: set[asyncio.Task[Any]] = set()

    def request_stop(self) -> None:
        """Stop taking work (SIGTERM/SIGINT call this)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def _run(self, op: Any) -> Any:
        return await self.manager.shell.run(op, "queue")

    async def run(self) -> None:
        core = self.manager.core
        await self._run(queue.ensure_group(core))
        await self.coordinator.start()
        log.info("worker %s started (namespace %s)", core.worker_id, core.keys.namespace)
        try:
            while not self._stop.is_set():
                free = self.concurrency - len(self._running)
                if free <= 0:
                    await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                entries = await self._run(queue.reclaim(core, int(self.manager.lease_ttl * 2000), free))
                if not entries:
                    entries = await self._run(queue.take(core, free, self.block_ms))
                for entry_id, submission in entries:
                    await self._accept(entry_id, submission)
        finally:
            await self._shutdown()

    async def _accept(self, entry_id: str, submission: Submission | None) -> None:
        core = self.manager.core
        if submission is None:
            log.warning("dropping undecodable queue entry %s", entry_id)
            await self._run(queue.ack(core, entry_id))
            return
        rid = submission.request_id
        if await self.manager.get_context(rid) is not None or await self.manager.outcome(rid) is not None:
            await self._run(queue.ack(core, entry_id))  # already started elsewhere: leases cover it
            return
        ctx = await self.manager.start_tracking(
            rid,
            submission.prompt,
            submission.primary,
            messages=submission.messages,
            max_tokens=submission.max_tokens,
        )
        if submission.model is not None and not await self._assign_model(ctx, submission.model):
            await self._run(queue.ack(core, entry_id))
            return
        await self._run(queue.ack(core, entry_id))
        log.info("request %s accepted", rid, extra={"request_id": rid, "epoch": ctx.epoch})
        task = self.coordinator.resume_in_background(ctx)
        self._running.add(task)
        task.add_done_callback(self._done)

    async def _assign_model(self, ctx: Any, model: str) -> bool:
        """Route the request through model group ``model``; an unknown one ends it failed (False)."""
        try:
            await self.coordinator.assign_model(ctx, model)
        except UnknownModelError as exc:
            await self.manager.fail(ctx.request_id, str(exc), kind=type(exc).__name__)
            return False
        return True

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s ended with %s", task.get_name(), task.exception())

    async def _shutdown(self) -> None:
        if self._running:
            log.info("stopping: giving %d requests %.1fs to finish", len(self._running), self.grace)
            await asyncio.wait(self._running, timeout=self.grace)
        await self.coordinator.aclose(hand_back=True)  # cancels the rest and hands them back
        log.info("worker %s stopped", self.manager.worker_id)
