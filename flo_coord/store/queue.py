"""The intake queue: clients submit requests to a Redis stream; workers take them with a
consumer group.

A worker acknowledges an entry only once the request is tracked (and so protected by its
lease). An entry taken by a worker that died before that stays pending in the group and
is re-taken by another worker with XAUTOCLAIM after ``idle`` seconds. From then on,
leases and takeover protect the request.

An entry a worker cannot run (not JSON, not UTF-8, fields of the wrong type) is decoded
as a ``Poison``: the worker ends its request as failed when the entry names a valid
request id (followers see why), acknowledges it, and goes on. ``submit`` refuses at the
door everything a worker would refuse (the same validation as ``start_tracking``).

Redis: one stream, ``Keys.queue``, and its consumer group ``GROUP``; each call is one
plain command (XADD, XGROUP CREATE, XREADGROUP, XAUTOCLAIM, XACK), so no script. The
module-level functions are the sans-I/O operations; ``QueueStore`` (``manager.queue``)
runs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from flo_coord.errors import ValidationError
from flo_coord.models import ChatMessage
from flo_coord.store import validation
from flo_coord.store.codec import text
from flo_coord.store.core import Cmd, FailoverCore, Operation, ok

if TYPE_CHECKING:
    from flo_coord.store.shell_async import AsyncShell

GROUP = "workers"


class Submission(msgspec.Struct, kw_only=True):
    """A request as submitted: a prompt or chat messages, and options."""

    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    primary: str | None = None
    max_tokens: int | None = None
    #: a model group name (``[[models]]``): the worker routes the request through that group
    model: str | None = None


class Poison(msgspec.Struct, frozen=True):
    """A queue entry no worker can run: its request id (when one could be read) and why."""

    request_id: str | None
    reason: str


class _Named(msgspec.Struct):
    request_id: str


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Submission)
_id_decoder = msgspec.json.Decoder(_Named)


def submit(core: FailoverCore, submission: Submission) -> Operation[str]:
    """Queue a request (validated first); returns the stream entry id."""
    validation.request_id(submission.request_id, core.limits)
    if (submission.prompt is None) == (submission.messages is None):
        raise ValidationError("a submission needs exactly one of prompt or messages")
    if submission.prompt is not None:
        validation.prompt(submission.prompt, core.limits)
    else:
        submission.messages = validation.chat_messages(submission.messages, core.limits)
    # What a worker's start_tracking would refuse is refused here, before it is queued.
    core.start_new(
        submission.request_id,
        submission.prompt,
        submission.primary,
        messages=submission.messages,
        max_tokens=submission.max_tokens,
    ).close()
    return _submit(core, submission)


def _submit(core: FailoverCore, submission: Submission) -> Operation[str]:
    (reply,) = yield [Cmd(("XADD", core.keys.queue, "*", "r", _encoder.encode(submission)))]
    return text(ok(reply))


def ensure_group(core: FailoverCore) -> Operation[None]:
    """Create the consumer group (and the stream) unless it exists."""
    (reply,) = yield [Cmd(("XGROUP", "CREATE", core.keys.queue, GROUP, "0", "MKSTREAM"))]
    if isinstance(reply, BaseException) and "BUSYGROUP" not in str(reply):
        raise reply


Entry = tuple[str, Submission | Poison]


def _raw_field(fields: Any) -> bytes | str:
    if isinstance(fields, dict):
        fields = [x for kv in fields.items() for x in kv]
    for i in range(0, len(fields) - 1, 2):
        if fields[i] in (b"r", "r"):
            value = fields[i + 1]
            return value if isinstance(value, bytes | str) else str(value)
    return b""


def decode_entry(fields: Any) -> Submission | Poison:
    """One queue entry's submission, or the Poison it is (never raises)."""
    raw: bytes | str = b""
    try:
        raw = _raw_field(fields)
        return _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as exc:
        reason = f"undecodable queue entry: {exc}"
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")  # not UTF-8: find the id anyway, if it is intact
        reason = "undecodable queue entry: not valid UTF-8" if "\ufffd" in raw else reason
    try:
        rid = _id_decoder.decode(raw).request_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        rid = None
    return Poison(None if rid is None or "\ufffd" in rid else rid, reason)


def _decode(entries: Any) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, fields in entries or []:
        if fields is None:  # deleted entry
            continue
        out.append((text(entry_id), decode_entry(fields)))
    return out


def take(core: FailoverCore, count: int, block_ms: int) -> Operation[list[Entry]]:
    """New entries for this worker (blocking up to ``block_ms``)."""
    queue = core.keys.queue
    command = ("XREADGROUP", "GROUP", GROUP, core.worker_id, "COUNT", count, "BLOCK", block_ms, "STREAMS", queue, ">")
    (reply,) = yield [Cmd(command)]
    reply = ok(reply)
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return _decode(next(iter(reply.values()))[0] if reply else [])
    return _decode(reply[0][1])


def reclaim(core: FailoverCore, idle_ms: int, count: int) -> Operation[list[Entry]]:
    """Entries another worker took but never acknowledged for ``idle_ms`` (it died first)."""
    command = ("XAUTOCLAIM", core.keys.queue, GROUP, core.worker_id, idle_ms, "0-0", "COUNT", count)
    (reply,) = yield [Cmd(command)]
    return _decode(ok(reply)[1])


def ack(core: FailoverCore, entry_id: str) -> Operation[None]:
    """Acknowledge ``entry_id``: it leaves the group's pending list."""
    (reply,) = yield [Cmd(("XACK", core.keys.queue, GROUP, entry_id))]
    ok(reply)


class QueueStore:
    """The intake queue of one namespace (``manager.queue``). Every method raises
    CoordinatorUnavailableError when Redis does not answer within the retry deadline."""

    def __init__(self, core: FailoverCore, shell: AsyncShell) -> None:
        self._core, self._shell = core, shell

    async def submit(self, submission: Submission) -> str:
        """Queue ``submission`` for any worker; returns its stream entry id. Raises
        ValidationError, before any I/O, for what a worker's ``start_tracking`` would refuse."""
        op = submit(self._core, submission)
        return await self._shell.run(op, "submit", submission.request_id)  # type: ignore[no-any-return]

    async def ensure_group(self) -> None:
        """Create the workers' consumer group (and the stream) unless it exists."""
        await self._shell.run(ensure_group(self._core), "queue")

    async def take(self, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` new entries for this worker, blocking up to ``block_ms`` ms:
        (entry id, Submission or Poison) pairs."""
        return await self._shell.run(take(self._core, count, block_ms), "queue")  # type: ignore[no-any-return]

    async def reclaim(self, idle_ms: int, count: int) -> list[Entry]:
        """Up to ``count`` entries another worker took but left unacknowledged for ``idle_ms`` ms."""
        return await self._shell.run(reclaim(self._core, idle_ms, count), "queue")  # type: ignore[no-any-return]

    async def ack(self, entry_id: str, request_id: str | None = None) -> None:
        """Acknowledge ``entry_id`` (its request is tracked, or ended); ``request_id`` is
        named by an error."""
        await self._shell.run(ack(self._core, entry_id), "queue", request_id)
