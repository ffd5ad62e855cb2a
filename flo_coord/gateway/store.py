"""What the gateway keeps in Redis besides the request itself: idempotency keys, the
answer's presentation (object, model, created, include_usage) and cancellation.

- Idempotency: ``<ns>:idem:<sha256(key)>`` = ``"<body sha256> <request id>"``, set if
  absent by the IDEMPOTENCY_CLAIM script. The key itself is never stored, only its hash.
- Presentation: a hash in the request's slot, written before the request starts, so
  any replica can continue the same event stream (``resume``) after a takeover.
- Cancel: the CANCEL script flags the request's context (any replica may); each replica's
  :class:`CancelWatcher` checks the requests it holds a few times a second and cancels
  the local generation of a flagged one, which ends it failed (fenced, by its owner).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from flo_coord.codec import pairs, text
from flo_coord.core import Cmd, Eval, Operation, astuple, ok
from flo_coord.errors import FloCoordError
from flo_coord.manager import AsyncFailoverManager
from flo_coord.scripts import CANCEL, IDEMPOTENCY_CLAIM

log = logging.getLogger("flo_coord.gateway")


class IdempotencyConflictError(FloCoordError):
    """The Idempotency-Key was used before with a different request body (HTTP 409)."""


class Presentation(msgspec.Struct, kw_only=True, frozen=True):
    """How the answer of one request is shaped as OpenAI objects (kept for resumes)."""

    object: str  #: "chat.completion" or "text_completion"
    model: str  #: the model name the client asked for
    created: int  #: Unix seconds
    include_usage: bool = False


def key_hash(key: str) -> str:
    """The hex SHA-256 of an idempotency key or bearer key (what may be stored or compared)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def claim_idempotency(
    manager: AsyncFailoverManager, key: str, body_hash: str, request_id: str, ttl: float
) -> Operation[str | None]:
    """Bind ``key`` to ``request_id`` unless it is bound; returns the id it was bound to before.

    Raises IdempotencyConflictError when the key was bound with another body hash.
    ``ttl``: seconds the binding lives (the request's retention).
    """
    name = manager.core.keys.idempotency(key_hash(key))
    value = f"{body_hash} {request_id}"
    (reply,) = yield [Eval(IDEMPOTENCY_CLAIM, (name,), (value, max(1, int(ttl * 1000))))]
    reply = ok(reply)
    if text(reply[0]) == "NEW":
        return None
    old_hash, _, old_id = text(reply[1]).partition(" ")
    if old_id == request_id:
        return None  # our own SET, retried after a lost reply
    if old_hash != body_hash:
        raise IdempotencyConflictError("this Idempotency-Key was used with a different request body")
    return old_id


def save_presentation(
    manager: AsyncFailoverManager, request_id: str, shape: Presentation, ttl: float
) -> Operation[None]:
    name = manager.core.keys.gateway(request_id)
    fields = ("object", shape.object, "model", shape.model, "created", shape.created)
    replies = yield [
        Cmd(("HSET", name, *fields, "include_usage", int(shape.include_usage))),
        Cmd(("PEXPIRE", name, max(1, int(ttl * 1000)))),
    ]
    for reply in replies:
        ok(reply, request_id)


def load_presentation(manager: AsyncFailoverManager, request_id: str) -> Operation[Presentation | None]:
    (reply,) = yield [Cmd(("HGETALL", manager.core.keys.gateway(request_id)))]
    data = pairs(ok(reply, request_id))
    if not data:
        return None
    try:
        return Presentation(
            object=data["object"],
            model=data["model"],
            created=int(data["created"]),
            include_usage=data.get("include_usage") == "1",
        )
    except (KeyError, ValueError):
        return None  # not ours or damaged: the caller answers as if unknown


def request_cancel(manager: AsyncFailoverManager, request_id: str) -> Operation[tuple[str, str | None]]:
    """Flag a request for cancellation: ("OK", owner) live, ("DONE", state) finished, ("GONE", None)."""
    rk = manager.core.keys.request(request_id)
    (reply,) = yield [Eval(CANCEL, astuple(rk), ())]
    reply = ok(reply, request_id)
    status = text(reply[0])
    return status, (text(reply[1]) if len(reply) > 1 else None)


def _flags(manager: AsyncFailoverManager, request_ids: list[str]) -> Operation[list[str]]:
    keys = manager.core.keys
    replies = yield [Cmd(("HGET", keys.request(rid).ctx, "cancel")) for rid in request_ids]
    return [rid for rid, reply in zip(request_ids, replies, strict=True) if ok(reply) is not None]


class CancelWatcher:
    """Checks every ``interval`` seconds whether a request this replica holds was cancelled.

    ``cancel_local(request_id)`` stops the local generation (the Coordinator then ends the
    request failed, fenced by its epoch). ``last_ok`` is the monotonic time of the last
    round that reached Redis (readiness uses it).
    """

    def __init__(
        self, manager: AsyncFailoverManager, cancel_local: Callable[[str], bool], interval: float = 0.25
    ) -> None:
        self.manager = manager
        self.cancel_local = cancel_local
        self.interval = interval
        self.last_ok = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> CancelWatcher:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cancel-watcher")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the next round retries
                log.warning("cancel check failed: %s", exc)

    async def check(self) -> list[str]:
        """One round; returns the ids cancelled locally."""
        held = self.manager.held()
        flagged: list[Any] = await self.manager.shell.run(_flags(self.manager, held), "cancel") if held else []
        if not held:
            await self.manager.redis.ping()
        self.last_ok = time.monotonic()
        done = [rid for rid in flagged if self.cancel_local(rid)]
        for rid in done:
            log.info("request %s cancelled", rid)
        return done
