"""The async hot path: appends from many streams share round trips.

Each request has at most one append in flight; text that arrives meanwhile waits and
is committed with the next one (one ``seq``). At each turn of the event loop, the
pending appends of all requests go to Redis in one pipeline. A caller's ``append``
returns only when Redis has acknowledged its text, so nothing uncommitted is ever
reported committed, and fencing and ``seq`` idempotency are the core's, unchanged.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from flo_coord.core import AppendAck, FailoverCore, Operation
from flo_coord.shell import AsyncShell


@dataclass(slots=True)
class _Pending:
    chunks: list[str] = field(default_factory=list)
    waiters: list[asyncio.Future[AppendAck | None]] = field(default_factory=list)
    in_flight: bool = False


class AppendBatcher:
    def __init__(self, core: FailoverCore, shell: AsyncShell, max_batch: int = 2000) -> None:
        self._core = core
        self._shell = shell
        self._max_batch = max_batch
        self._pending: dict[str, _Pending] = {}
        self._flush_scheduled = False

    async def append(self, request_id: str, chunk: str) -> AppendAck | None:
        """Commit ``chunk`` (already validated); returns once Redis acknowledged it."""
        loop = asyncio.get_running_loop()
        entry = self._pending.setdefault(request_id, _Pending())
        future: asyncio.Future[AppendAck | None] = loop.create_future()
        entry.chunks.append(chunk)
        entry.waiters.append(future)
        if not entry.in_flight and not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        ready = [(rid, e) for rid, e in self._pending.items() if e.chunks and not e.in_flight][: self._max_batch]
        if not ready:
            return
        jobs = []
        for rid, entry in ready:
            entry.in_flight = True
            jobs.append((rid, entry.chunks, entry.waiters))
            entry.chunks, entry.waiters = [], []
        asyncio.get_running_loop().create_task(self._commit(jobs))

    async def _commit(self, jobs: list[tuple[str, list[str], list[asyncio.Future[AppendAck | None]]]]) -> None:
        ops = [self._core.append_many(rid, chunks) for rid, chunks, _ in jobs]
        results = await run_together(self._shell, ops)
        for (rid, _, waiters), result in zip(jobs, results, strict=True):
            for waiter in waiters:
                if waiter.done():
                    continue
                if isinstance(result, BaseException):
                    waiter.set_exception(result)
                else:
                    waiter.set_result(result)
            entry = self._pending[rid]
            entry.in_flight = False
            if not entry.chunks:
                del self._pending[rid]
        if any(e.chunks for e in self._pending.values()) and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)


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
