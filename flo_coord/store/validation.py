"""Input validation: every public entry point checks its input here before touching Redis.

The rules are the declared types of ``flo_coord.constraints`` (ids, seconds, counts), enforced
by msgspec; the one rule Meta cannot declare, a size in UTF-8 bytes (and so text without lone
surrogates), is ``text``. Every function returns the value (converted: an int given for
seconds becomes a float) or raises ``flo_coord.errors.ValidationError`` (``ConfigError`` for
``Limits``) naming the argument, showing the value and saying what is allowed.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import msgspec

from flo_coord import defaults
from flo_coord.constraints import (
    ID_CHARACTERS,
    NAMESPACE_CHARACTERS,
    FrozenChecked,
    LimitValue,
    NonNegativeInt,
    PageSize,
    PositiveInt,
    PositiveSeconds,
    Seconds,
    Seq,
    Usage,
    check_value,
    identifier,
    shown,
)
from flo_coord.errors import ConfigError, ValidationError
from flo_coord.models import ChatMessage

#: The chat roles accepted from users (the CLI's ``--message``, the gateway): OpenAI's roles
#: that carry plain text ("tool" answers a tool call, which no entry point supports).
CHAT_ROLES = ("system", "developer", "user", "assistant")


class Limits(FrozenChecked, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Input limits, checked before anything touches Redis (defaults in ``flo_coord.defaults``).

    - request and worker ids: 1..``max_*_length`` characters of ``A-Z a-z 0-9 _ . : @ / + = -``
      (no braces: they would break the Redis Cluster hash tag; no spaces or control chars)
    - namespace: 1..``max_namespace_length`` characters of ``A-Z a-z 0-9 _ . -``
    - prompt (or the chat messages' contents together): at most ``max_prompt_bytes`` of UTF-8
    - one appended chunk, and a failure reason: at most ``max_chunk_bytes`` of UTF-8
    - chat messages: at most ``max_messages``; a role at most 64 bytes
    - backend, model and error-kind labels: at most ``max_label_bytes``
    Text must be valid Unicode (no lone surrogates). Every limit is an integer from 1 to
    512 MiB; another value raises ConfigError.
    """

    max_request_id_length: LimitValue = defaults.MAX_REQUEST_ID_LENGTH
    max_worker_id_length: LimitValue = defaults.MAX_WORKER_ID_LENGTH
    max_namespace_length: LimitValue = defaults.MAX_NAMESPACE_LENGTH
    max_prompt_bytes: LimitValue = defaults.MAX_PROMPT_BYTES
    max_chunk_bytes: LimitValue = defaults.MAX_CHUNK_BYTES
    max_messages: LimitValue = defaults.MAX_MESSAGES
    max_label_bytes: LimitValue = defaults.MAX_LABEL_BYTES


_DEFAULT_LIMITS = Limits()


def limits(value: Any) -> Limits:
    """``value`` if it is a Limits, the defaults for None; ConfigError otherwise."""
    if value is None:
        return _DEFAULT_LIMITS
    return check_value("limits", value, Limits, ConfigError)  # type: ignore[no-any-return]


# Ids of live requests and their epochs recur on every append: each distinct value is
# converted once (the caches are keyed on plain values; hashing a type per call would cost more).
@functools.lru_cache(maxsize=1 << 14, typed=True)
def _known_id(kind: str, value: str, max_length: int, characters: str) -> str:
    return check_value(kind, value, identifier(max_length, characters))  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1 << 10, typed=True)
def _known_epoch(value: int) -> int:
    return check_value("epoch", value, PositiveInt)  # type: ignore[no-any-return]


def _identifier(kind: str, value: Any, max_length: int, characters: str = ID_CHARACTERS) -> str:
    try:
        return _known_id(kind, value, max_length, characters)
    except TypeError:  # unhashable, so certainly not a str: let the declared type say why
        return check_value(kind, value, identifier(max_length, characters))  # type: ignore[no-any-return]


def request_id(value: Any, limits: Limits) -> str:
    """A request id (str, 1..``limits.max_request_id_length`` of ID_CHARACTERS); ValidationError otherwise."""
    return _identifier("request id", value, limits.max_request_id_length)


def worker_id(value: Any, limits: Limits) -> str:
    """A worker id (str, 1..``limits.max_worker_id_length`` of ID_CHARACTERS); ValidationError otherwise."""
    return _identifier("worker id", value, limits.max_worker_id_length)


def namespace(value: Any, limits: Limits | None = None) -> str:
    """A namespace (str, 1..``max_namespace_length`` of NAMESPACE_CHARACTERS); ValidationError otherwise."""
    max_length = limits.max_namespace_length if limits is not None else defaults.MAX_NAMESPACE_LENGTH
    return _identifier("namespace", value, max_length, NAMESPACE_CHARACTERS)


def text(kind: str, value: Any, max_bytes: int) -> str:
    """``value`` if it is a str of at most ``max_bytes`` UTF-8 bytes without lone surrogates
    (what Redis can store); ValidationError naming ``kind`` otherwise. The one rule Meta cannot
    declare (its ``max_length`` counts characters), so it stays code."""
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
    """A prompt: text of at most ``limits.max_prompt_bytes`` UTF-8 bytes; ValidationError otherwise."""
    return text("prompt", value, limits.max_prompt_bytes)


def chunk(value: Any, limits: Limits) -> str:
    """One appended chunk: text of at most ``limits.max_chunk_bytes`` UTF-8 bytes; ValidationError otherwise."""
    return text("tokens", value, limits.max_chunk_bytes)


def label(kind: str, value: Any, limits: Limits) -> str:
    """A short free-form name (backend, model, error kind): at most ``limits.max_label_bytes`` UTF-8 bytes."""
    return text(kind, value, limits.max_label_bytes)


@functools.lru_cache(maxsize=16)
def _message_list(max_messages: int) -> Any:
    return Annotated[
        list[ChatMessage],
        msgspec.Meta(
            min_length=1,
            max_length=max_messages,
            description=f"a list of 1 to {max_messages} {{'role', 'content'}} items",
        ),
    ]


def messages(value: Any, limits: Limits) -> list[ChatMessage]:
    """Chat messages: a list (or tuple) of ChatMessage or ``{"role", "content"}`` dicts, 1 to
    ``limits.max_messages`` of them, each role at most 64 UTF-8 bytes, the contents together at
    most ``limits.max_prompt_bytes``. Returns ChatMessages; ValidationError otherwise."""
    items: list[ChatMessage] = check_value("messages", value, _message_list(limits.max_messages))
    budget = limits.max_prompt_bytes
    for item in items:
        text("message role", item.role, defaults.MAX_ROLE_BYTES)
        budget -= len(text("message content", item.content, budget).encode("utf-8"))
    return items


def chat_role(where: str, role: Any) -> str:
    """``role`` if it is one of CHAT_ROLES, the roles every entry point accepts (the CLI's
    ``--message``, the gateway, ``Coordinator.stream``, ``submit``); ValidationError naming
    ``where`` (e.g. ``messages[0].role``) otherwise."""
    if role not in CHAT_ROLES:
        roles = ", ".join(repr(r) for r in CHAT_ROLES)
        raise ValidationError(f"{where} {shown(role)} is not one of {roles}")
    return role  # type: ignore[no-any-return]


def chat_messages(value: Any, limits: Limits) -> list[ChatMessage]:
    """``messages`` whose every role is one of CHAT_ROLES: what a client may send (the store
    itself keeps any short role). Returns ChatMessages; ValidationError otherwise."""
    items = messages(value, limits)
    for index, item in enumerate(items):
        chat_role(f"messages[{index}].role", item.role)
    return items


def positive_seconds(kind: str, value: Any) -> float:
    """Seconds from 0.001 to ten years, as a float (PositiveSeconds); ValidationError otherwise."""
    return check_value(kind, value, PositiveSeconds)  # type: ignore[no-any-return]


def seconds(kind: str, value: Any) -> float:
    """Seconds from 0 ("do not wait") to ten years, as a float (Seconds); never inf or nan."""
    return check_value(kind, value, Seconds)  # type: ignore[no-any-return]


def seq(value: Any) -> int | None:
    """None, or an append sequence number from 1 to 2**53 - 1 (Seq); ValidationError otherwise."""
    return None if value is None else check_value("seq", value, Seq)  # type: ignore[no-any-return]


def usage(value: Any) -> dict[str, int] | None:
    """None, or token counts (Usage: at most 32 names of 1 to 64 characters, each an integer
    from 0 to 2**53 - 1) as ``{"prompt_tokens": 12, ...}``; ValidationError otherwise."""
    return None if value is None else check_value("usage", value, Usage)  # type: ignore[no-any-return]


def limit(value: Any) -> int:
    """How many entries to list: 1 to 100000 (PageSize); ValidationError otherwise."""
    return check_value("limit", value, PageSize)  # type: ignore[no-any-return]


def offset(value: Any) -> int:
    """Where a listing starts: an integer >= 0; ValidationError otherwise."""
    return check_value("offset", value, NonNegativeInt)  # type: ignore[no-any-return]


def epoch(value: Any) -> int:
    """A generation token's epoch: an integer >= 1 (fencing epochs start at 1)."""
    try:
        return _known_epoch(value)
    except TypeError:  # unhashable, so certainly not an int: let the declared type say why
        return check_value("epoch", value, PositiveInt)  # type: ignore[no-any-return]
