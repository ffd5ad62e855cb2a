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
wait: Redis may or may not have applied it) leaves the request's next ``seq`` where it was. Before any later
text of that request is sent, the same text is sent again alone under that same
``seq``: applied once either way (``DUP`` if it had been), so the later text can never
be mistaken for a duplicate of it and silently dropped.

Text is queued per generation: under (request id, epoch), the generation token of the
caller (given, or the epoch this worker holds when the text is queued). Text queued by a
generation this worker no longer holds (it re-claimed the request at a newer epoch) is
refused with LeaseLostError, never sent under the newer epoch.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from flo_coord.errors import CoordinatorUnavailableError
from flo_coord.store.core import AppendAck, FailoverCore, Operation
from flo_coord.store.shell import AsyncShell, request_error

_Waiter = asyncio.Future  # resolves to AppendAck | None, or raises


class _Pending:
    """One request's text waiting to be committed, and who waits for it."""

    __slots__ = ("chunks", "group", "in_flight", "redo", "waiters")

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.waiters: list[_Waiter[AppendAck | None]] = []  # one per append() caller
        self.group: _Waiter[AppendAck | None] | None = None  # shared by the submit() callers
        self.in_flight = False
        self.redo: tuple[int, int, list[str]] | None = None  # (epoch, seq, text) of an unknown append


_Key = tuple[str, int | None]  # (request id, generation epoch; None: not held when queued)


class _Job:
    """One request's append in a batch."""

    __slots__ = ("entry", "epoch", "redo", "rid", "sent_as", "text", "waiters")

    def __init__(
        self, key: _Key, entry: _Pending, text: list[str], waiters: list[_Waiter[AppendAck | None]], redo: bool,
        sent_as: tuple[int, int] | None,
    ) -> None:  # fmt: skip
        (self.rid, self.epoch), self.entry, self.text, self.waiters, self.redo = key, entry, text, waiters, redo
        self.sent_as = sent_as  # (epoch, seq) it is sent under, when this worker holds the request

    def op(self, core: FailoverCore) -> Operation[AppendAck | None]:
        return core.append_many(self.rid, self.text, self.epoch)


def _sent_as(core: FailoverCore, rid: str, epoch: int | None) -> tuple[int, int] | None:
    held = core.holding(rid)
    if held is None or (epoch is not None and held.epoch != epoch):
        return None  # not held (by this generation): the core refuses or no-ops, nothing is unknown
    return held.epoch, held.next_seq


class AppendBatcher:
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
        the text is sent again, under the same ``seq``, before the request's next text.
        Otherwise cancelling only stops the caller's wait.
        """
        key = self._key(request_id, epoch)
        entry = self._pending.get(key)
        if self._pipelines == 0 and not self._scheduled and (entry is None or entry.redo is None):
            return await self._append_now(key, chunk, entry)
        loop = asyncio.get_running_loop()
        waiter: _Waiter[AppendAck | None] = loop.create_future()
        self._queue(key, chunk, loop).waiters.append(waiter)
        return await waiter

    async def _append_now(self, key: _Key, chunk: str, entry: _Pending | None) -> AppendAck | None:
        # Idle: no commit task, so no request has text waiting (it would have started one).
        if entry is None:
            entry = self._pending[key] = _Pending()
        entry.in_flight = True  # later text of this request waits for this one
        self._pipelines += 1  # and other requests' appends go through a commit task meanwhile
        self._flying += 1
        job = _Job(key, entry, [chunk], [], False, _sent_as(self._core, *key))
        result: Any = None
        try:
            result = await self._shell.run(job.op(self._core), "append_tokens", job.rid)
            return result  # type: ignore[no-any-return]
        except BaseException as exc:
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
            sent_as = _sent_as(self._core, *key)
            if entry.redo is not None:
                if sent_as == entry.redo[:2]:
                    # First settle the unknown append, alone under its seq; the new text waits a round.
                    jobs.append(_Job(key, entry, entry.redo[2], [], True, sent_as))
                    continue
                entry.redo = None  # the request moved on (new epoch, lost, another seq): moot
            waiters = entry.waiters
            if entry.group is not None:
                waiters.append(entry.group)
                entry.group = None
            jobs.append(_Job(key, entry, entry.chunks, waiters, False, sent_as))
            entry.chunks, entry.waiters = [], []
        return jobs

    async def _commit(self) -> None:
        self._scheduled = False
        jobs = self._take()
        self._flying += len(jobs)
        self._kick()  # what _take left (it takes half when alone) goes in a second pipeline
        results: list[Any] = []
        try:
            if len(jobs) == 1:  # an idle moment: skip the lockstep bookkeeping
                job = jobs[0]
                try:
                    results = [await self._shell.run(job.op(self._core), "append_tokens", job.rid)]
                except Exception as exc:
                    results = [exc]
            elif jobs:
                results = await run_together(self._shell, [j.op(self._core) for j in jobs])
        except BaseException as exc:  # cancelled (loop shutting down): nobody may wait forever
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
        against 72k balanced, on the benchmark machine)."""
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
            entry, waiters = job.entry, job.waiters
            entry.in_flight = False
            # Unknown outcome: Redis unreachable past the deadline, or the wait was cancelled.
            unknown = (
                isinstance(result, CoordinatorUnavailableError | asyncio.CancelledError) and job.sent_as is not None
            )
            if job.redo:
                if not unknown:
                    entry.redo = None  # applied now or before (or refused for good: later appends say so)
                else:
                    # Still unknown: the text queued behind it was never sent, so it is not
                    # committed: fail it now (a later append tries the redo first again).
                    waiters = entry.waiters + ([entry.group] if entry.group is not None else [])
                    entry.chunks, entry.waiters, entry.group = [], [], None
            elif unknown:
                assert job.sent_as is not None
                entry.redo = (*job.sent_as, job.text)
            _resolve(waiters, result)
            key = (job.rid, job.epoch)
            if entry.chunks:
                ready[key] = entry  # text arrived meanwhile: it goes in the next batch
            elif entry.redo is None and pending.get(key) is entry:
                del pending[key]


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
            for i in order:
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
