"""The public facades: ``FailoverManager`` (sync) and ``AsyncFailoverManager`` (asyncio).

Both are thin: each method builds an operation of the sans-I/O core and hands it to
its shell. The original batuta API is kept; ownership (leases, fencing, takeover) is
what the distributed version adds.
"""

from __future__ import annotations

import asyncio
from typing import Any

from flo_coord import defaults
from flo_coord.errors import CoordinatorUnavailableError, ValidationError
from flo_coord.models import (
    FailoverAttempt,
    FailoverConfig,
    FailoverRequest,
    FailoverStats,
    HistoryEntry,
    RequestOutcome,
    ServingBackend,
    StreamingContext,
    StreamState,
)
from flo_coord.store.batching import AppendBatcher
from flo_coord.store.connection import connect
from flo_coord.store.core import AppendAck, FailoverCore, Operation
from flo_coord.store.retry import RetryPolicy
from flo_coord.store.shell import AsyncShell, SyncShell
from flo_coord.store.validation import Limits


class _Facade:
    """What both facades share: construction, the core and the pure (no I/O) methods."""

    core: FailoverCore
    _shell_class: type[SyncShell] | type[AsyncShell]
    _asyncio: bool

    def __init__(
        self,
        config: FailoverConfig | None = None,
        *,
        redis: Any = None,
        url: str | None = None,
        namespace: str = defaults.NAMESPACE,
        worker_id: str | None = None,
        lease_ttl: float = defaults.LEASE_TTL,
        max_age: float = defaults.MAX_AGE,
        retention: float = defaults.RETENTION,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
        durability: str = "primary",
    ) -> None:
        self.core = FailoverCore(
            config,
            namespace=namespace,
            worker_id=worker_id,
            lease_ttl=lease_ttl,
            max_age=max_age,
            retention=retention,
            limits=limits,
        )
        self.shell: Any = self._shell_class(_client(redis, url, asyncio=self._asyncio), retry, durability=durability)
        self.redis = self.shell.client
        self._setup()

    def _setup(self) -> None:
        """Per-facade state, after the core and the shell exist."""

    @classmethod
    def with_defaults(cls, **kwargs: Any) -> Any:
        return cls(FailoverConfig(), **kwargs)

    @property
    def worker_id(self) -> str:
        return self.core.worker_id

    @property
    def namespace(self) -> str:
        return self.core.keys.namespace

    @property
    def lease_ttl(self) -> float:
        return self.core.lease_ttl

    def config(self) -> FailoverConfig:
        return self.core.config

    def next_backend(self, failed_backend: ServingBackend) -> ServingBackend | None:
        """The original single step: first backend in the fallback order that is not ``failed_backend``."""
        return self.core.next_backend(failed_backend)

    def held(self) -> list[str]:
        """Request ids this manager currently owns."""
        return self.core.held_ids()


def _client(redis: Any, url: str | None, asyncio: bool) -> Any:
    if redis is not None and url is not None:
        raise ValidationError("pass either redis= or url=, not both")
    return redis if redis is not None else connect(url, asyncio=asyncio)


class FailoverManager(_Facade):
    """Shared failover state in Redis, used from synchronous code (thread-safe)."""

    _shell_class = SyncShell
    _asyncio = False

    def _setup(self) -> None:
        self._unknown: dict[str, tuple[int, int, str]] = {}  # request -> (epoch, seq, text) of an unknown append

    def _run(self, op: Operation[Any], name: str, request_id: Any = None) -> Any:
        return self.shell.run(op, name, request_id if isinstance(request_id, str) else None)

    def start_tracking(
        self, request_id: str, prompt: str | None, backend: ServingBackend | str | None = None, **options: Any
    ) -> StreamingContext:
        return self._run(self.core.start_tracking(request_id, prompt, backend, **options), "start_tracking", request_id)

    def append_tokens(
        self, request_id: str, tokens: str, *, seq: int | None = None, epoch: int | None = None
    ) -> AppendAck | None:
        """Commit ``tokens``. ``epoch``: the caller's generation token (the epoch its
        generation started or claimed the request under); a write of an older generation
        raises LeaseLostError even when this worker holds the request at a newer epoch."""
        op = self.core.append_tokens(request_id, tokens, seq=seq, epoch=epoch)
        held = self.core.holding(request_id)
        if seq is not None or held is None or (epoch is not None and held.epoch != epoch):
            return self._run(op, "append_tokens", request_id)
        with held.lock:  # automatic seqs must reach Redis in order
            unknown = self._unknown.get(request_id)
            if unknown is not None:
                if unknown[:2] == (held.epoch, held.next_seq):
                    # An earlier append's outcome is unknown: settle it under its own seq
                    # first (applied once either way), or this text would reuse that seq
                    # and be taken for its duplicate.
                    redo = self.core.append_tokens(request_id, unknown[2], seq=unknown[1])
                    self._run(redo, "append_tokens", request_id)
                del self._unknown[request_id]
            sent_as = (held.epoch, held.next_seq)
            try:
                return self._run(op, "append_tokens", request_id)
            except CoordinatorUnavailableError:
                self._unknown[request_id] = (*sent_as, tokens)
                raise

    def complete(
        self, request_id: str, *, backend: str | None = None, model: str | None = None, epoch: int | None = None
    ) -> bool:
        op = self.core.complete(request_id, backend=backend, model=model, epoch=epoch)
        return self._run(op, "complete", request_id)

    def fail(self, request_id: str, reason: str, *, kind: str = "GenerationError", epoch: int | None = None) -> bool:
        return self._run(self.core.fail(request_id, reason, kind=kind, epoch=epoch), "fail", request_id)

    def release(self, request_id: str, *, epoch: int | None = None) -> None:
        self._run(self.core.release(request_id, epoch=epoch), "release", request_id)

    def get_context(self, request_id: str) -> StreamingContext | None:
        return self._run(self.core.get_context(request_id), "get_context", request_id)

    def outcome(self, request_id: str) -> RequestOutcome | None:
        return self._run(self.core.outcome(request_id), "outcome", request_id)

    def should_failover(self, request_id: str) -> bool:
        return self._run(self.core.should_failover(request_id), "should_failover", request_id)

    def next_backend_for(self, request_id: str) -> ServingBackend | None:
        return self._run(self.core.next_backend_for(request_id), "next_backend_for", request_id)

    def mark_backend_failed(self, request_id: str, backend: ServingBackend | str, *, epoch: int | None = None) -> None:
        op = self.core.mark_backend_failed(request_id, backend, epoch=epoch)
        self._run(op, "mark_backend_failed", request_id)

    def set_state(self, request_id: str, state: StreamState, *, epoch: int | None = None) -> None:
        self._run(self.core.update_state(request_id, state, epoch=epoch), "set_state", request_id)

    def prepare_failover(self, request_id: str) -> FailoverRequest | None:
        return self._run(self.core.prepare_failover(request_id), "prepare_failover", request_id)

    def record_attempt(self, attempt: FailoverAttempt, *, mark_failed: bool = True) -> None:
        op = self.core.record_attempt(attempt, mark_failed=mark_failed)
        self._run(op, "record_attempt", getattr(attempt, "request_id", None))

    def history(self, count: int = defaults.HISTORY_MAXLEN) -> list[HistoryEntry]:
        return self._run(self.core.history(count), "history")

    def stats(self) -> FailoverStats:
        return self._run(self.core.stats(), "stats")

    def heartbeat(self) -> int:
        return self._run(self.core.heartbeat(), "heartbeat")

    def orphans(self, limit: int = 100) -> list[str]:
        return self._run(self.core.orphans(limit), "orphans")

    def claim(self, request_id: str) -> StreamingContext | None:
        return self._run(self.core.claim(request_id), "claim", request_id)

    def claim_orphans(self, limit: int = 100) -> list[StreamingContext]:
        return self._run(self.core.claim_orphans(limit), "claim_orphans")

    def active_requests(self, limit: int = 1000) -> list[tuple[str, float]]:
        return self._run(self.core.active_requests(limit), "active_requests")

    def start_heartbeat(self, interval: float | None = None) -> Any:
        """Renew leases in a background thread every ``interval`` s (default lease_ttl / 3)."""
        from flo_coord.ownership import HeartbeatThread

        return HeartbeatThread(self, interval).start()

    def close(self) -> None:
        self.shell.close()
        self.redis.close()

    def __enter__(self) -> FailoverManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncFailoverManager(_Facade):
    """The same API as coroutines on ``redis.asyncio``; appends share round trips."""

    _shell_class = AsyncShell
    _asyncio = True

    def _setup(self) -> None:
        self._batcher = AppendBatcher(self.core, self.shell)

    async def _run(self, op: Operation[Any], name: str, request_id: Any = None) -> Any:
        return await self.shell.run(op, name, request_id if isinstance(request_id, str) else None)

    async def start_tracking(
        self, request_id: str, prompt: str | None, backend: ServingBackend | str | None = None, **options: Any
    ) -> StreamingContext:
        op = self.core.start_tracking(request_id, prompt, backend, **options)
        return await self._run(op, "start_tracking", request_id)

    async def append_tokens(
        self, request_id: str, tokens: str, *, seq: int | None = None, epoch: int | None = None
    ) -> AppendAck | None:
        """Commit ``tokens``; returns once Redis acknowledged them (shares round trips).

        ``epoch``: the caller's generation token (the epoch its generation started or
        claimed the request under); a write of an older generation raises LeaseLostError
        even when this worker holds the request at a newer epoch (it re-claimed it)."""
        if seq is not None or self.core.check_offer(request_id, tokens) is None:
            op = self.core.append_tokens(request_id, tokens, seq=seq, epoch=epoch)
            return await self._run(op, "append_tokens", request_id)
        return await self._batcher.append(request_id, tokens, epoch)

    def offer_tokens(
        self, request_id: str, tokens: str, *, epoch: int | None = None
    ) -> asyncio.Future[AppendAck | None]:
        """Queue tokens without waiting; the future resolves once Redis acknowledged them.

        For producers that generate faster than they wait: tokens of one request offered
        while its previous append is in flight are committed together and share one future
        (do not cancel it). Input is validated here, before anything is queued.
        """
        if self.core.check_offer(request_id, tokens) is None:
            return asyncio.ensure_future(self.append_tokens(request_id, tokens, epoch=epoch))
        return self._batcher.submit(request_id, tokens, epoch)

    async def append_direct(self, request_id: str, tokens: str, *, seq: int | None = None) -> AppendAck | None:
        """One awaited script call per append, bypassing the batcher (the benchmark's naive path)."""
        return await self._run(self.core.append_tokens(request_id, tokens, seq=seq), "append_tokens", request_id)

    async def complete(
        self, request_id: str, *, backend: str | None = None, model: str | None = None, **ending: Any
    ) -> bool:
        """Finish as Completed; ``ending``: optional ``finish_reason`` and ``usage`` kept in the
        outcome, and ``epoch``, the caller's generation token (see ``append_tokens``)."""
        op = self.core.complete(request_id, backend=backend, model=model, **ending)
        return await self._run(op, "complete", request_id)

    async def fail(self, request_id: str, reason: str, *, kind: str = "GenerationError", **ending: Any) -> bool:
        """Finish as Failed; ``ending``: optional ``finish_reason`` and ``usage`` kept in the
        outcome, and ``epoch``, the caller's generation token (see ``append_tokens``)."""
        return await self._run(self.core.fail(request_id, reason, kind=kind, **ending), "fail", request_id)

    async def release(self, request_id: str, *, epoch: int | None = None) -> None:
        await self._run(self.core.release(request_id, epoch=epoch), "release", request_id)

    async def get_context(self, request_id: str) -> StreamingContext | None:
        return await self._run(self.core.get_context(request_id), "get_context", request_id)

    async def outcome(self, request_id: str) -> RequestOutcome | None:
        return await self._run(self.core.outcome(request_id), "outcome", request_id)

    async def should_failover(self, request_id: str) -> bool:
        return await self._run(self.core.should_failover(request_id), "should_failover", request_id)

    async def next_backend_for(self, request_id: str) -> ServingBackend | None:
        return await self._run(self.core.next_backend_for(request_id), "next_backend_for", request_id)

    async def mark_backend_failed(
        self, request_id: str, backend: ServingBackend | str, *, epoch: int | None = None
    ) -> None:
        op = self.core.mark_backend_failed(request_id, backend, epoch=epoch)
        await self._run(op, "mark_backend_failed", request_id)

    async def set_state(self, request_id: str, state: StreamState, *, epoch: int | None = None) -> None:
        await self._run(self.core.update_state(request_id, state, epoch=epoch), "set_state", request_id)

    async def set_usage(self, request_id: str, usage: dict[str, int], *, epoch: int | None = None) -> None:
        await self._run(self.core.set_usage(request_id, usage, epoch=epoch), "set_usage", request_id)

    async def set_current_backend(
        self, request_id: str, backend: ServingBackend | str, *, epoch: int | None = None
    ) -> None:
        op = self.core.set_current_backend(request_id, backend, epoch=epoch)
        await self._run(op, "set_current_backend", request_id)

    async def prepare_failover(self, request_id: str) -> FailoverRequest | None:
        return await self._run(self.core.prepare_failover(request_id), "prepare_failover", request_id)

    async def record_attempt(self, attempt: FailoverAttempt, *, mark_failed: bool = True) -> None:
        op = self.core.record_attempt(attempt, mark_failed=mark_failed)
        await self._run(op, "record_attempt", getattr(attempt, "request_id", None))

    async def history(self, count: int = defaults.HISTORY_MAXLEN) -> list[HistoryEntry]:
        return await self._run(self.core.history(count), "history")

    async def stats(self) -> FailoverStats:
        return await self._run(self.core.stats(), "stats")

    async def heartbeat(self) -> int:
        return await self._run(self.core.heartbeat(), "heartbeat")

    async def orphans(self, limit: int = 100) -> list[str]:
        return await self._run(self.core.orphans(limit), "orphans")

    async def claim(self, request_id: str) -> StreamingContext | None:
        return await self._run(self.core.claim(request_id), "claim", request_id)

    async def claim_orphans(self, limit: int = 100) -> list[StreamingContext]:
        return await self._run(self.core.claim_orphans(limit), "claim_orphans")

    async def active_requests(self, limit: int = 1000) -> list[tuple[str, float]]:
        return await self._run(self.core.active_requests(limit), "active_requests")

    def start_heartbeat(self, interval: float | None = None) -> Any:
        """Renew leases in a background task every ``interval`` s (default lease_ttl / 3)."""
        from flo_coord.ownership import HeartbeatTask

        return HeartbeatTask(self, interval).start()

    async def aclose(self) -> None:
        await self.shell.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncFailoverManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
