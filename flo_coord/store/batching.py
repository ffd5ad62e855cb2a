"""The async hot path: appends from many streams share round trips.

Each request has at most one append in flight; text that arrives meanwhile waits and
is committed with the next one (one ``seq``). Pending appends of all requests go to
Redis together, one pipeline per event-loop turn, with at most ``max_in_flight``
pipelines outstanding: when the client or Redis is the bottleneck, text keeps
coalescing into fewer, larger appends instead of queueing more round trips. A caller's
``append`` returns only when Redis has acknowledged its text, so nothing uncommitted
is ever reported committed, and fencing and ``seq`` idempotency are the core's,
unchanged.

An append whose outcome is unknown (``CoordinatorUnavailableError`` or a cancelled
wait: Redis may or may not have applied it) is the core's to settle: the operation
records it in the request's ``Holding`` when the fault is thrown into it (or when it is
abandoned, closed), and the request's next append re-sends it first under its own
``seq`` (``FailoverCore._append``). The batcher only makes sure every operation hears
how its round trip ended: it throws a failed batch's error into each of them and closes
the ones a cancellation cut off.

Text is queued per generation: under (request id, epoch), the generation token of the
caller (given, or the epoch this worker holds when the text is queued). Text queued by a
generation this worker no longer holds (it re-claimed the request at a newer epoch) is
refused with LeaseLostError, never sent under the newer epoch.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from flo_coord.store.core import AppendAck, FailoverCore, Operation
from flo_coord.store.shell import request_error
from flo_coord.store.shell_async import AsyncShell
from flo_coord.store.shell_sync import SyncShell

_Waiter = asyncio.Future  # resolves to AppendAck | None, or raises


class _Pending:
    """One request's text waiting to be committed, and who waits for it."""

    __slots__ = ("chunks", "group", "in_flight", "waiters")

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.waiters: list[_Waiter[AppendAck | None]] = []  # one per append() caller
        self.group: _Waiter[AppendAck | None] | None = None  # shared by the submit() callers
        self.in_flight = False


_Key = tuple[str, int | None]  # (request id, generation epoch; None: not held when queued)


class _Job:
    """One request's append in a batch."""

    __slots__ = ("entry", "epoch", "rid", "text", "waiters")

    def __init__(self, key: _Key, entry: _Pending, text: list[str], waiters: list[_Waiter[AppendAck | None]]) -> None:
        (self.rid, self.epoch), self.entry, self.text, self.waiters = key, entry, text, waiters

    def op(self, core: FailoverCore) -> Operation[AppendAck | None]:
        return core.append_many(self.rid, self.text, self.epoch)


class AppendBatcher:
    """Commits the appends of many requests together (asyncio); see the module docstring.

    ``max_batch``: requests per pipeline at most; ``max_in_flight``: pipelines outstanding
    at most (both >= 1, else ValueError). ``SerialAppender`` is its synchronous twin (the
    sync facade is generated from the async one and uses that instead).
    """

    def __init__(self, core: FailoverCore, shell: AsyncShell, max_batch: int = 2000, max_in_flight: int = 2) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be >= 1")
        self._core = core
        self._shell = shell
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: dict[_Key, _Pending] = {}  # every generation with text waiting or in flight
        self._ready: dict[_Key, _Pending] = {}  # with text waiting and no append in flight (FIFO)
        self._pipelines = 0  # commit tasks started and not finished
        self._flying = 0  # requests whose append is in flight
        self._scheduled = False  # a commit task has been created and has not taken its batch yet
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones

    def _key(self, request_id: str, epoch: int | None) -> _Key:
        if epoch is None:
            held = self._core.holding(request_id)
            epoch = held.epoch if held is not None else None
        return request_id, epoch

    def submit(self, request_id: str, chunk: str, epoch: int | None = None) -> _Waiter[AppendAck | None]:
        """Queue ``chunk`` (already validated) without waiting; the future resolves once Redis acknowledged it.

        For producers that offer text faster than they wait for it: chunks of one request
        queued while its previous append is in flight share one append and one future
        (so a token costs no future of its own). The future is shared: do not cancel it
        (``append`` gives each caller its own).
        """
        loop = asyncio.get_running_loop()
        entry = self._queue(self._key(request_id, epoch), chunk, loop)
        group = entry.group
        if group is None:
            group = entry.group = loop.create_future()
        return group

    async def append(self, request_id: str, chunk: str, epoch: int | None = None) -> AppendAck | None:
        """Commit ``chunk`` (already validated); returns once Redis acknowledged it.

        When nothing else is waiting or in flight, the append is sent at once from the
        caller's task (no hand-off to a commit task: one round trip, like a direct call).
        Cancelling the caller then leaves the outcome unknown, like any interrupted write:
        the core re-sends the text, under the same ``seq``, before the request's next text.
        Otherwise cancelling only stops the caller's wait.
        """
        key = self._key(request_id, epoch)
        if self._pipelines == 0 and not self._scheduled:
            return await self._append_now(key, chunk)
        loop = asyncio.get_running_loop()
        waiter: _Waiter[AppendAck | None] = loop.create_future()
        self._queue(key, chunk, loop).waiters.append(waiter)
        return await waiter

    async def _append_now(self, key: _Key, chunk: str) -> AppendAck | None:
        # Idle: no commit task, so no request has text waiting (it would have started one).
        entry = self._pending.get(key)
        if entry is None:
            entry = self._pending[key] = _Pending()
        entry.in_flight = True  # later text of this request waits for this one
        self._pipelines += 1  # and other requests' appends go through a commit task meanwhile
        self._flying += 1
        job = _Job(key, entry, [chunk], [])
        op = job.op(self._core)
        result: Any = None
        try:
            result = await self._shell.run(op, "append_tokens", job.rid)
            return result  # type: ignore[no-any-return]
        except BaseException as exc:
            op.close()  # cancelled mid-flight: the core records the outcome as unknown
            result = exc
            raise
        finally:
            self._pipelines -= 1
            self._flying -= 1
            self._settle([job], [result])
            self._kick()

    def _queue(self, key: _Key, chunk: str, loop: asyncio.AbstractEventLoop) -> _Pending:
        entry = self._pending.get(key)
        if entry is None:
            entry = self._pending[key] = _Pending()
        entry.chunks.append(chunk)
        if not entry.in_flight:
            self._ready[key] = entry
            if self._may_start():
                self._start(loop)
        return entry

    @property
    def pending(self) -> int:
        """Requests with text waiting or in flight."""
        return len(self._pending)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        # The task's first step runs on the next loop turn, so every append made during
        # this turn joins its batch.
        self._scheduled = True
        self._pipelines += 1
        task = loop.create_task(self._commit())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Job]:
        ready = self._ready
        limit = self._max_batch
        if self._pipelines == 1 and self._max_in_flight > 1 and len(ready) > 1:
            limit = min(limit, (len(ready) + 1) // 2)  # alone: half now, the rest in a second pipeline (_kick)
        if len(ready) <= limit:
            taken = list(ready.items())
            ready.clear()
        else:
            taken = list(itertools.islice(ready.items(), limit))
            for rid, _ in taken:
                del ready[rid]
        jobs: list[_Job] = []
        for key, entry in taken:
            entry.in_flight = True
            waiters = entry.waiters
            if entry.group is not None:
                waiters.append(entry.group)
                entry.group = None
            jobs.append(_Job(key, entry, entry.chunks, waiters))
            entry.chunks, entry.waiters = [], []
        return jobs

    async def _commit(self) -> None:
        self._scheduled = False
        jobs = self._take()
        self._flying += len(jobs)
        self._kick()  # what _take left (it takes half when alone) goes in a second pipeline
        ops = [job.op(self._core) for job in jobs]
        results: list[Any] = []
        try:
            if len(jobs) == 1:  # an idle moment: skip the lockstep bookkeeping
                try:
                    results = [await self._shell.run(ops[0], "append_tokens", jobs[0].rid)]
                except Exception as exc:
                    results = [exc]
            elif jobs:
                results = await run_together(self._shell, ops)
        except BaseException as exc:  # cancelled (loop shutting down): nobody may wait forever
            for op in ops:
                op.close()  # those cut off mid-flight record their outcome as unknown
            results = [exc] * len(jobs)
            raise
        finally:
            self._pipelines -= 1
            self._flying -= len(jobs)
            self._settle(jobs, results)
            self._kick()

    def _may_start(self) -> bool:
        """A commit may start: a pipeline is free and, while another is in flight, at least
        half as many requests are ready as it carries. Why: pipelines of similar sizes keep
        the client (settling one) and Redis (running the other) busy at once; without the
        balance, N streams awaiting their appends settle into one pipeline of N - 1 and one
        of 1, each side idle while the other works (500 streams: about 48k appends/s
        against 62k balanced, docs/BENCHMARKS.md)."""
        if self._scheduled or self._pipelines >= self._max_in_flight:
            return False
        return self._pipelines == 0 or 2 * len(self._ready) >= self._flying

    def _kick(self) -> None:
        """Start a commit task for text that waited while the pipelines were busy."""
        if self._ready and self._may_start():
            loop = asyncio.get_running_loop()
            if not loop.is_closed():
                self._start(loop)

    def _settle(self, jobs: list[_Job], results: list[Any]) -> None:
        pending, ready = self._pending, self._ready
        for job, result in zip(jobs, results, strict=True):
            result = request_error(result, "append_tokens", job.rid)  # only FloCoordErrors reach callers
            entry = job.entry
            entry.in_flight = False
            _resolve(job.waiters, result)
            key = (job.rid, job.epoch)
            if entry.chunks:
                ready[key] = entry  # text arrived meanwhile: it goes in the next batch
            elif pending.get(key) is entry:
                del pending[key]


class SerialAppender:
    """The synchronous twin of ``AppendBatcher``: each append is its own round trip.

    Automatic-seq appends of one request are sent one at a time, in call order, under the
    request's ``Holding.lock`` (threads may share a manager); the core settles an append
    whose outcome is unknown before the next one, as on the asyncio path.
    """

    def __init__(self, core: FailoverCore, shell: SyncShell) -> None:
        self._core = core
        self._shell = shell

    def append(self, request_id: str, chunk: str, epoch: int | None = None) -> AppendAck | None:
        """Commit ``chunk`` (already validated); returns once Redis acknowledged it.

        Raises what ``FailoverCore.append_many`` raises (LeaseLostError...) and
        CoordinatorUnavailableError when Redis did not answer before the deadline.
        """
        op = self._core.append_many(request_id, [chunk], epoch)
        held = self._core.holding(request_id)
        if held is None:
            return self._shell.run(op, "append_tokens", request_id)
        with held.lock:  # automatic seqs must reach Redis in order
            return self._shell.run(op, "append_tokens", request_id)


def _resolve(waiters: list[_Waiter[AppendAck | None]], result: Any) -> None:
    failed = isinstance(result, BaseException)
    for waiter in waiters:
        if waiter.done():
            continue  # the caller stopped waiting
        if isinstance(result, asyncio.CancelledError):
            waiter.cancel()
        elif failed:
            waiter.set_exception(result)
        else:
            waiter.set_result(result)


async def run_together(shell: AsyncShell, ops: list[Operation[Any]]) -> list[Any]:
    """Drive several operations in lockstep, each step's calls of all of them in one batch.

    Returns each operation's result, or the exception it raised.
    """
    results: list[Any] = [None] * len(ops)
    live: dict[int, list[Any]] = {}
    for i, op in enumerate(ops):
        try:
            live[i] = next(op)
        except Exception as exc:  # raised before any I/O (validation)
            results[i] = exc
    while live:
        order = list(live)
        batch = [call for i in order for call in live[i]]
        try:
            replies = await shell.run_batch(batch)
        except Exception as exc:
            for i in order:  # each operation hears how its round trip ended (an append records it as unknown)
                try:
                    ops[i].throw(exc)
                except Exception as raised:
                    results[i] = raised
                else:  # it would go on past a failed round trip: stop it, the batch's error stands
                    ops[i].close()
                    results[i] = exc
            return results
        position = 0
        for i in order:
            size = len(live[i])
            mine, position = replies[position : position + size], position + size
            try:
                live[i] = ops[i].send(mine)
            except StopIteration as stop:
                results[i] = stop.value
                del live[i]
            except Exception as exc:
                results[i] = exc
                del live[i]
    return results
