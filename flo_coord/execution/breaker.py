"""A circuit breaker per backend, shared by every worker through Redis.

When one worker sees a backend fail ``threshold`` times within ``window`` seconds, the
breaker opens for everyone: workers skip that backend for ``cooldown`` seconds. Then
exactly one caller (for the Coordinator: one request) probes it (half-open); its success closes it for all,
its failure opens it again. This module is the policy (thresholds, times, who probes);
the state and its scripts are the store's (``flo_coord.store.breakers``, ``manager.breakers``):
one small hash per backend, timed by the Redis server clock, reset when it holds foreign data.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from flo_coord import defaults
from flo_coord.constraints import Checked, PositiveInt, PositiveSeconds
from flo_coord.store import BreakerStore, Decision


class BreakerConfig(msgspec.Struct, Checked, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Circuit-breaker policy (``[breaker]``): ``threshold`` failures (an integer >= 1) within
    ``window`` seconds open a backend's breaker for ``cooldown`` seconds; a half-open probe holds
    its claim ``probe_ttl`` seconds. Seconds are 0.001 to ten years; another value raises
    ConfigError naming the field."""

    threshold: PositiveInt = defaults.BREAKER_THRESHOLD
    window: PositiveSeconds = defaults.BREAKER_WINDOW
    cooldown: PositiveSeconds = defaults.BREAKER_COOLDOWN
    probe_ttl: PositiveSeconds = defaults.BREAKER_PROBE_TTL


class CircuitBreaker:
    """The breaker policy of one Coordinator over the shared breakers (``manager.breakers``).

    ``store``: the store's BreakerStore; ``worker_id``: the default probe owner; ``config``:
    thresholds and times. Every method raises CoordinatorUnavailableError when Redis does
    not answer within the retry deadline.
    """

    def __init__(self, store: BreakerStore, worker_id: str, config: BreakerConfig | None = None) -> None:
        self.store = store
        self.worker_id = worker_id
        self.config = config or BreakerConfig()

    async def allow(self, backend: str, probe_id: str | None = None, *, request_id: str | None = None) -> Decision:
        """CLOSED (use it), PROBE (use it: you are the half-open probe) or OPEN (skip it).

        ``probe_id`` names the one caller that may probe (default: this worker). Pass one per
        request, or a worker with many requests in flight sends them all to a half-open backend.
        """
        owner = probe_id if probe_id is not None else self.worker_id
        return await self.store.allow(backend, owner, probe_ttl=self.config.probe_ttl, request_id=request_id)

    async def allow_each(
        self, backends: Sequence[str], probe_id: str | None = None, *, request_id: str | None = None
    ) -> list[Decision]:
        """``allow`` for each of ``backends``, in order, in one round trip."""
        owner = probe_id if probe_id is not None else self.worker_id
        return await self.store.allow_each(backends, owner, probe_ttl=self.config.probe_ttl, request_id=request_id)

    async def record(self, backend: str, success: bool) -> str:
        """Count one outcome; returns the breaker state after it (closed, open, ...)."""
        c = self.config
        return await self.store.record(backend, success, threshold=c.threshold, window=c.window, cooldown=c.cooldown)
