"""What a backend was seen unable to do, shared by every worker through Redis for a while.

When a backend rejects an assistant prefill at run time (HTTP 400 although its
configuration says it continues chats), every worker should stop sending it
continuations for ``ttl`` seconds instead of each learning it with a failed call. The
memory is one plain key per backend and capability (``<namespace>:capability:<backend>:
<capability>``) set with ``SET ... PX``: a single command, no read-then-write, so no
script is needed; the expiry comes from the Redis server clock. Built like breaker.py:
operations the caller runs with its shell.
"""

from __future__ import annotations

from collections.abc import Sequence

from flo_coord import defaults
from flo_coord.store.core import Cmd, Operation, ok
from flo_coord.store.keys import Keys

#: Seconds a runtime prefill rejection is remembered for all workers.
DEFAULT_TTL = defaults.CAPABILITY_TTL
#: The capability a chat continuation needs.
PREFILL = "prefill"


class CapabilityMemory:
    """Operations on the shared "cannot do X" memory of one namespace (run them with a shell)."""

    def __init__(self, keys: Keys, ttl: float = DEFAULT_TTL) -> None:
        self.keys = keys
        self.ttl = ttl

    def key(self, backend: str, capability: str) -> str:
        return self.keys.capability(backend, capability)

    def remember_missing(self, backend: str, capability: str = PREFILL) -> Operation[None]:
        """Record that ``backend`` cannot do ``capability``, for ``ttl`` seconds from now."""
        (reply,) = yield [Cmd(("SET", self.key(backend, capability), "1", "PX", max(1, int(self.ttl * 1000))))]
        ok(reply)

    def missing(self, pairs: Sequence[tuple[str, str]]) -> Operation[set[str]]:
        """The backends of ``(backend, capability)`` pairs remembered as unable to do that capability."""
        if not pairs:
            return set()
        replies = yield [Cmd(("EXISTS", self.key(name, capability))) for name, capability in pairs]
        return {name for (name, _), reply in zip(pairs, replies, strict=True) if ok(reply)}
