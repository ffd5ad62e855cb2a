"""The public facades: ``AsyncFailoverManager`` (asyncio), written here, and ``FailoverManager``
(synchronous), generated from it.

Both keep the API of batuta's ``FailoverManager`` (``src/serve/failover.rs``; README "The
original API, in Python") with its state in Redis, and add what a fleet needs: ownership
(leases, fencing epochs, takeover; README "Ownership: leases, fencing and takeover").
Every method is thin: it builds an operation of the sans-I/O core
(``flo_coord.store.core``) and hands it to its shell (``flo_coord.store.shell``), which
sends it with retries bounded by one deadline.

Async is written once. This module is the only source; ``flo_coord.store.facade_sync``
is produced from it by ``scripts/unasync.py`` (token replacement, as httpcore's unasync:
``async def`` -> ``def``, ``await`` dropped, ``AsyncShell`` -> ``SyncShell``,
``AppendBatcher`` -> ``SerialAppender``, ``aclose`` -> ``close`` ...) and committed;
``tests/test_unasync.py`` fails when the committed file differs from a fresh generation.
Edit this file, then run ``python scripts/unasync.py``.

What only asyncio can do stays here: a statement whose first line ends with the comment
``# unasync: async-only`` (a method, an import, a line of ``_setup``) is left out of the
sync twin. That is ``offer_tokens`` (a future that resolves once the batcher committed the
text) and ``append_direct`` (the benchmark's naive path): a thread has no event loop to
share round trips on, so the sync twin commits each append in its own round trip
(``SerialAppender``).

Errors: bad input raises ``ValidationError`` (``ConfigError`` for construction), before
any I/O; Redis unreachable past the retry deadline (or refusing for good: NOPERM, OOM...)
raises ``CoordinatorUnavailableError`` naming the operation and request; data in our keys
that flo_coord did not write raises ``CorruptStateError``; a fenced write by a worker
that no longer owns the request raises ``LeaseLostError`` and changes nothing.
"""

from __future__ import annotations

import asyncio  # unasync: async-only
import time
from typing import Any, Self, TypeVar

from flo_coord import defaults
from flo_coord.errors import ConfigError, LeaseLostError, ValidationError
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
from flo_coord.store.facade_sync import FailoverManager  # unasync: async-only
from flo_coord.store.heartbeat import HeartbeatTask
from flo_coord.store.observer import StoreObserver
from flo_coord.store.retry import RetryPolicy
from flo_coord.store.shell_async import AsyncShell
from flo_coord.store.surface import AsyncStoreOperations  # unasync: async-only
from flo_coord.store.validation import Limits

__all__ = ["AsyncFailoverManager", "FailoverManager"]  # unasync: async-only

T = TypeVar("T")


class AsyncFailoverManager(AsyncStoreOperations):
    """Shared failover state in Redis for one worker (``worker_id``) in one ``namespace``.

    Arguments (all but ``config`` keyword-only):

    - ``config``: the ``FailoverConfig`` (fallback order, ``min_tokens_for_recovery``,
      ``include_prefix``...); default ``FailoverConfig()``, batuta's defaults.
    - ``redis``: a ready redis-py client of the matching kind (``redis.asyncio.Redis`` for
      the asyncio facade, ``redis.Redis`` for the sync one; Sentinel or Cluster clients
      too), or ``url`` (default ``$FLO_REDIS_URL``, else ``redis://localhost:6379/0``;
      ``flo_coord.store.connection.connect`` builds it). Not both.
    - ``namespace``: the key prefix, so several deployments share one Redis.
    - ``worker_id``: this worker's name (default: host-pid-random).
    - ``lease_ttl``: seconds a lease lasts without a heartbeat; ``max_age``: seconds a
      request may live at most; ``retention``: seconds an outcome is kept after the end.
    - ``limits``: input bounds (``Limits``, README "Input limits").
    - ``retry``: the ``RetryPolicy`` (one deadline, in seconds, bounds each call).
    - ``durability``: ``"primary"`` or ``"replica"`` (every committed write waits for a
      replica's acknowledgement; README "Operating flo_coord").
    - ``observer``: an optional ``StoreObserver`` told about starts, appends, attempts,
      claims, heartbeats and finishes (``flo_coord.metrics.WorkerMetrics`` is one).

    Raises ``ConfigError``/``ValidationError`` for a bad argument. Shared by every task of
    one event loop (the sync twin: by every thread).
    """

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
        observer: StoreObserver | None = None,
    ) -> None:
        #: the sans-I/O protocol core: ownership table, operations (no I/O)
        self.core = FailoverCore(
            config,
            namespace=namespace,
            worker_id=worker_id,
            lease_ttl=lease_ttl,
            max_age=max_age,
            retention=retention,
            limits=limits,
        )
        if redis is not None and url is not None:
            raise ValidationError("pass either redis= or url=, not both")
        if observer is not None and not isinstance(observer, StoreObserver):
            raise ConfigError(f"observer must be a StoreObserver, got {type(observer).__name__}")
        client = redis if redis is not None else connect(url, asyncio=True)
        #: the I/O shell that sends the core's operations (retries, deadline, durability)
        self.shell = AsyncShell(client, retry, durability=durability)
        #: the redis-py client the shell uses
        self.redis = self.shell.client
        self.observer = observer
        self._setup()

    def _setup(self) -> None:
        """Per-facade state, once the core and the shell exist (sub-stores are wired here)."""
        self._appender = AppendBatcher(self.core, self.shell)
        self.attach_stores()  # unasync: async-only

    @classmethod
    def with_defaults(cls, **kwargs: Any) -> Self:
        """batuta's ``FailoverManager::with_defaults``: ``cls(FailoverConfig(), **kwargs)``."""
        return cls(FailoverConfig(), **kwargs)

    @property
    def worker_id(self) -> str:
        """This worker's name: the owner written into the leases it takes."""
        return self.core.worker_id

    @property
    def namespace(self) -> str:
        """The key prefix of every key this manager touches."""
        return self.core.keys.namespace

    @property
    def lease_ttl(self) -> float:
        """Seconds a lease lasts without a heartbeat."""
        return self.core.lease_ttl

    def config(self) -> FailoverConfig:
        """batuta's ``config()``: the ``FailoverConfig`` in use (no I/O)."""
        return self.core.config

    def next_backend(self, failed_backend: ServingBackend) -> ServingBackend | None:
        """batuta's ``next_backend``, unchanged: the first backend of the fallback order that is
        not ``failed_backend`` (a ``ServingBackend`` or its name), or None (no I/O).

        It remembers nothing (batuta's defect 2); ``next_backend_for`` is the per-request form.
        Raises ValidationError for an unknown backend name."""
        return self.core.next_backend(failed_backend)

    def held(self) -> list[str]:
        """Ids of the requests this manager holds now (started or claimed, not yet ended or lost; no I/O)."""
        return self.core.held_ids()

    async def _run(self, op: Operation[T], name: str, request_id: str | None = None) -> T:
        return await self.shell.run(op, name, request_id)

    # ------------------------------------------------------------------ tracking

    async def start_tracking(
        self,
        request_id: str,
        prompt: str | None,
        backend: ServingBackend | str | None = None,
        *,
        messages: list[Any] | None = None,
        max_tokens: int | None = None,
        params: dict[str, Any] | None = None,
        model_group: str | None = None,
    ) -> StreamingContext:
        """batuta's ``start_tracking``: track ``request_id`` with this worker as its owner.

        ``prompt``: the prompt text (None with ``messages``: their plain-text rendering);
        ``backend``: the primary backend (a ``ServingBackend``, its name, or a registered
        deployment; default the first of the fallback order; batuta never set it, defect 4);
        ``messages``: chat messages (``ChatMessage`` or ``{"role", "content"}`` dicts);
        ``max_tokens``: the caller's budget (> 0); ``params``: sampling parameters (JSON
        values, at most ``max_chunk_bytes`` as JSON); ``model_group``: the model group it
        runs through. All are stored by one script, for any worker that takes it over.

        Returns the new context (owner = this worker, a new epoch, lease deadline and
        creation time in epoch seconds from the Redis clock). Like batuta, an existing id is
        overwritten (and its epoch bumped, so its old owner is fenced out). Raises
        ValidationError, CoordinatorUnavailableError, CorruptStateError.
        """
        op = self.core.start_tracking(
            request_id,
            prompt,
            backend,
            messages=messages,
            max_tokens=max_tokens,
            params=params,
            model_group=model_group,
        )
        ctx = await self._run(op, "start_tracking", request_id)
        if self.observer is not None:
            self.observer.on_started()
        return ctx

    async def append_tokens(
        self, request_id: str, tokens: str, *, seq: int | None = None, epoch: int | None = None
    ) -> AppendAck | None:
        """batuta's ``append_tokens``, fenced and retry-safe: commit ``tokens`` (str, at most
        ``max_chunk_bytes`` UTF-8 bytes) to the request's answer; returns once Redis
        acknowledged it (README "Ownership: leases, fencing and takeover").

        ``seq``: the append's number (> 0, strictly increasing per request); omitted, this
        worker numbers them, in call order. An append whose ``seq`` was already applied is
        acknowledged with ``applied=False`` and changes nothing. ``epoch``: the caller's
        generation token (the epoch its generation started or claimed the request under);
        a write of an older generation raises LeaseLostError even when this worker holds
        the request at a newer epoch (it re-claimed it).

        Returns an ``AppendAck`` (``applied``, ``seq``, ``length`` of the answer in UTF-8
        bytes, ``token_count``), or None for a request nobody tracks (batuta: a no-op).
        Raises ValidationError; LeaseLostError (another worker owns it now; nothing written);
        CoordinatorUnavailableError (the outcome is unknown: Redis may have applied it; the
        request's next automatic-seq append re-sends it first under its own seq, so it is
        committed exactly once); CorruptStateError.

        On the asyncio facade, automatic-seq appends share round trips with other requests'
        appends (``flo_coord.store.batching``); on the sync one, each is its own round trip.
        """
        observer = self.observer
        started = time.perf_counter() if observer is not None else 0.0
        try:
            if seq is not None or self.core.check_offer(request_id, tokens) is None:
                op = self.core.append_tokens(request_id, tokens, seq=seq, epoch=epoch)
                ack = await self._run(op, "append_tokens", request_id)
            else:
                ack = await self._appender.append(request_id, tokens, epoch)
        except LeaseLostError:
            if observer is not None:
                observer.on_lease_lost()
            raise
        if observer is not None:
            observer.on_appended(len(tokens), time.perf_counter() - started)
        return ack

    def offer_tokens(  # unasync: async-only
        self, request_id: str, tokens: str, *, epoch: int | None = None
    ) -> asyncio.Future[AppendAck | None]:
        """Queue ``tokens`` without waiting; the future resolves, like ``append_tokens``, once
        Redis acknowledged them (to an ``AppendAck`` or None), or holds its error.

        For producers that generate faster than they wait: tokens of one request offered
        while its previous append is in flight are committed together and share one future
        (do not cancel it). Input is validated here, before anything is queued (raises
        ValidationError). Needs a running event loop; the sync facade has no such method.
        """
        if self.core.check_offer(request_id, tokens) is None:
            return asyncio.ensure_future(self.append_tokens(request_id, tokens, epoch=epoch))
        return self._appender.submit(request_id, tokens, epoch)

    async def append_direct(  # unasync: async-only
        self, request_id: str, tokens: str, *, seq: int | None = None
    ) -> AppendAck | None:
        """``append_tokens`` as one awaited script call per append, bypassing the batcher (the
        benchmark's naive path, ``scripts/bench.py``). Same arguments, result and errors, but
        an unknown outcome is the caller's to settle (re-send it under ``ack``'s seq)."""
        return await self._run(self.core.append_tokens(request_id, tokens, seq=seq), "append_tokens", request_id)

    async def complete(
        self,
        request_id: str,
        *,
        backend: str | None = None,
        model: str | None = None,
        finish_reason: str | None = None,
        usage: dict[str, int] | None = None,
        epoch: int | None = None,
    ) -> bool:
        """batuta's ``complete``: end the request as Completed (fenced). Its context is deleted
        and its outcome kept ``retention`` seconds for followers.

        ``backend``/``model``: what produced the answer (labels); ``finish_reason``: the
        backend's (e.g. ``"stop"``, ``"length"``); ``usage``: token counts (str -> int);
        ``epoch``: the caller's generation token (see ``append_tokens``).

        Returns True when this call ended it, False when the request is unknown to this
        manager and gone or already finished (batuta: a no-op). Raises LeaseLostError
        (another worker owns it, ``completed=True`` if it finished it), ValidationError,
        CoordinatorUnavailableError, CorruptStateError.
        """
        op = self.core.complete(
            request_id, backend=backend, model=model, finish_reason=finish_reason, usage=usage, epoch=epoch
        )
        done = await self._run(op, "complete", request_id)
        if done and self.observer is not None:
            self.observer.on_finished("completed")
        return done

    async def fail(
        self,
        request_id: str,
        reason: str,
        *,
        kind: str = "GenerationError",
        finish_reason: str | None = None,
        usage: dict[str, int] | None = None,
        epoch: int | None = None,
    ) -> bool:
        """End the request as Failed (fenced; batuta's ``StreamState::Failed(reason)``).

        ``reason``: the message followers see (secrets redacted, at most ``max_chunk_bytes``);
        ``kind``: the error's type name (a label); ``finish_reason``, ``usage``, ``epoch``
        and the result and errors: as ``complete``.
        """
        op = self.core.fail(request_id, reason, kind=kind, finish_reason=finish_reason, usage=usage, epoch=epoch)
        done = await self._run(op, "fail", request_id)
        if done and self.observer is not None:
            self.observer.on_finished("failed")
        return done

    async def release(self, request_id: str, *, epoch: int | None = None) -> None:
        """Hand the request back (fenced): its lease ends now, so another worker claims it at
        once and continues from the committed text. ``epoch``: see ``append_tokens``.

        Raises LeaseLostError, ValidationError, CoordinatorUnavailableError, CorruptStateError.
        """
        await self._run(self.core.release(request_id, epoch=epoch), "release", request_id)

    # ------------------------------------------------------------------- reading

    async def get_context(self, request_id: str) -> StreamingContext | None:
        """batuta's ``get_context``: the request's ``StreamingContext`` as Redis has it now (the
        committed prefix, token count, owner, epoch, lease deadline...), or None when nobody
        tracks it. Raises ValidationError, CoordinatorUnavailableError, CorruptStateError."""
        return await self._run(self.core.get_context(request_id), "get_context", request_id)

    async def outcome(self, request_id: str) -> RequestOutcome | None:
        """How the request ended (state, answer text, reason, usage...), kept ``retention``
        seconds after its end; None while it runs or once forgotten. Raises
        ValidationError, CoordinatorUnavailableError, CorruptStateError."""
        return await self._run(self.core.outcome(request_id), "outcome", request_id)

    async def should_failover(self, request_id: str) -> bool:
        """batuta's ``should_failover``: True when the request has at least the config's
        ``min_tokens_for_recovery`` tokens (batuta hard-coded 5, defect 1); False for an
        unknown request. Raises ValidationError, CoordinatorUnavailableError, CorruptStateError."""
        return await self._run(self.core.should_failover(request_id), "should_failover", request_id)

    async def next_backend_for(self, request_id: str) -> ServingBackend | None:
        """The first backend of the fallback order that has not failed for this request (the
        fix of batuta's defect 2); None when all have, or the request is unknown. Raises
        ValidationError, CoordinatorUnavailableError, CorruptStateError."""
        return await self._run(self.core.next_backend_for(request_id), "next_backend_for", request_id)

    async def prepare_failover(self, request_id: str) -> FailoverRequest | None:
        """batuta's ``prepare_failover``: the request to send to the next backend (the
        continuation prompt, prompt + committed prefix, when ``include_prefix``; the prefix,
        token count, messages and ``next_backend_for``), or None for an unknown request.
        Raises ValidationError, CoordinatorUnavailableError, CorruptStateError."""
        return await self._run(self.core.prepare_failover(request_id), "prepare_failover", request_id)

    # ----------------------------------------------------------------- updating

    async def mark_backend_failed(
        self,
        request_id: str,
        backend: ServingBackend | str,
        *,
        epoch: int | None = None,
    ) -> None:
        """Record (fenced) that ``backend`` (a ``ServingBackend``, its name or a registered
        deployment) failed for this request, so ``next_backend_for`` skips it. ``epoch``:
        see ``append_tokens``. Raises LeaseLostError, ValidationError,
        CoordinatorUnavailableError, CorruptStateError."""
        op = self.core.mark_backend_failed(request_id, backend, epoch=epoch)
        await self._run(op, "mark_backend_failed", request_id)

    async def set_state(self, request_id: str, state: StreamState, *, epoch: int | None = None) -> None:
        """Store the request's ``StreamState`` (fenced; batuta's ``state`` field; a Failed
        state's message too). ``epoch``: see ``append_tokens``. Raises LeaseLostError,
        ValidationError, CoordinatorUnavailableError, CorruptStateError."""
        await self._run(self.core.update_state(request_id, state, epoch=epoch), "set_state", request_id)

    async def set_usage(self, request_id: str, usage: dict[str, int], *, epoch: int | None = None) -> None:
        """Store the token usage summed over the request's attempts so far (fenced; str -> int,
        at most 32 keys), so a worker that takes it over keeps counting. ``epoch``: see
        ``append_tokens``. Raises LeaseLostError, ValidationError,
        CoordinatorUnavailableError, CorruptStateError."""
        await self._run(self.core.set_usage(request_id, usage, epoch=epoch), "set_usage", request_id)

    async def set_current_backend(
        self,
        request_id: str,
        backend: ServingBackend | str,
        *,
        epoch: int | None = None,
    ) -> None:
        """Store the backend the request runs on now (fenced; shown by ``top``/``inspect``).
        ``epoch``: see ``append_tokens``. Raises LeaseLostError, ValidationError,
        CoordinatorUnavailableError, CorruptStateError."""
        op = self.core.set_current_backend(request_id, backend, epoch=epoch)
        await self._run(op, "set_current_backend", request_id)

    # ------------------------------------------------------------------- history

    async def record_attempt(self, attempt: FailoverAttempt, *, mark_failed: bool = True) -> None:
        """batuta's ``record_attempt``: add ``attempt`` to the shared history (the newest 100
        entries are kept). Attempts carry their request id, worker id (default: this one)
        and a wall-clock ``started_at`` in epoch seconds (batuta's defect 5). With
        ``mark_failed``, a failed attempt of a request this worker holds also marks its
        backend failed for that request. Raises ValidationError (a field of the wrong type
        or value), CoordinatorUnavailableError."""
        op = self.core.record_attempt(attempt, mark_failed=mark_failed)  # validates it
        if self.observer is not None and attempt.result is not None:
            self.observer.on_attempt(str(attempt.backend), attempt.result.name)
        await self._run(op, "record_attempt", getattr(attempt, "request_id", None))

    async def history(self, count: int = defaults.HISTORY_MAXLEN) -> list[HistoryEntry]:
        """The newest ``count`` history entries (``FailoverAttempt`` and ``Takeover``), oldest
        first; foreign entries are skipped. Raises ValidationError (``count`` < 1),
        CoordinatorUnavailableError."""
        return await self._run(self.core.history(count), "history")

    async def stats(self) -> FailoverStats:
        """batuta's ``stats``, over the newest 100 history entries: ``total_attempts`` (attempts
        only), ``successful``, ``timeouts``, ``active_contexts`` (tracked requests now) and
        ``takeovers``. Raises CoordinatorUnavailableError."""
        return await self._run(self.core.stats(), "stats")

    # ----------------------------------------------------------------- ownership

    async def heartbeat(self) -> int:
        """Renew the lease of every request this worker holds, in one round trip; returns how
        many were renewed (a lost one is dropped from ``held()``). Raises
        CoordinatorUnavailableError."""
        renewed = await self._run(self.core.heartbeat(), "heartbeat")
        if self.observer is not None:
            self.observer.on_heartbeat(renewed)
        return renewed

    async def orphans(self, limit: int = 100) -> list[str]:
        """Ids of up to ``limit`` requests whose lease expired (by the Redis clock); the cost
        grows with expired leases, not active ones. Raises ValidationError (``limit`` < 1),
        CoordinatorUnavailableError."""
        return await self._run(self.core.orphans(limit), "orphans")

    async def claim(self, request_id: str) -> StreamingContext | None:
        """Take over ``request_id`` if its lease expired: one script sets owner = this worker
        and epoch + 1 (fencing the old owner out) and records a ``Takeover`` in the history.
        Returns the claimed context (with the committed prefix to continue from), or None
        when the lease is live, another worker won, or the request is gone. Raises
        ValidationError, CoordinatorUnavailableError, CorruptStateError."""
        ctx = await self._run(self.core.claim(request_id), "claim", request_id)
        if ctx is not None and self.observer is not None:
            self.observer.on_claimed(len(ctx.generated_prefix))
        return ctx

    async def claim_orphans(self, limit: int = 100) -> list[StreamingContext]:
        """``orphans`` then ``claim`` each: the contexts won (up to ``limit``). A request whose
        stored context is corrupt is ended as Failed (``CorruptStateError`` kind) instead.
        Raises ValidationError, CoordinatorUnavailableError."""
        claimed = await self._run(self.core.claim_orphans(limit), "claim_orphans")
        if self.observer is not None:
            for ctx in claimed:
                self.observer.on_claimed(len(ctx.generated_prefix))
        return claimed

    async def active_requests(self, limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` (request id, lease deadline in epoch seconds) pairs from the index of
        active requests, soonest deadline first (for ``top``). Raises ValidationError,
        CoordinatorUnavailableError."""
        return await self._run(self.core.active_requests(limit), "active_requests")

    def start_heartbeat(self, interval: float | None = None) -> Any:
        """Run ``heartbeat`` every ``interval`` seconds (default ``lease_ttl / 3``) in a
        background task, started now; returns it (stop it, or use it as a context manager).
        README "Ownership: leases, fencing and takeover"."""
        return HeartbeatTask(self, interval).start()

    async def aclose(self) -> None:
        """Close the Redis client (its connections) and the connection the shell keeps for
        the hot path."""
        await self.shell.aclose()
        await self.redis.aclose()

    async def __aenter__(self) -> Self:
        """``async with manager:`` returns the manager itself."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Leaving the block closes the client (``aclose``); exceptions propagate."""
        await self.aclose()
