"""Read-only looks at what a namespace holds, for tools: the server's clock and liveness,
a request's committed text and the failover history after a given entry.

Plain commands (PING, TIME, GET, XRANGE): reads of one key each, so no script.
"""

from __future__ import annotations

from typing import Any

import msgspec

from flo_coord.models import HistoryEntry
from flo_coord.store.codec import decode_history, json_encoder, pairs, text
from flo_coord.store.core import Cmd, FailoverCore, Operation, ok


def server_time() -> Operation[float]:
    """The Redis server's clock (TIME), in Unix seconds with microseconds."""
    (reply,) = yield [Cmd(("TIME",))]
    seconds, micros = ok(reply)
    return int(text(seconds)) + int(text(micros)) / 1e6


def committed_text(core: FailoverCore, request_id: str) -> Operation[str | None]:
    """``request_id``'s committed answer text (GET of its text key); None when none is stored.
    Raises UnicodeDecodeError (the shell makes it CorruptStateError) when it is not UTF-8."""
    (reply,) = yield [Cmd(("GET", core.keys.request(request_id).text))]
    raw = ok(reply, request_id)
    return text(raw) if raw is not None else None


def history_from(core: FailoverCore, entry_id: str, count: int) -> Operation[list[tuple[str, HistoryEntry | None]]]:
    """Up to ``count`` history entries from stream id ``entry_id`` on (inclusive: XRANGE),
    oldest first, as (entry id, entry or None for a foreign one)."""
    (reply,) = yield [Cmd(("XRANGE", core.keys.history, entry_id, "+", "COUNT", count))]
    return [(text(eid), decode_history(pairs(fields).get("e", ""))) for eid, fields in ok(reply)]


def as_builtins(obj: Any) -> Any:
    """``obj`` (a model: StreamingContext, RequestOutcome, history entry...) as the dicts,
    lists and scalars of its stored JSON form (for printing as JSON)."""
    return msgspec.json.decode(json_encoder.encode(obj))
