"""``AsyncShell``: the I/O shell, written once; its blocking twin is generated from it.

``scripts/unasync.py`` writes ``flo_coord/store/shell_sync.py`` (``SyncShell``,
``_SyncHot``, ``drive``) from this module, as it writes the sync facade from the asyncio
one; ``tests/test_unasync.py`` fails when the twin is stale. Edit this file, never the
twin. What has no ``await`` (a batch's bookkeeping, the fault classification, durability,
the hot path's choice, ``public_error``, the kept connection's making and packing) is in
``flo_coord.store.shell``, shared by both; read its docstring for the design.

The two sides differ in three places, each written once per side, next to each other
here: a statement (or an imported name) whose line ends with ``# unasync: async-only``
is left out of the twin, and the comment block under a ``# unasync: sync-only`` line is
the twin's own code (the script uncomments it).

- Bounding an attempt: an asyncio attempt is cut at the deadline (``asyncio.timeout``;
  on the hot path the coarse ``shell._Cutter``). A blocking call cannot be cut: its
  client's socket timeout bounds it (``connection.rebuilt_for_deadline``), so the twin's
  ``_bounded_attempt``/``_send_fast`` are plain calls, and ``_ShellBase._last_start``
  starts no retry that could end (one socket timeout) past the deadline.
- Cancellation: ``_send`` re-raises a cancellation that redis.asyncio's ``wait_for``
  absorbed (Python 3.11). A blocking call has none to lose: the twin's ``_send`` is
  ``_exchange``.
- Closing the kept connection: both sides see whether it is in use by a non-blocking
  acquire of the same lock (``_HotConnection.lock``; on one event loop it never waits), but
  only the twin's ``close`` waits for it (a thread in the middle of an exchange): an
  event loop cannot wait on a thread lock, so ``aclose`` does not.

Only the asyncio shell has ``run_batch`` (the batcher's merged batches).
"""

from __future__ import annotations

import asyncio  # unasync: async-only
import time
from collections.abc import (
    Awaitable,  # unasync: async-only
    Callable,
)
from typing import Any

import redis.exceptions as rex
from tenacity import AsyncRetrying

from flo_coord.store.core import (
    Call,
    Eval,
    Operation,
    Single,
    merge_appends,  # unasync: async-only
)
from flo_coord.store.retry import RetryPolicy
from flo_coord.store.shell import (
    _MAX_RELOADS,
    _MIN_ATTEMPT,  # unasync: async-only
    _PENDING,  # unasync: async-only
    T,
    _advance,
    _Cutter,  # unasync: async-only
    _finish,
    _forks,
    _HotConnection,
    _Run,
    _ShellBase,
)


class AsyncShell(_ShellBase):
    """Sends the core's operations on its redis-py client (``AsyncFailoverManager.shell``)."""

    asynchronous = True

    def __init__(self, client: Any, policy: RetryPolicy | None = None, **options: Any) -> None:
        super().__init__(client, policy, **options)
        self._hot = _AsyncHot(self.client) if _HotConnection.usable(self.client, self.asynchronous) else None
        self._cutter = _Cutter()  # unasync: async-only

    async def aclose(self) -> None:
        """Close the connection kept for the hot path (the manager's ``aclose`` calls it)."""
        if self._hot is not None:
            await self._hot.aclose()

    async def _send(self, calls: list[Call]) -> list[Any]:  # unasync: async-only
        task = asyncio.current_task()
        asked = task.cancelling() if task is not None else 0
        replies = await self._exchange(calls)
        # redis.asyncio sends through asyncio.wait_for, which on Python 3.11 returns the result
        # of a send that finished although the caller was cancelled meanwhile: the cancellation
        # is lost and only task.cancelling() remembers it. Re-raise it, or the caller goes on as
        # if never cancelled (a gateway draining on SIGTERM saw its generations run to the end).
        # The reply is dropped: to the operation it is an outcome it never saw (an unknown one).
        if task is not None and task.cancelling() > asked:
            raise asyncio.CancelledError
        return replies

    async def _exchange(self, calls: list[Call]) -> list[Any]:
        """Send ``calls`` in one round trip; their replies, error replies as exceptions."""
        if self._hot is not None and all(type(call) is Eval for call in calls):
            return await self._hot.exchange([self._args(call) for call in calls])
        if len(calls) == 1:  # skip the pipeline object
            try:
                return [await self.client.execute_command(*self._args(calls[0]))]
            except rex.ResponseError as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*self._args(call))
        return list(await pipe.execute(raise_on_error=False))

    # unasync: sync-only
    # _send = _exchange  # a blocking call has no cancellation to lose

    async def _attempt(self, run: _Run) -> list[Any]:
        for _ in range(_MAX_RELOADS):
            indexes, calls = run.next_pipeline()
            if not calls:
                break
            try:
                replies = await self._send(calls)
            except Exception as exc:
                run.failed(indexes, exc)
                raise
            missing = run.absorb(indexes, replies)
            if not missing:
                break
            await self.scripting.aload(self.client, missing)
        fault = run.fault()
        if fault is not None:
            raise fault
        return run.replies

    async def _bounded_attempt(self, run: _Run, deadline_at: float) -> list[Any]:  # unasync: async-only
        try:
            async with asyncio.timeout(self._attempt_budget(run, deadline_at)):
                return await self._attempt(run)
        except TimeoutError as exc:
            # Cut at the deadline: the calls in flight may or may not have run.
            indexes = [i for i, r in enumerate(run.replies) if r is _PENDING]
            run.failed(indexes, exc)
            raise rex.TimeoutError("no reply before the retry deadline") from exc

    async def _send_fast(self, batch: list[Call], deadline_at: float) -> list[Any]:  # unasync: async-only
        """The hot path's attempt: script calls (never blocking), cut at the deadline like
        any attempt; error replies are returned, not raised."""
        now = time.monotonic()
        budget = max(deadline_at - now, min(_MIN_ATTEMPT, self.policy.deadline))
        if budget < _Cutter.MIN_BUDGET:  # a short budget keeps asyncio.timeout's precision
            try:
                async with asyncio.timeout(budget):
                    return await self._send(batch)
            except TimeoutError as exc:
                raise rex.TimeoutError("no reply before the retry deadline") from exc
        cutter, task = self._cutter, asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        cutter.watch(task, now + budget)
        try:
            return await self._send(batch)
        except asyncio.CancelledError as exc:
            # ours (the attempt outlived its budget) and no other cancellation pending: a timeout
            if cutter.was_cut(task) and task.uncancel() <= cancelling:
                raise rex.TimeoutError("no reply before the retry deadline") from exc
            raise
        finally:
            cutter.forget(task)

    # unasync: sync-only
    # # A blocking attempt cannot be cut: the client's socket timeout bounds it.
    # def _bounded_attempt(self, run: _Run, deadline_at: float) -> list[Any]:
    #     return self._attempt(run)
    #
    # def _send_fast(self, batch: list[Call], deadline_at: float) -> list[Any]:
    #     return self._send(batch)

    async def _resume(
        self, run: _Run, replies: list[Any] | None, failure: Exception | None, deadline_at: float
    ) -> list[Any]:
        """The rest of a hot-path first attempt that got a fault or an error reply."""
        if failure is not None or replies is None:
            run.failed(list(range(len(run.batch))), failure or rex.ConnectionError("no reply"))
            raise failure or rex.ConnectionError("no reply")
        judged = self._judge(run, replies)
        if isinstance(judged, list):
            return judged
        await self.scripting.aload(self.client, judged)
        return await self._bounded_attempt(run, deadline_at)

    async def execute(self, batch: list[Call], deadline_at: float | None = None) -> list[Any]:
        """Execute one batch, retrying transient faults until ``deadline_at`` (monotonic)."""
        deadline_at = self.policy.deadline_at() if deadline_at is None else deadline_at
        run = self._new_run(batch) if not self._fast(batch) else None
        try:  # the first attempt outside tenacity: the common case pays no retry machinery
            if run is None:  # the hot path: the calls as they are, no bookkeeping
                replies: list[Any] | None = None
                failure: Exception | None = None
                try:
                    replies = await self._send_fast(batch, deadline_at)
                except Exception as exc:
                    failure = exc
                if replies is not None and not any(isinstance(r, BaseException) for r in replies):
                    self.health.success()
                    return replies
                run = self._new_run(batch)
                replies = await self._resume(run, replies, failure, deadline_at)
            else:
                replies = await self._bounded_attempt(run, deadline_at)
            self.health.success()
            return replies
        except Exception as exc:
            assert run is not None
            last_start = self._last_start(deadline_at)
            if not run.may_retry(exc) or time.monotonic() >= last_start:
                raise
        async for attempt in AsyncRetrying(**self.policy.tenacity_kwargs(last_start, run.may_retry)):
            with attempt:
                replies = await self._bounded_attempt(run, deadline_at)
                self.health.success()
                return replies
        raise AssertionError("unreachable")  # pragma: no cover

    async def run(self, op: Operation[T], operation: str, request_id: str | None = None) -> T:
        """Run ``op`` to its end: its batches executed with retries under one deadline
        (``RetryPolicy.deadline`` from now); every Redis fault raised as ``public_error`` maps it."""
        deadline_at = self.policy.deadline_at()
        try:
            if isinstance(op, Single) and (call := op.fast_call()) is not None:  # the hot path: no generator
                try:
                    replies = await self.execute([call], deadline_at)
                except Exception as exc:
                    op.throw(exc)  # it hears that the outcome is unknown (an append records it); raises exc
                    raise
                return _finish(op, replies[0])
            return await adrive(op, lambda batch: self.execute(batch, deadline_at))
        except Exception as exc:
            error = self._error(exc, operation, request_id)
            if error is exc:
                raise
            raise error from exc

    async def run_batch(  # unasync: async-only
        self, batch: list[Call], operation: str = "append_tokens", request_id: str | None = None
    ) -> list[Any]:
        """Execute one batch with retries (for callers that multiplex operations).

        On one Redis (not a Cluster), the batch's appends go as one APPEND_MANY call.
        """
        try:
            if self._merge_appends:
                merged, unmerge = merge_appends(batch)
                return unmerge(await self.execute(merged))
            return await self.execute(batch)
        except Exception as exc:
            error = self._error(exc, operation, request_id)
            if error is exc:
                raise
            raise error from exc


class _AsyncHot(_HotConnection):
    async def exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` at once and read their replies (error replies as exceptions)."""
        if not self.lock.acquire(False):  # without blocking: another task or thread is using it, borrow one
            conn = await self.pool.get_connection(*self.name_args)
            try:
                return await self._exchange(conn, commands)
            finally:
                await self.pool.release(conn)
        try:
            return await self._exchange(self._kept(), commands)
        finally:
            self.lock.release()

    async def _exchange(self, conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        if not getattr(conn, "is_connected", False):
            # as the pool does: a Sentinel-managed connection finds the primary here (its
            # send_packed_command would reconnect to the address it had)
            await conn.connect()
        await conn.send_packed_command(self._pack(conn, commands))
        if len(commands) == 1:
            try:
                return [await conn.read_response()]
            except rex.ResponseError as exc:
                return [exc]
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except rex.ResponseError as exc:
                replies.append(exc)
        return replies

    async def aclose(self) -> None:  # unasync: async-only
        conn, self.conn = (self.conn if self.forks == _forks[0] else None), None
        if conn is not None:
            await conn.disconnect()

    # unasync: sync-only
    # def close(self) -> None:
    #     with self.lock:  # after a thread in the middle of an exchange
    #         conn, self.conn = (self.conn if self.forks == _forks[0] else None), None
    #         if conn is not None:
    #             conn.disconnect()


async def adrive(op: Operation[T], execute: Callable[[list[Call]], Awaitable[list[Any]]]) -> T:
    """Run an operation to its end; I/O errors are thrown into it so it may handle them."""
    try:
        batch = next(op)
        while True:
            try:
                replies = await execute(batch)
            except Exception as exc:
                batch = op.throw(exc)
            else:
                batch = _advance(op, replies)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
