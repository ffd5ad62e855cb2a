"""What a backend was seen unable to do, shared by every worker through Redis for a while.

When a backend rejects an assistant prefill at run time (HTTP 400 although its
configuration says it continues chats), every worker should stop sending it
continuations for ``ttl`` seconds instead of each learning it with a failed call. This
module is that policy (which capability, how long); the keys are the store's
(``flo_coord.store.capabilities``, ``manager.capabilities``: one ``SET ... PX`` key per
backend and capability, expiring on the Redis server clock).
"""

from __future__ import annotations

from collections.abc import Sequence

from flo_coord import defaults
from flo_coord.store import CapabilityStore

#: Seconds a runtime prefill rejection is remembered for all workers.
DEFAULT_TTL = defaults.CAPABILITY_TTL
#: The capability a chat continuation needs.
PREFILL = "prefill"


class CapabilityMemory:
    """The shared "cannot do X" memory as one Coordinator uses it: ``store`` (the manager's
    CapabilityStore), remembering for ``ttl`` seconds. Methods raise
    CoordinatorUnavailableError when Redis does not answer within the retry deadline."""

    def __init__(self, store: CapabilityStore, ttl: float = DEFAULT_TTL) -> None:
        self.store = store
        self.ttl = ttl

    async def remember_missing(self, backend: str, capability: str = PREFILL, *, request_id: str | None = None) -> None:
        """Record that ``backend`` cannot do ``capability``, for ``ttl`` seconds from now."""
        await self.store.remember_missing(backend, capability, self.ttl, request_id=request_id)

    async def missing(self, pairs: Sequence[tuple[str, str]], *, request_id: str | None = None) -> set[str]:
        """The backends of ``(backend, capability)`` pairs remembered as unable to do that capability."""
        return await self.store.missing(pairs, request_id=request_id)
