"""The async store's operations beyond the original batuta API, mixed into
``AsyncFailoverManager``: what the Coordinator, worker, gateway, CLI, ownership and
metrics need of Redis, so nothing above the store touches its core, shell or client.

- Sub-stores, attached by ``attach_stores`` (called from ``AsyncFailoverManager._setup``):
  ``breakers`` (store/breakers.py), ``inflight`` (store/inflight.py), ``capabilities``
  (store/capabilities.py), ``queue`` (store/queue.py), ``gateway`` (store/gateway.py).
- Request-level operations: ``start_new``, ``reject``, ``cancel``, ``cancel_flags``, ``set_model_group``,
  ``follow_read``/``wait_feed`` (store/feed.py), ``committed_text``, ``history_from``,
  ``server_time``, ``ping`` (store/inspect.py).
- Local state (no I/O): ``limits``, ``health``, ``holding``, ``forget``, ``register_deployments``.

Every coroutine raises CoordinatorUnavailableError when Redis does not answer within the
retry deadline (``RetryPolicy``), ValidationError for bad input before any I/O, and
CorruptStateError when a key holds data flo_coord did not write.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis.exceptions as rex

from flo_coord.errors import CoordinatorUnavailableError
from flo_coord.models import HistoryEntry, RequestOutcome, ServingBackend, StreamingContext
from flo_coord.store import inspect as inspect_ops
from flo_coord.store import validation
from flo_coord.store.breakers import BreakerStore
from flo_coord.store.capabilities import CapabilityStore
from flo_coord.store.core import FailoverCore, Holding
from flo_coord.store.feed import wait_feed
from flo_coord.store.gateway import GatewayStore
from flo_coord.store.inflight import InFlightStore
from flo_coord.store.queue import QueueStore
from flo_coord.store.retry import RedisHealth
from flo_coord.store.shell import public_error

if TYPE_CHECKING:
    from flo_coord.store.shell_async import AsyncShell


class AsyncStoreOperations:
    """Mixed into AsyncFailoverManager (which provides ``core`` and ``shell``)."""

    core: FailoverCore
    shell: AsyncShell
    breakers: BreakerStore
    inflight: InFlightStore
    capabilities: CapabilityStore
    queue: QueueStore
    gateway: GatewayStore

    def attach_stores(self) -> None:
        """Build the sub-stores on this manager's core and shell (once, at construction)."""
        self.breakers = BreakerStore(self.core, self.shell)
        self.inflight = InFlightStore(self.core, self.shell, self.breakers)
        self.capabilities = CapabilityStore(self.core, self.shell)
        self.queue = QueueStore(self.core, self.shell)
        self.gateway = GatewayStore(self.core, self.shell)

    # ---------------------------------------------------------------- local state

    @property
    def limits(self) -> validation.Limits:
        """The input limits this manager checks (``Limits``: id lengths, chunk bytes...)."""
        return self.core.limits

    @property
    def health(self) -> RedisHealth:
        """Whether Redis answered this manager's last operation: ``available``, ``down_for()``
        (seconds), ``last_success`` (monotonic seconds), ``outages`` (store/retry.py)."""
        return self.shell.health

    def holding(self, request_id: str) -> Holding | None:
        """What this manager holds of ``request_id`` (its ``epoch`` and ``next_seq``), None
        when it holds nothing of it (no I/O)."""
        return self.core.holding(request_id)

    def forget(self, request_id: str, epoch: int | None = None) -> None:
        """Stop holding ``request_id`` locally (no I/O): heartbeats no longer renew its lease,
        so it becomes claimable ``lease_ttl`` seconds after the last renewal. For a
        generation that stopped because Redis was unreachable. ``epoch``: that generation's
        token; a newer holding of the same request is kept."""
        self.core.forget(request_id, epoch)

    def register_deployments(self, names: Iterable[str]) -> None:
        """Accept deployment ``names`` (besides ServingBackend names) wherever a backend is
        named (start_tracking's primary, record_attempt, mark_backend_failed...). The
        Coordinator registers its configured deployments."""
        self.core.deployments = frozenset(names)

    # ------------------------------------------------------------- request writes

    async def start_new(
        self,
        request_id: str,
        prompt: str | None,
        backend: ServingBackend | str | None = None,
        *,
        messages: Any = None,
        max_tokens: int | None = None,
    ) -> StreamingContext | None:
        """``start_tracking`` for a queued request, as one script (START_NEW): the context,
        held by this manager; None, and nothing changed, when the request exists or has an
        outcome (a late or duplicate queue delivery never overwrites or re-runs a request).
        Raises ValidationError for bad input, CorruptStateError for a corrupt stored context."""
        op = self.core.start_new(request_id, prompt, backend, messages=messages, max_tokens=max_tokens)
        return await self.shell.run(op, "start_new", request_id)  # type: ignore[no-any-return]

    async def reject(self, request_id: str, reason: str, *, kind: str) -> bool:
        """End a request nobody runs and nobody can run (a poison queue entry, a corrupt stored
        context) as Failed with ``reason``/``kind`` (the REJECT script), so followers see why.
        Returns False when it changed nothing: the request already has an outcome, or a live
        lease holds it."""
        op = self.core.reject(request_id, reason, kind=kind)
        return await self.shell.run(op, "reject", request_id)  # type: ignore[no-any-return]

    async def set_model_group(self, request_id: str, model_group: str, *, epoch: int | None = None) -> None:
        """Store the model group ``request_id`` runs through (a fenced write: LeaseLostError
        when this manager no longer holds it at ``epoch``), for a takeover to use the same."""
        op = self.core.set_model_group(request_id, model_group, epoch=epoch)
        await self.shell.run(op, "set_model_group", request_id)

    async def cancel(self, request_id: str) -> tuple[str, str | None]:
        """Flag ``request_id`` for cancellation (the CANCEL script; any replica may).

        Returns ("OK", owner) for a live request (its owner's cancel watcher ends it),
        ("DONE", state) for one that already ended, ("GONE", None) for an unknown one."""
        return await self.shell.run(self.core.cancel(request_id), "cancel", request_id)  # type: ignore[no-any-return]

    async def cancel_flags(self, request_ids: list[str]) -> list[str]:
        """The ids among ``request_ids`` whose context carries the cancel flag (one round trip)."""
        return await self.shell.run(self.core.cancel_flags(request_ids), "cancel_flags")  # type: ignore[no-any-return]

    # -------------------------------------------------------------------- follow

    async def follow_read(self, request_id: str, from_byte: int) -> tuple[str, bytes, RequestOutcome | None] | None:
        """One FOLLOW_READ: (feed id to wait after, committed bytes from byte ``from_byte``,
        the outcome when the request ended); None for an unknown request."""
        op = self.core.follow_read(request_id, from_byte)
        return await self.shell.run(op, "follow_read", request_id)  # type: ignore[no-any-return]

    async def wait_feed(self, request_id: str, last_id: str, block_ms: int) -> None:
        """Block up to ``block_ms`` ms until ``request_id`` commits after feed id ``last_id``
        (what ``follow_read`` returned) or ends."""
        rid = validation.request_id(request_id, self.core.limits)
        await self.shell.run(wait_feed(self.core.keys.request(rid).feed, last_id, block_ms), "wait_feed", rid)

    # ------------------------------------------------------------------- inspect

    async def committed_text(self, request_id: str) -> str | None:
        """``request_id``'s committed answer text, None when none is stored (a GET; an
        unfinished request's text is also in ``get_context``). Raises CorruptStateError
        when it is not UTF-8."""
        rid = validation.request_id(request_id, self.core.limits)
        return await self.shell.run(inspect_ops.committed_text(self.core, rid), "committed_text", rid)  # type: ignore[no-any-return]

    async def history_from(self, entry_id: str = "-", count: int = 500) -> list[tuple[str, HistoryEntry | None]]:
        """Up to ``count`` failover history entries from stream id ``entry_id`` on
        (inclusive; "-": the oldest), oldest first, as (entry id, entry or None for an
        entry flo_coord did not write). For watching the history grow (the demo)."""
        count = validation.limit(count)
        return await self.shell.run(inspect_ops.history_from(self.core, entry_id, count), "history_from")  # type: ignore[no-any-return]

    async def server_time(self) -> float:
        """The Redis server's clock (TIME) in Unix seconds; leases are measured on it."""
        return await self.shell.run(inspect_ops.server_time(), "server_time")  # type: ignore[no-any-return]

    async def ping(self) -> None:
        """One PING, not retried (a probe reports the state now; it does not wait out an
        outage). Raises CoordinatorUnavailableError when Redis does not answer (within the
        client's socket timeout) or refuses."""
        try:
            await self.shell.client.ping()
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise CoordinatorUnavailableError("ping", None, exc) from exc
        except Exception as exc:
            error = public_error(exc, "ping", None)
            if error is exc:
                raise
            raise error from exc


__all__ = ["AsyncStoreOperations"]
