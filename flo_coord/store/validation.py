"""Input validation: every public entry point checks its input here before touching Redis."""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from flo_coord import defaults
from flo_coord.errors import ConfigError, ValidationError
from flo_coord.models import ChatMessage

# Request and worker ids may not hold '{' or '}' (they form the Redis Cluster hash tag)
# nor whitespace or control characters (they appear in logs and keys).
_ID_RE = re.compile(r"[A-Za-z0-9_.:@/+=-]+")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]+")
#: The chat roles accepted from users (the CLI's ``--message``, the gateway): OpenAI's roles
#: that carry plain text ("tool" answers a tool call, which no entry point supports).
CHAT_ROLES = ("system", "developer", "user", "assistant")
#: Largest value of any limit (Redis strings top out at 512 MiB).
_MAX_LIMIT = 512 << 20
#: Largest duration accepted (lease, age, retention): ten years, in seconds.
_MAX_SECONDS = 10 * 365 * 86400.0


class Limits(msgspec.Struct, kw_only=True, frozen=True):
    """Input limits, checked before anything touches Redis (defaults in ``flo_coord.defaults``).

    - request and worker ids: 1..``max_*_length`` characters of ``A-Z a-z 0-9 _ . : @ / + = -``
      (no braces: they would break the Redis Cluster hash tag; no spaces or control chars)
    - namespace: 1..``max_namespace_length`` characters of ``A-Z a-z 0-9 _ . -``
    - prompt (or the chat messages' contents together): at most ``max_prompt_bytes`` of UTF-8
    - one appended chunk, and a failure reason: at most ``max_chunk_bytes`` of UTF-8
    - chat messages: at most ``max_messages``; a role at most 64 bytes
    - backend, model and error-kind labels: at most ``max_label_bytes``
    Text must be valid Unicode (no lone surrogates).
    """

    max_request_id_length: int = defaults.MAX_REQUEST_ID_LENGTH
    max_worker_id_length: int = defaults.MAX_WORKER_ID_LENGTH
    max_namespace_length: int = defaults.MAX_NAMESPACE_LENGTH
    max_prompt_bytes: int = defaults.MAX_PROMPT_BYTES
    max_chunk_bytes: int = defaults.MAX_CHUNK_BYTES
    max_messages: int = defaults.MAX_MESSAGES
    max_label_bytes: int = 256

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_LIMIT:
                raise ConfigError(f"Limits.{name} must be an integer between 1 and {_MAX_LIMIT}, got {value!r}")


def limits(value: Any) -> Limits:
    """``value`` if it is a Limits, the defaults for None; ConfigError otherwise."""
    if value is None:
        return Limits()
    if not isinstance(value, Limits):
        raise ConfigError(f"limits must be a flo_coord.Limits, got {type(value).__name__}")
    return value


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


def namespace(value: Any, limits: Limits | None = None) -> str:
    max_length = limits.max_namespace_length if limits is not None else defaults.MAX_NAMESPACE_LENGTH
    return _identifier("namespace", value, max_length, _NAMESPACE_RE)


def text(kind: str, value: Any, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{kind} must be a str, got {type(value).__name__}")
    if len(value) > max_bytes:  # every character is at least one byte: no need to encode
        raise ValidationError(f"{kind} is more than {max_bytes} bytes long; the limit is {max_bytes}")
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


def label(kind: str, value: Any, limits: Limits) -> str:
    """A short free-form name (backend, model, error kind)."""
    return text(kind, value, limits.max_label_bytes)


def messages(value: Any, limits: Limits) -> list[ChatMessage]:
    if not isinstance(value, list | tuple) or not value:
        raise ValidationError("messages must be a non-empty list of {'role', 'content'} items")
    if len(value) > limits.max_messages:
        raise ValidationError(f"{len(value)} messages; the limit is {limits.max_messages}")
    out = []
    budget = limits.max_prompt_bytes
    for item in value:
        if isinstance(item, ChatMessage):
            role, content = item.role, item.content
        elif isinstance(item, dict) and "role" in item and "content" in item:
            role, content = item["role"], item["content"]
        else:
            raise ValidationError(f"each message needs 'role' and 'content', got a {type(item).__name__}")
        role = text("message role", role, 64)
        content = text("message content", content, budget)
        budget -= len(content.encode("utf-8"))
        out.append(ChatMessage(role, content))
    return out


def positive_seconds(kind: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{kind} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or not 0.001 <= value <= _MAX_SECONDS:
        raise ValidationError(f"{kind} must be between 0.001 and {_MAX_SECONDS:.0f} seconds, got {value!r}")
    return float(value)


def seconds(kind: str, value: Any) -> float:
    """A finite number of seconds >= 0 (0 allowed: "do not wait"); never inf or nan."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{kind} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or not 0 <= value <= _MAX_SECONDS:
        raise ValidationError(f"{kind} must be between 0 and {_MAX_SECONDS:.0f} seconds, got {value!r}")
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


def epoch(value: Any) -> int:
    """A generation token's epoch: an int >= 1 (fencing epochs start at 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"epoch must be an integer >= 1, got {value!r}")
    return value
