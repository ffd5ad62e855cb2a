"""Redis access of the fleet-wide in-flight call counts (the routing policy is execution/groups.py).

One sorted set per deployment (``<namespace>:{<namespace>:inflight}:<deployment>``),
member ``<worker>/<request>`` scored by a deadline in ms on the Redis server clock. All
those sets share one hash slot, so the pick over several deployments is one script:
INFLIGHT_PICK (KEYS: one set per candidate; ARGV: member, ttl ms, a random number in
[0, 1), one weight per key) and INFLIGHT_RENEW (KEYS[1]: one set; ARGV: ttl ms,
members...). Members of a worker that died drop out once their deadline passes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from flo_coord.store.breakers import BreakerStore, Decision
from flo_coord.store.codec import text
from flo_coord.store.core import Cmd, Eval, Operation, ok, together
from flo_coord.store.scripts import INFLIGHT_PICK, INFLIGHT_RENEW

if TYPE_CHECKING:
    from flo_coord.store.core import FailoverCore
    from flo_coord.store.shell_async import AsyncShell

#: A call stays counted this many leases without a renewal (a dead worker's calls drop out after it).
TTL_LEASES = 3


class InFlightStore:
    """The in-flight counts of one namespace (``manager.inflight``).

    ``ttl``: seconds a call stays counted without a renewal (default ``TTL_LEASES`` leases,
    at least 1 s); renew members about every ``ttl / 3`` seconds. Every method raises
    CoordinatorUnavailableError when Redis does not answer within the retry deadline.
    """

    def __init__(self, core: FailoverCore, shell: AsyncShell, breakers: BreakerStore, ttl: float | None = None) -> None:
        self._core, self._shell, self._breakers = core, shell, breakers
        self.ttl = ttl if ttl is not None else TTL_LEASES * core.lease_ttl

    @property
    def ttl_ms(self) -> int:
        """``ttl`` in whole milliseconds, at least 1000."""
        return max(1000, int(self.ttl * 1000))

    def key(self, deployment: str) -> str:
        """The sorted set of ``deployment``'s calls in flight."""
        return self._core.keys.inflight(deployment)

    def pick_op(self, candidates: Sequence[tuple[str, float]], member: str) -> Operation[tuple[str, list[int]]]:
        """The sans-I/O operation of ``pick``."""
        weights = [repr(float(w)) for _, w in candidates]
        args = (member, self.ttl_ms, repr(random.random()), *weights)
        (reply,) = yield [Eval(INFLIGHT_PICK, tuple(self.key(n) for n, _ in candidates), args)]
        index, counts = ok(reply)
        return candidates[int(index) - 1][0], [int(c) for c in counts]

    async def pick(
        self, candidates: Sequence[tuple[str, float]], member: str, *, request_id: str | None = None
    ) -> tuple[str, list[int]]:
        """Choose among ``candidates`` ((deployment, weight > 0) pairs) the least busy per unit
        of weight (ties by weighted chance) and count ``member`` on it, in one script.
        Returns (the chosen deployment, every candidate's in-flight count before the pick)."""
        op = self.pick_op(candidates, member)
        return await self._shell.run(op, "inflight", request_id)  # type: ignore[no-any-return]

    async def pick_if_allowed(
        self, deployment: str, weight: float, member: str, *, probe_ttl: float, request_id: str | None = None
    ) -> tuple[Decision, str]:
        """The breaker decision for ``deployment`` (``BreakerStore.allow`` with ``member`` as
        the owner) and ``member`` counted on it, in one round trip. Returns (decision,
        deployment); the caller releases the count when the decision is OPEN."""
        ops = [self._breakers.allow_op(deployment, member, probe_ttl), self.pick_op([(deployment, weight)], member)]
        decision, (name, _) = await self._shell.run(together(ops), "breaker", request_id)
        return decision, name

    async def release(self, deployment: str, member: str, *, request_id: str | None = None) -> None:
        """The call of ``member`` on ``deployment`` ended (a single ZREM: no script needed)."""
        await self._shell.run(self._release(deployment, member), "inflight", request_id)

    def _release(self, deployment: str, member: str) -> Operation[None]:
        (reply,) = yield [Cmd(("ZREM", self.key(deployment), member))]
        ok(reply)

    async def renew(self, members: Mapping[str, str]) -> None:
        """Push the deadlines of ``members`` (member -> deployment) ``ttl`` seconds ahead, one
        script per deployment, all in one round trip; a released member stays released."""
        await self._shell.run(self._renew(members), "inflight")

    def _renew(self, members: Mapping[str, str]) -> Operation[None]:
        by_deployment: dict[str, list[str]] = {}
        for member, deployment in members.items():
            by_deployment.setdefault(deployment, []).append(member)
        if not by_deployment:
            return
        replies = yield [Eval(INFLIGHT_RENEW, (self.key(d),), (self.ttl_ms, *ms)) for d, ms in by_deployment.items()]
        for reply in replies:
            ok(reply)

    def counts_op(self, deployments: Sequence[str]) -> Operation[dict[str, int]]:
        """The sans-I/O operation of ``counts`` (two steps: the server TIME, then the reads)."""
        if not deployments:
            return {}
        (reply,) = yield [Cmd(("TIME",))]
        seconds, micros = (int(text(v)) for v in ok(reply))
        now = seconds * 1000 + micros // 1000
        replies = yield [Cmd(("ZRANGEBYSCORE", self.key(d), f"({now}", "+inf")) for d in deployments]
        return {d: len(ok(r)) for d, r in zip(deployments, replies, strict=True)}

    async def counts(self, deployments: Sequence[str]) -> dict[str, int]:
        """Calls in flight per deployment now (members past their deadline not counted), for
        tools and tests: {deployment: count}."""
        return await self._shell.run(self.counts_op(deployments), "inflight")  # type: ignore[no-any-return]
