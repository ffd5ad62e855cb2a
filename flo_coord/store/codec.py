"""Encoding between the models and what Redis stores. msgspec only: nothing is ever
unpickled or evaluated, and anything that does not decode raises CorruptStateError."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from flo_coord.errors import CorruptStateError
from flo_coord.models import (
    ChatMessage,
    FailoverAttempt,
    FailoverResult,
    HistoryEntry,
    RequestOutcome,
    StreamingContext,
)
from flo_coord.redact import redact_secrets


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, FailoverResult):
        return obj.to_wire()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is FailoverResult:
        return FailoverResult.from_wire(obj)
    raise NotImplementedError(f"cannot decode {type_!r}")


# Encoders and decoders are built once and reused (msgspec's advice for speed).
json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_history_decoder = msgspec.json.Decoder(HistoryEntry, dec_hook=_dec_hook)
_messages_decoder = msgspec.json.Decoder(list[ChatMessage])
_context_json_decoder = msgspec.json.Decoder(StreamingContext, dec_hook=_dec_hook)
_params_decoder = msgspec.json.Decoder(dict[str, Any])


def text(value: Any) -> str:
    """A Redis reply item as str (clients may or may not decode responses)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    return str(value)


#: Foreign index members already reported (each is logged once per process).
_REPORTED: set[bytes | str] = set()
_log = logging.getLogger("flo_coord.codec")


def index_member(value: Any, limits: Any) -> str | None:
    """A member of a namespace index (a request id), or None for a foreign one.

    A member that is not UTF-8 or not a valid request id cannot name a request: it is
    skipped (and logged once) so one bad member never breaks orphans, the reaper or
    ``top`` for the whole namespace. ``limits``: the flo_coord.store.validation.Limits in force.
    """
    from flo_coord.errors import ValidationError
    from flo_coord.store import validation

    try:
        return validation.request_id(text(value), limits)
    except (UnicodeDecodeError, ValidationError) as exc:
        if value not in _REPORTED and len(_REPORTED) < 10_000:
            _REPORTED.add(value)
            _log.warning("skipping a foreign member of a namespace index %r: %s", value[:80], exc)
        return None


def pairs(flat: list[Any]) -> dict[str, str]:
    """HGETALL's flat [k1, v1, k2, v2, ...] (or a dict, from RESP3 clients) as a dict."""
    if isinstance(flat, dict):
        return {text(k): text(v) for k, v in flat.items()}
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


# Hash field -> StreamingContext attribute, for fields whose names differ.
_RENAMED = {"lease": "lease_deadline", "created": "created_at", "cancel": "cancelled"}
_MS_FIELDS = {"lease", "created"}
_CONTEXT_FIELDS = set(StreamingContext.__struct_fields__)


def decode_context(request_id: str, fields: list[Any] | dict[Any, Any], prefix: Any) -> StreamingContext:
    """Build a StreamingContext from the ctx hash and the committed text."""
    try:
        raw: dict[str, Any] = {}
        for name, value in pairs(fields).items():  # type: ignore[arg-type]
            attr = _RENAMED.get(name, name)
            if attr not in _CONTEXT_FIELDS or attr in ("messages", "failed_backends", "usage", "params"):
                continue
            raw[attr] = int(value) / 1000.0 if name in _MS_FIELDS else value
        raw["generated_prefix"] = text(prefix)
        raw["request_id"] = request_id
        if raw.get("max_tokens") == "":
            del raw["max_tokens"]
        ctx = msgspec.convert(raw, StreamingContext, strict=False)
        extra = pairs(fields)  # type: ignore[arg-type]
        if extra.get("messages"):
            ctx.messages = _messages_decoder.decode(extra["messages"])
        ctx.failed_backends = [b for b in extra.get("failed_backends", "").split(",") if b]
        if extra.get("usage"):
            ctx.usage = msgspec.json.decode(extra["usage"], type=dict[str, int])
        ctx.model_group = ctx.model_group or None  # the start script writes "" for none
        if extra.get("params"):
            ctx.params = _params_decoder.decode(extra["params"])
        return ctx
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, UnicodeDecodeError, IndexError) as exc:
        raise CorruptStateError(request_id, f"context does not decode: {exc}") from None


def decode_outcome(request_id: str, fields: list[Any] | dict[Any, Any]) -> RequestOutcome | None:
    data = pairs(fields)  # type: ignore[arg-type]
    if not data:
        return None
    try:
        raw: dict[str, Any] = {k: v for k, v in data.items() if v != ""}
        raw["request_id"] = request_id
        if "finished" in raw:
            raw["finished_at"] = int(raw.pop("finished")) / 1000.0
        if "usage" in raw:
            raw["usage"] = msgspec.json.decode(raw["usage"])
        return msgspec.convert(raw, RequestOutcome, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise CorruptStateError(request_id, f"outcome does not decode: {exc}") from None


def encode_messages(messages: list[ChatMessage] | None) -> bytes:
    return json_encoder.encode(messages) if messages else b""


def encode_params(params: dict[str, Any] | None) -> bytes:
    """Request parameters as JSON for the ctx hash (b"" for none)."""
    return json_encoder.encode(params) if params else b""


def encode_history(entry: HistoryEntry) -> bytes:
    """The stored form of a history entry, with every credential in it redacted (flo_coord.redact)."""
    return redact_secrets(json_encoder.encode(entry).decode()).encode()


def decode_history(data: Any) -> HistoryEntry | None:
    """One history entry, or None when the entry is foreign or corrupt (it is skipped)."""
    try:
        return _history_decoder.decode(data if isinstance(data, bytes) else text(data).encode())
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return None


def decode_context_json(data: bytes | str) -> StreamingContext:
    """The original's JSON form (five fields or more)."""
    return _context_json_decoder.decode(data)


def attempt_result_counts(entries: list[HistoryEntry]) -> tuple[int, int, int, int]:
    """(attempts, successes, timeouts, takeovers) over history entries."""
    attempts = [e for e in entries if isinstance(e, FailoverAttempt)]
    successes = sum(1 for a in attempts if a.result == FailoverResult.Success)
    timeouts = sum(1 for a in attempts if a.result == FailoverResult.Timeout)
    return len(attempts), successes, timeouts, len(entries) - len(attempts)
