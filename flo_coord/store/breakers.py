"""Redis access of the shared circuit breakers (the policy lives in execution/breaker.py).

State is one small hash per backend (``Keys.breaker``: one key, so one hash slot), changed
only by the Lua scripts BREAKER_ALLOW and BREAKER_RECORD (store/scripts.py), timed by the
Redis server clock. BREAKER_ALLOW: KEYS[1] the breaker hash; ARGV owner (the one caller
that may probe), probe ttl (ms). BREAKER_RECORD: KEYS[1] the breaker hash; ARGV "ok" or
"fail", threshold, window (ms), cooldown (ms).

A breaker hash holding data flo_coord did not write (a field that is not a number, the
wrong key type) is never trusted: it is deleted (the breaker is closed), logged, and the
script run again on the fresh state, so a corrupt breaker cannot hold requests forever.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import redis.exceptions as rex

from flo_coord.store.codec import text
from flo_coord.store.core import Cmd, Eval, Operation, ok, together
from flo_coord.store.scripts import BREAKER_ALLOW, BREAKER_RECORD

if TYPE_CHECKING:
    from flo_coord.store.core import FailoverCore
    from flo_coord.store.shell_async import AsyncShell

#: CLOSED (use the backend), PROBE (use it: the caller is the half-open probe), OPEN (skip it).
Decision = Literal["CLOSED", "PROBE", "OPEN"]
log = logging.getLogger("flo_coord.breaker")


def _corrupt(reply: Any) -> bool:
    return isinstance(reply, rex.ResponseError) and any(m in str(reply) for m in ("FLOCORRUPT", "WRONGTYPE"))


def _run_fresh(call: Eval) -> Operation[Any]:
    """Run a breaker script; a corrupt breaker hash is reset (and logged) and the script run again."""
    (reply,) = yield [call]
    if _corrupt(reply):
        key = call.keys[0]
        log.warning("circuit breaker %s held foreign data (%s): reset to closed", key, str(reply).split(" script: ")[0])
        (deleted,) = yield [Cmd(("DEL", key))]
        ok(deleted)
        (reply,) = yield [call]
    return ok(reply)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class BreakerStore:
    """The shared breakers of one namespace (``manager.breakers``); every method is one
    round trip (two when a corrupt hash is reset). Raises CoordinatorUnavailableError when
    Redis does not answer within the retry deadline."""

    def __init__(self, core: FailoverCore, shell: AsyncShell) -> None:
        self._core, self._shell = core, shell

    def allow_op(self, backend: str, owner: str, probe_ttl: float) -> Operation[Decision]:
        """The sans-I/O operation of ``allow`` (to share a round trip with other operations)."""
        call = Eval(BREAKER_ALLOW, (self._core.keys.breaker(backend),), (owner, _ms(probe_ttl)))
        reply = yield from _run_fresh(call)
        return text(reply[0])  # type: ignore[return-value]

    async def allow(self, backend: str, owner: str, *, probe_ttl: float, request_id: str | None = None) -> Decision:
        """May ``owner`` call ``backend`` now? CLOSED, PROBE (``owner`` is the one half-open
        probe for ``probe_ttl`` seconds) or OPEN. ``owner``: any str naming the caller (the
        Coordinator passes ``<worker>/<request>``, one probe per request); ``request_id``: the
        request an error names, if any."""
        op = self.allow_op(backend, owner, probe_ttl)
        return await self._shell.run(op, "breaker", request_id)  # type: ignore[no-any-return]

    async def allow_each(
        self, backends: Sequence[str], owner: str, *, probe_ttl: float, request_id: str | None = None
    ) -> list[Decision]:
        """``allow`` for each of ``backends``, in order, in one round trip."""
        ops = [self.allow_op(b, owner, probe_ttl) for b in backends]
        return await self._shell.run(together(ops), "breaker", request_id)  # type: ignore[no-any-return]

    def record_op(self, backend: str, success: bool, threshold: int, window: float, cooldown: float) -> Operation[str]:
        """The sans-I/O operation of ``record``."""
        args = ("ok" if success else "fail", threshold, _ms(window), _ms(cooldown))
        reply = yield from _run_fresh(Eval(BREAKER_RECORD, (self._core.keys.breaker(backend),), args))
        return text(reply[0])

    async def record(self, backend: str, success: bool, *, threshold: int, window: float, cooldown: float) -> str:
        """Count one outcome of a call to ``backend``: ``threshold`` failures within ``window``
        seconds open it for ``cooldown`` seconds, for every worker. Returns the state after
        it ("closed", "open", ...)."""
        op = self.record_op(backend, success, threshold, window, cooldown)
        return await self._shell.run(op, "breaker")  # type: ignore[no-any-return]
