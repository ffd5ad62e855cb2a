"""Input validation: every public entry point checks its input here before touching Redis."""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from flo_coord import defaults
from flo_coord.errors import ValidationError
from flo_coord.models import ChatMessage

# Request and worker ids may not hold '{' or '}' (they form the Redis Cluster hash tag)
# nor whitespace or control characters (they appear in logs and keys).
_ID_RE = re.compile(r"[A-Za-z0-9_.:@/+=-]+")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]+")


class Limits(msgspec.Struct, kw_only=True, frozen=True):
    """Input limits; the defaults are in ``flo_coord.defaults``."""

    max_request_id_length: int = defaults.MAX_REQUEST_ID_LENGTH
    max_worker_id_length: int = defaults.MAX_WORKER_ID_LENGTH
    max_prompt_bytes: int = defaults.MAX_PROMPT_BYTES
    max_chunk_bytes: int = defaults.MAX_CHUNK_BYTES
    max_messages: int = defaults.MAX_MESSAGES


def _identifier(kind: str, value: Any, max_length: int, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{kind} must be a str, got {type(value).__name__}")
    if not value:
        raise ValidationError(f"{kind} must not be empty")
    if len(value) > max_length:
        raise ValidationError(f"{kind} is {len(value)} characters long; the limit is {max_length}")
    if not pattern.fullmatch(value):
        raise ValidationError(f"{kind} {value!r} may only contain {pattern.pattern[1:-2]}")
    return value


def request_id(value: Any, limits: Limits) -> str:
    return _identifier("request id", value, limits.max_request_id_length, _ID_RE)


def worker_id(value: Any, limits: Limits) -> str:
    return _identifier("worker id", value, limits.max_worker_id_length, _ID_RE)


def namespace(value: Any) -> str:
    return _identifier("namespace", value, defaults.MAX_NAMESPACE_LENGTH, _NAMESPACE_RE)


def text(kind: str, value: Any, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{kind} must be a str, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError(f"{kind} is not valid Unicode text (lone surrogate)") from None
    if size > max_bytes:
        raise ValidationError(f"{kind} is {size} bytes; the limit is {max_bytes}")
    return value


def prompt(value: Any, limits: Limits) -> str:
    return text("prompt", value, limits.max_prompt_bytes)


def chunk(value: Any, limits: Limits) -> str:
    return text("tokens", value, limits.max_chunk_bytes)


def messages(value: Any, limits: Limits) -> list[ChatMessage]:
    if not isinstance(value, list | tuple) or not value:
        raise ValidationError("messages must be a non-empty list of {'role', 'content'} items")
    if len(value) > limits.max_messages:
        raise ValidationError(f"{len(value)} messages; the limit is {limits.max_messages}")
    out = []
    for item in value:
        if isinstance(item, ChatMessage):
            role, content = item.role, item.content
        elif isinstance(item, dict) and set(item) >= {"role", "content"}:
            role, content = item["role"], item["content"]
        else:
            raise ValidationError(f"each message needs 'role' and 'content', got {item!r:.80}")
        out.append(ChatMessage(text("message role", role, 64), text("message content", content, limits.max_prompt_bytes)))
    return out


def positive_seconds(kind: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValidationError(f"{kind} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def seq(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**53:
        raise ValidationError(f"seq must be an integer between 1 and 2**53, got {value!r}")
    return value


def limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 100_000:
        raise ValidationError(f"limit must be an integer between 1 and 100000, got {value!r}")
    return value


def offset(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"offset must be an integer >= 0, got {value!r}")
    return value
