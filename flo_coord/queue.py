"""The intake queue: clients submit requests to a Redis stream; workers take them with a
consumer group.

A worker acknowledges an entry only once the request is tracked (and so protected by its
lease). An entry taken by a worker that died before that stays pending in the group and
is re-taken by another worker with XAUTOCLAIM after ``idle`` seconds. From then on,
leases and takeover protect the request.
"""

from __future__ import annotations

from typing import Any

import msgspec

from flo_coord import validation
from flo_coord.codec import pairs, text
from flo_coord.core import Cmd, FailoverCore, Operation, ok
from flo_coord.errors import ValidationError
from flo_coord.models import ChatMessage

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


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Submission)


def submit(core: FailoverCore, submission: Submission) -> Operation[str]:
    """Queue a request (validated first); returns the stream entry id."""
    validation.request_id(submission.request_id, core.limits)
    if (submission.prompt is None) == (submission.messages is None):
        raise ValidationError("a submission needs exactly one of prompt or messages")
    if submission.prompt is not None:
        validation.prompt(submission.prompt, core.limits)
    else:
        submission.messages = validation.messages(submission.messages, core.limits)
    return _submit(core, submission)


def _submit(core: FailoverCore, submission: Submission) -> Operation[str]:
    (reply,) = yield [Cmd(("XADD", core.keys.queue, "*", "r", _encoder.encode(submission)))]
    return text(ok(reply))


def ensure_group(core: FailoverCore) -> Operation[None]:
    (reply,) = yield [Cmd(("XGROUP", "CREATE", core.keys.queue, GROUP, "0", "MKSTREAM"))]
    if isinstance(reply, BaseException) and "BUSYGROUP" not in str(reply):
        raise reply


def _decode(entries: Any) -> list[tuple[str, Submission | None]]:
    out: list[tuple[str, Submission | None]] = []
    for entry_id, fields in entries or []:
        if fields is None:  # deleted entry
            continue
        try:
            out.append((text(entry_id), _decoder.decode(pairs(fields).get("r", ""))))
        except (msgspec.DecodeError, msgspec.ValidationError):
            out.append((text(entry_id), None))  # foreign data: acknowledged and dropped
    return out


def take(core: FailoverCore, count: int, block_ms: int) -> Operation[list[tuple[str, Submission | None]]]:
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


def reclaim(core: FailoverCore, idle_ms: int, count: int) -> Operation[list[tuple[str, Submission | None]]]:
    """Entries another worker took but never acknowledged for ``idle_ms`` (it died first)."""
    command = ("XAUTOCLAIM", core.keys.queue, GROUP, core.worker_id, idle_ms, "0-0", "COUNT", count)
    (reply,) = yield [Cmd(command)]
    return _decode(ok(reply)[1])


def ack(core: FailoverCore, entry_id: str) -> Operation[None]:
    (reply,) = yield [Cmd(("XACK", core.keys.queue, GROUP, entry_id))]
    ok(reply)
