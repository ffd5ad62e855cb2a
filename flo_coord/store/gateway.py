"""What the gateway keeps in Redis besides the request itself: idempotency keys and the
answer's presentation (object, model, created, include_usage).

- Idempotency: ``<ns>:idem:<sha256(key)>`` = ``"<body sha256> <request id>"``, set if
  absent by the IDEMPOTENCY_CLAIM script. The key itself is never stored, only its hash.
- Presentation: a hash in the request's slot, written before the request starts, so
  any replica can continue the same event stream (``resume``) after a takeover.
- Committed length: how many characters of a request's answer are committed (a GET of its text).
- Cancel is a Coordinator capability (``Coordinator.cancel``, ownership.CancelWatcher):
  every worker and replica stops a flagged request it holds within about a second.

IDEMPOTENCY_CLAIM (store/scripts.py): KEYS[1] the idempotency string; ARGV value
(``<body sha256> <request id>``), ttl ms; one key, so one slot. ``GatewayStore``
(``manager.gateway``) runs these operations; each raises CoordinatorUnavailableError when
Redis does not answer within the retry deadline.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

import msgspec

from flo_coord.errors import FloCoordError
from flo_coord.store.codec import pairs, text
from flo_coord.store.core import Cmd, Eval, FailoverCore, Operation, ok
from flo_coord.store.scripts import IDEMPOTENCY_CLAIM

if TYPE_CHECKING:
    from flo_coord.store.shell_async import AsyncShell

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
    core: FailoverCore, key: str, body_hash: str, request_id: str, ttl: float
) -> Operation[str | None]:
    """Bind ``key`` to ``request_id`` unless it is bound; returns the id it was bound to before.

    Raises IdempotencyConflictError when the key was bound with another body hash.
    ``ttl``: seconds the binding lives (the request's retention).
    """
    name = core.keys.idempotency(key_hash(key))
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


def save_presentation(core: FailoverCore, request_id: str, shape: Presentation, ttl: float) -> Operation[None]:
    """Write ``shape`` to ``request_id``'s presentation hash (its slot), expiring in ``ttl`` seconds."""
    name = core.keys.gateway(request_id)
    fields = ("object", shape.object, "model", shape.model, "created", shape.created)
    replies = yield [
        Cmd(("HSET", name, *fields, "include_usage", int(shape.include_usage))),
        Cmd(("PEXPIRE", name, max(1, int(ttl * 1000)))),
    ]
    for reply in replies:
        ok(reply, request_id)


def load_presentation(core: FailoverCore, request_id: str) -> Operation[Presentation | None]:
    """The presentation saved for ``request_id``; None when none is stored or it is not ours."""
    (reply,) = yield [Cmd(("HGETALL", core.keys.gateway(request_id)))]
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


def committed_length(core: FailoverCore, request_id: str) -> Operation[int]:
    """Characters of ``request_id``'s committed answer (0 when there is none).

    Raises CorruptStateError (via ``codec.text``) when the stored text is not UTF-8."""
    (reply,) = yield [Cmd(("GET", core.keys.request(request_id).text))]
    raw = ok(reply, request_id)
    return len(text(raw)) if raw is not None else 0


class GatewayStore:
    """What the gateway keeps in Redis for one namespace (``manager.gateway``)."""

    def __init__(self, core: FailoverCore, shell: AsyncShell) -> None:
        self._core, self._shell = core, shell

    async def claim_idempotency(self, key: str, body_hash: str, request_id: str, ttl: float) -> str | None:
        """Bind Idempotency-Key ``key`` to ``request_id`` (for ``ttl`` seconds) unless it is
        bound; returns the request id it was bound to before, None when bound now (or by
        this same request). Raises IdempotencyConflictError when ``key`` was bound with
        another ``body_hash`` (hex SHA-256 of the request body)."""
        op = claim_idempotency(self._core, key, body_hash, request_id, ttl)
        return await self._shell.run(op, "idempotency")  # type: ignore[no-any-return]

    async def save_presentation(self, request_id: str, shape: Presentation, ttl: float) -> None:
        """Keep how ``request_id``'s answer is presented, for ``ttl`` seconds (any replica resumes it)."""
        await self._shell.run(save_presentation(self._core, request_id, shape, ttl), "gateway", request_id)

    async def load_presentation(self, request_id: str) -> Presentation | None:
        """The Presentation saved for ``request_id``; None when there is none or it is damaged."""
        op = load_presentation(self._core, request_id)
        return await self._shell.run(op, "gateway", request_id)  # type: ignore[no-any-return]

    async def committed_length(self, request_id: str) -> int:
        """Characters of ``request_id``'s committed answer (0 when nothing is stored).
        Raises CorruptStateError when the stored text is not UTF-8."""
        op = committed_length(self._core, request_id)
        return await self._shell.run(op, "gateway", request_id)  # type: ignore[no-any-return]
