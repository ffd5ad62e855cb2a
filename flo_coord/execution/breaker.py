"""A circuit breaker per backend, shared by every worker through Redis.

When one worker sees a backend fail ``threshold`` times within ``window`` seconds, the
breaker opens for everyone: workers skip that backend for ``cooldown`` seconds. Then
exactly one caller (for the Coordinator: one request) probes it (half-open); its success closes it for all,
its failure opens it again. State is one small hash per backend (one slot), changed only
by the Lua scripts BREAKER_ALLOW and BREAKER_RECORD, timed by the Redis server clock.

A breaker hash holding data flo_coord did not write (a field that is not a number, the
wrong key type) is never trusted: it is deleted (the breaker is closed), logged, and the
call is made again on the fresh state, so a corrupt breaker cannot hold requests forever.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import msgspec
import redis.exceptions as rex

from flo_coord import defaults
from flo_coord.constraints import Checked, PositiveInt, PositiveSeconds
from flo_coord.store.codec import text
from flo_coord.store.core import Cmd, Eval, Operation, ok
from flo_coord.store.keys import Keys
from flo_coord.store.scripts import BREAKER_ALLOW, BREAKER_RECORD


class BreakerConfig(msgspec.Struct, Checked, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Circuit-breaker policy (``[breaker]``): ``threshold`` failures (an integer >= 1) within
    ``window`` seconds open a backend's breaker for ``cooldown`` seconds; a half-open probe holds
    its claim ``probe_ttl`` seconds. Seconds are 0.001 to ten years; another value raises
    ConfigError naming the field."""

    threshold: PositiveInt = defaults.BREAKER_THRESHOLD
    window: PositiveSeconds = defaults.BREAKER_WINDOW
    cooldown: PositiveSeconds = defaults.BREAKER_COOLDOWN
    probe_ttl: PositiveSeconds = defaults.BREAKER_PROBE_TTL


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


class CircuitBreaker:
    """Operations on the shared breakers of one namespace (run them with a shell)."""

    def __init__(self, keys: Keys, worker_id: str, config: BreakerConfig | None = None) -> None:
        self.keys = keys
        self.worker_id = worker_id
        self.config = config or BreakerConfig()

    def allow(self, backend: str, probe_id: str | None = None) -> Operation[Decision]:
        """CLOSED (use it), PROBE (use it: you are the half-open probe) or OPEN (skip it).

        ``probe_id`` names the one caller that may probe (default: this worker). Pass one per
        request, or a worker with many requests in flight sends them all to a half-open backend.
        """
        owner = probe_id if probe_id is not None else self.worker_id
        call = Eval(BREAKER_ALLOW, (self.keys.breaker(backend),), (owner, int(self.config.probe_ttl * 1000)))
        reply = yield from _run_fresh(call)
        return text(reply[0])  # type: ignore[return-value]

    def record(self, backend: str, success: bool) -> Operation[str]:
        """Count one outcome; returns the breaker state after it (closed, open, ...)."""
        c = self.config
        args = ("ok" if success else "fail", c.threshold, int(c.window * 1000), int(c.cooldown * 1000))
        reply = yield from _run_fresh(Eval(BREAKER_RECORD, (self.keys.breaker(backend),), args))
        return text(reply[0])
