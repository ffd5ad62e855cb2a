"""OpenAI's HTTP shapes: request bodies (decoded and checked with msgspec) and the
response objects and SSE frames the official ``openai`` package parses.

Parameters the gateway cannot honour across a failover are refused with a 400 naming
them (``n`` > 1, ``logprobs``, ``tools``...), never silently dropped; unknown fields too.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from flo_coord.errors import ValidationError
from flo_coord.models import ChatMessage
from flo_coord.store import validation

Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Label = Annotated[str, Meta(min_length=1, max_length=256)]


class InvalidParameterError(ValidationError):
    """A request body the gateway refuses (HTTP 400); ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class TextPart(msgspec.Struct):
    type: str
    text: str | None = None


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: str | list[TextPart] | None = None
    name: str | None = None


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Label
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    stop: Annotated[str, Meta(max_length=256)] | Annotated[list[str], Meta(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    # accepted only with values that change nothing; anything else is refused by name
    n: int | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None


class ChatBody(_Body, kw_only=True):
    messages: list[Message]


class CompletionBody(_Body, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]
    echo: bool = False
    suffix: str | None = None


#: the sampling parameters passed to the backend (and stored with the request)
SAMPLING = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "user")

_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]*)`")


class Parsed(msgspec.Struct, kw_only=True):
    """A checked request: what to generate and how to present it."""

    chat: bool
    model: str
    stream: bool
    include_usage: bool
    prompt: str | None
    messages: list[ChatMessage] | None
    max_tokens: int | None
    params: dict[str, Any]


def parse(raw: bytes, *, chat: bool, limits: validation.Limits) -> Parsed:
    """Decode and check a body; InvalidParameterError (400) for anything refused."""
    try:
        body = msgspec.json.decode(raw, type=ChatBody if chat else CompletionBody)
    except msgspec.ValidationError as exc:
        raise InvalidParameterError(f"invalid request: {exc}", _param(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidParameterError(f"the body is not valid JSON: {exc}") from None
    _refuse_unsupported(body)
    if body.stream_options is not None and not body.stream:
        # as OpenAI does: stream_options shape a stream, so without one they are a mistake
        raise InvalidParameterError("'stream_options' is only allowed when 'stream' is true", "stream_options")
    params: dict[str, Any] = {name: getattr(body, name) for name in SAMPLING if getattr(body, name) is not None}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if include_usage:
        params["stream_options"] = {"include_usage": True}
    max_tokens = body.max_completion_tokens or body.max_tokens

    def parsed(prompt: str | None, messages: list[ChatMessage] | None) -> Parsed:
        return Parsed(
            chat=messages is not None,
            model=body.model,
            stream=body.stream,
            include_usage=include_usage,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            params=params,
        )

    if isinstance(body, ChatBody):
        messages = [ChatMessage(m.role, _content(m, i)) for i, m in enumerate(body.messages)]
        try:
            return parsed(None, validation.messages(messages, limits))
        except ValidationError as exc:
            raise InvalidParameterError(str(exc), "messages") from None
    assert isinstance(body, CompletionBody)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    try:
        validation.prompt(prompt, limits)
    except ValidationError as exc:
        raise InvalidParameterError(str(exc), "prompt") from None
    return parsed(prompt, None)


def _param(error: str) -> str | None:
    """The parameter a msgspec error is about: ``messages[0].role``; an unknown field by its own path."""
    found = _PATH_RE.search(error)
    where = found.group(1) if found else ""
    unknown = _UNKNOWN_RE.search(error)
    if unknown is not None:
        return f"{where}.{unknown.group(1)}" if where else unknown.group(1)
    return where or None


def _refuse_unsupported(body: _Body) -> None:
    why = "it cannot be honoured across a failover"
    if body.n is not None and body.n != 1:
        raise InvalidParameterError(f"n={body.n} is not supported (only n=1): {why}", "n")
    for name in ("logprobs", "top_logprobs", "tools", "functions", "function_call"):
        value = getattr(body, name)
        if value not in (None, False, [], 0):
            raise InvalidParameterError(f"'{name}' is not supported: {why}", name)
    if body.tool_choice not in (None, "none"):
        raise InvalidParameterError(f"'tool_choice' is not supported: {why}", "tool_choice")
    if isinstance(body, CompletionBody) and (body.echo or body.suffix):
        name = "echo" if body.echo else "suffix"
        raise InvalidParameterError(f"'{name}' is not supported by this gateway", name)


def _content(message: Message, index: int) -> str:
    """The text of a message whose role is one of ``validation.CHAT_ROLES`` (the roles the CLI's
    ``--message`` takes; "tool" needs tool calls, which the gateway refuses) and whose content
    is text: a string or text parts (null content is for tool calls too)."""
    try:
        validation.chat_role(f"messages[{index}].role", message.role)
    except ValidationError as exc:
        raise InvalidParameterError(str(exc), f"messages[{index}].role") from None
    if message.content is None:
        raise InvalidParameterError(
            f"messages[{index}].content must be a string or text parts, not null", f"messages[{index}].content"
        )
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            param = f"messages[{index}].content"
            raise InvalidParameterError(f"only text content parts are supported, got {part.type!r}", param)
        parts.append(part.text)
    return "".join(parts)


def body_hash(raw: bytes) -> str:
    """SHA-256 of a (valid JSON) body in canonical form: key order and spacing do not matter."""
    canonical = msgspec.json.encode(msgspec.json.decode(raw), order="sorted")
    return hashlib.sha256(canonical).hexdigest()


# ------------------------------------------------------------------- responses

_encoder = msgspec.json.Encoder()


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(data: Any, event_id: str | None = None) -> bytes:
    """One SSE event (``id:`` first when given); ``data`` is JSON-encoded unless bytes."""
    payload = data if isinstance(data, bytes) else _encoder.encode(data)
    head = f"id: {event_id}\n".encode() if event_id is not None else b""
    return head + b"data: " + payload + b"\n\n"


DONE = b"data: [DONE]\n\n"


class Shaper:
    """Builds the chunks and whole responses of one request (chat or completion)."""

    def __init__(self, request_id: str, obj: str, model: str, created: int) -> None:
        self.request_id = request_id
        self.chat = obj == "chat.completion"
        self.model = model
        self.created = created
        self._templates: dict[bool, tuple[bytes, bytes]] = {}
        self._head = {
            "id": request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": model,
        }

    def _chunk(self, choice: dict[str, Any], usage: Any = None, with_usage: bool = False) -> dict[str, Any]:
        out = {**self._head, "choices": [choice] if choice else []}
        if with_usage:
            out["usage"] = usage
        return out

    def role(self, with_usage: bool) -> dict[str, Any]:
        """The chat stream's first chunk: the assistant role, no text."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return self._chunk(choice, None, with_usage)

    def text_event(self, text: str, with_usage: bool, event_id: str) -> bytes:
        """The SSE event of one text delta, encoded around a prepared template (the hot path)."""
        template = self._templates.get(with_usage)
        if template is None:
            marker = "\x00flo\x00"
            whole = _encoder.encode(self.text(marker, with_usage))
            before, _, after = whole.partition(_encoder.encode(marker))
            template = self._templates[with_usage] = (b"data: " + before, after + b"\n\n")
        return b"".join((b"id: ", event_id.encode(), b"\n", template[0], _encoder.encode(text), template[1]))

    def text(self, text: str, with_usage: bool) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return self._chunk(choice, None, with_usage)

    def finish(self, reason: str, with_usage: bool) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        return self._chunk(choice, None, with_usage)

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._chunk({}, usage, True)

    def whole(self, text: str, reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            obj = "text_completion"
        return {**self._head, "object": obj, "choices": [choice], "usage": usage}


def event_id(request_id: str, offset: int) -> str:
    """The SSE id of the event after which ``offset`` characters of the answer were sent."""
    return f"{request_id}:{offset}"


def parse_event_id(value: str) -> tuple[str, int]:
    """(request id, character offset) of an SSE id; InvalidParameterError when malformed."""
    rid, sep, number = value.strip().rpartition(":")
    if not sep or not rid or not number.isdigit():
        raise InvalidParameterError(f"Last-Event-ID {value[:80]!r} is not <request id>:<offset>", "Last-Event-ID")
    return rid, int(number)
