"""Redis access of the shared capability memory (what it means is execution/capabilities.py).

One plain key per backend and capability, ``<namespace>:capability:<backend>:<capability>``,
set with ``SET ... PX``: a single command, no read-then-write, so no script is needed;
the expiry comes from the Redis server clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from flo_coord.store.core import Cmd, Operation, ok

if TYPE_CHECKING:
    from flo_coord.store.core import FailoverCore
    from flo_coord.store.shell_async import AsyncShell


class CapabilityStore:
    """The "backend X cannot do Y" memory of one namespace (``manager.capabilities``).
    Every method raises CoordinatorUnavailableError when Redis does not answer in time."""

    def __init__(self, core: FailoverCore, shell: AsyncShell) -> None:
        self._core, self._shell = core, shell

    def key(self, backend: str, capability: str) -> str:
        """The key remembering that ``backend`` cannot do ``capability``."""
        return self._core.keys.capability(backend, capability)

    async def remember_missing(
        self, backend: str, capability: str, ttl: float, *, request_id: str | None = None
    ) -> None:
        """Record that ``backend`` cannot do ``capability``, for ``ttl`` seconds (> 0) from now."""
        await self._shell.run(self._remember(backend, capability, ttl), "capability", request_id)

    def _remember(self, backend: str, capability: str, ttl: float) -> Operation[None]:
        (reply,) = yield [Cmd(("SET", self.key(backend, capability), "1", "PX", max(1, int(ttl * 1000))))]
        ok(reply)

    async def missing(self, pairs: Sequence[tuple[str, str]], *, request_id: str | None = None) -> set[str]:
        """The backends of ``(backend, capability)`` pairs remembered as unable to do that
        capability (one round trip; none asked, no I/O)."""
        return await self._shell.run(self._missing(pairs), "capability", request_id)  # type: ignore[no-any-return]

    def _missing(self, pairs: Sequence[tuple[str, str]]) -> Operation[set[str]]:
        if not pairs:
            return set()
        replies = yield [Cmd(("EXISTS", self.key(name, capability))) for name, capability in pairs]
        return {name for (name, _), reply in zip(pairs, replies, strict=True) if ok(reply)}
