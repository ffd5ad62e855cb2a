"""Structured logs: one line per record, ``key=value`` (default) or JSON.

Every line that concerns a request carries ``request_id``, ``worker_id`` and ``epoch``.
They come, highest first, from the record's ``extra`` (``log.info(..., extra={...})``
or a ``LoggerAdapter`` from :func:`request_logger`), from fields bound to the current
context with :func:`bound` (the Coordinator binds them around each request it runs, so
its asyncio task logs them on every line), and from process-wide fields given to
:func:`configure` (a worker process sets its ``worker_id`` there).

Standard library only: the executor imports this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from flo_coord.redact import redact_secrets

__all__ = ["FORMATS", "JsonFormatter", "KeyValueFormatter", "bound", "configure", "request_logger"]

#: The fields every request line carries, in the order they are printed.
REQUEST_FIELDS = ("worker_id", "request_id", "epoch")
FORMATS = ("kv", "json")

_bound: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("flo_coord_log_fields", default=None)
_process_fields: dict[str, Any] = {}
# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged in this context (this asyncio task, this thread)."""
    token = _bound.set({**(_bound.get() or {}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _bound.reset(token)


def request_logger(logger: logging.Logger, request_id: str, epoch: int | None = None) -> logging.LoggerAdapter[Any]:
    """A logger whose every line names ``request_id`` (and ``epoch``)."""
    extra: dict[str, Any] = {"request_id": request_id}
    if epoch is not None:
        extra["epoch"] = epoch
    return logging.LoggerAdapter(logger, extra)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of one record: process fields < bound fields < the record's extras."""
    fields: dict[str, Any] = dict(_process_fields)
    fields.update(_bound.get() or {})
    fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
    return fields


class _StampFields(logging.Filter):
    """Copy the context's fields onto the record while still in the logging call's context."""

    def filter(self, record: logging.LogRecord) -> bool:
        record._flo_fields = record_fields(record)  # type: ignore[attr-defined]
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return getattr(record, "_flo_fields", None) or record_fields(record)


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _ordered(fields: Mapping[str, Any]) -> list[tuple[str, Any]]:
    first = [(k, fields[k]) for k in REQUEST_FIELDS if fields.get(k) is not None]
    return first + sorted((k, v) for k, v in fields.items() if k not in REQUEST_FIELDS and v is not None)


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=flo_coord.worker worker_id=w1 request_id=r1 epoch=2 msg="..."``."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = [("ts", _timestamp(record)), ("level", record.levelname.lower()), ("logger", record.name)]
        pairs += _ordered(_fields(record))
        pairs.append(("msg", record.getMessage()))
        if record.exc_info:
            pairs.append(("exc", self.formatException(record.exc_info)))
        # Secrets never reach a log line, whatever field or message carries them.
        return redact_secrets(" ".join(f"{k}={_kv_value(v)}" for k, v in pairs))


def _kv_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, the request fields, msg (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name}
        obj.update(_ordered(_fields(record)))
        obj["msg"] = record.getMessage()
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return redact_secrets(json.dumps(obj, default=str, ensure_ascii=False))


def configure(
    fmt: str = "kv",
    level: str | int = "INFO",
    *,
    stream: TextIO | None = None,
    **process_fields: Any,
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as structured lines; returns the handler.

    ``process_fields`` (e.g. ``worker_id=...``) appear on every line of this process.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _process_fields.clear()
    _process_fields.update({k: v for k, v in process_fields.items() if v is not None})
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_StampFields())
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # httpx logs every request at INFO: too chatty next to a streaming worker's own lines
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpcore").setLevel(max(logging.WARNING, root.level))
    return handler
