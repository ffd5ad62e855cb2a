"""A deterministic fake LLM server (stdlib asyncio only) for tests and demos.

Speaks OpenAI's /v1/completions and /v1/chat/completions (SSE), Ollama's /api/generate
and /api/chat (NDJSON) and Anthropic's /v1/messages (SSE events message_start ...
message_stop; ``system`` is rendered as a leading system message; a prefill ending in
whitespace is refused with 400, as the real API does; ``inband`` errors are always
Anthropic's ``event: error``). The answer to a prompt is a fixed function of it, and a prompt that
ends with a prefix of its own answer is continued from there, so a client that fails over
mid-stream can check it got exactly the rest. Faults (resets, 5xx, 429, cuts, stalls,
garbage, 4xx kinds) are set per model at start-up, at runtime via ``POST /_faults``, or per
request with the ``X-Fake-Fault`` header. Every request is recorded at ``GET /_requests``
(credentials never: an ``Authorization`` header is kept only as its SHA-256,
``authorization_sha256``). It listens on 127.0.0.1 unless told otherwise.

Fault syntax: ``kind[:args][*times]``; without ``*times`` a fault hits every request, except
``http5xx:N`` (the first N requests) and ``rate429`` (the first request).

    refuse                reset the connection before any response byte
    http5xx[:N[:STATUS]]  STATUS (default 503) for the first N requests (every request without N)
    rate429[:SECONDS]     429, with ``Retry-After: SECONDS`` when given
    cut:K                 K tokens, then a clean close with no terminator
    die_after:K           K tokens, then a hard reset (RST)
    stall:K:SECONDS       K tokens, then silence for SECONDS, then the rest
    slow_first:SECONDS    headers at once, first token after SECONDS
    malformed:K           K tokens, a garbage ``data: {not json`` line (Ollama: ``{not json``), then the rest
    stream_error:K        K tokens, then an in-stream error object and close
    no_done               the whole answer and finish_reason, but no ``[DONE]`` (no-op for Ollama)
    context_length        400 ``context_length_exceeded``
    content_policy        400 ``content_policy_violation`` with a reason
    reject_prefill        400 when the last chat message is from the assistant
    finish:REASON[:K]     K tokens (default: all), then finish_reason REASON (Ollama: done_reason) and [DONE]
    inband:DIALECT[:K[:KIND]]  K tokens (default 0), then an in-band error, then close. DIALECT: event
                          (``event: error``), field (llama.cpp ``error:`` line then ``data: [DONE]``),
                          data (``data: {"error": ...}``), anthropic (``{"type": "error", ...}``),
                          ollama (an ``{"error": "..."}`` line; Ollama always uses it). KIND: server
                          (default), overloaded, rate_limit, context_length
    echo_key              1 token, then an in-band error object quoting the request's Authorization
    pings                 keep-alives of every usual shape before each token (comment, ``event: ping``,
                          ``data: {"type": "ping"}``, ``data: ping``; Ollama: blank lines)
    empty_frames          an empty ``data:`` frame before each token (Ollama: blank lines)
    bom                   a UTF-8 byte-order mark before the first byte of the body
    reasoning:N[:SECONDS]  N reasoning deltas (``reasoning_content``; Ollama ``thinking``), SECONDS apart,
                          before the answer
    tool_calls            only tool-call deltas, then finish_reason ``tool_calls``
    one_line              the whole rest of the answer in one delta (one line; with --tokens large it
                          exceeds the 64 KiB append limit)
    finish_reset          the whole answer and its finish_reason, then a hard reset before ``[DONE]``
    needs_continue        a chat prefill without ``continue_final_message: true`` starts a new turn
                          (the answer restarts, as vLLM/TGI/SGLang do), with it the prefix is continued

Run: ``python -m flo_coord.testing.fakellm --port 8001 --fault model=cut:5 --token-delay 0.05``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http
import json
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flo_coord.models import ChatMessage
from flo_coord.store import render_messages as core_render_messages

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TOKENS",
    "HEAD_TOKEN",
    "FakeLLMServer",
    "FakeLLMServerThread",
    "Fault",
    "full_answer",
    "full_answer_text",
    "main",
    "parse_fault",
    "render_messages",
    "serve",
    "split_continuation",
]

HEAD_TOKEN = "<|answer|>"  # starts every answer; distinctive so prompts never look like continuations
DEFAULT_TOKENS = 48
DEFAULT_MODEL = "fake"
_VOCAB = (  # noqa: SIM905 - a word list reads best as one string
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud ember lattice "
    "quorum epoch lease fence token stream replica shard café naïve Zürich 東京 señor"
).split()
_MAX_BODY = 16 * 1024 * 1024

# --------------------------------------------------------------------------- answers


def full_answer(prompt: str, n_tokens: int = DEFAULT_TOKENS) -> list[str]:
    """The answer tokens for ``prompt``: HEAD_TOKEN then words with a leading space."""
    rng = random.Random(int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest(), "big"))
    return [HEAD_TOKEN] + [" " + rng.choice(_VOCAB) for _ in range(max(0, n_tokens - 1))]


def full_answer_text(prompt: str, n_tokens: int = DEFAULT_TOKENS) -> str:
    return "".join(full_answer(prompt, n_tokens))


def render_messages(messages: Iterable[Any]) -> str:
    """The chat "prompt": flo_coord's own rendering (``core.render_messages``) of request bodies."""
    return core_render_messages([ChatMessage(_field(m, "role"), _field(m, "content")) for m in messages])


def _field(message: Any, name: str) -> str:
    value = message.get(name, "") if isinstance(message, Mapping) else getattr(message, name, "")
    if isinstance(value, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in value if isinstance(p, Mapping))
    return str(value)


def split_continuation(text: str, n_tokens: int = DEFAULT_TOKENS) -> tuple[str, str]:
    """(original prompt, already generated prefix) of a completions prompt; prefix "" if fresh.

    The prefix must hold the whole head token (any split after it works): a prompt merely
    ending in "<" must not pass for a continuation. Chat prefill has no such limit.
    """
    at = text.rfind(HEAD_TOKEN)
    while at >= 0:
        head, tail = text[:at], text[at:]
        if full_answer_text(head, n_tokens).startswith(tail):
            return head, tail
        at = text.rfind(HEAD_TOKEN, 0, at)
    return text, ""


def _chat_split(messages: Sequence[Any], n_tokens: int) -> tuple[str, str]:
    """A final assistant message that begins the answer is a prefill to continue."""
    if messages and _field(messages[-1], "role") == "assistant":
        base = render_messages(messages[:-1])
        prefix = _field(messages[-1], "content")
        if full_answer_text(base, n_tokens).startswith(prefix):
            return base, prefix
    return render_messages(messages), ""


def _remaining(base: str, prefix: str, n_tokens: int, max_tokens: int | None) -> tuple[list[str], str]:
    """The chunks still to send after ``prefix`` (split at token boundaries) and the finish reason."""
    chunks: list[str] = []
    at = 0
    for token in full_answer(base, n_tokens):
        end = at + len(token)
        if end > len(prefix):
            chunks.append(token[max(0, len(prefix) - at) :])
        at = end
    if max_tokens is not None and len(chunks) > max_tokens:
        return chunks[:max_tokens], "length"
    return chunks, "stop"


# ---------------------------------------------------------------------------- faults

_COUNTED = {"http5xx"}
_ONCE_BY_DEFAULT = {"rate429"}
_POSITIONAL = {"cut", "die_after", "stall", "malformed", "stream_error", "finish", "inband", "echo_key"}
_PLAIN = {
    "refuse",
    "no_done",
    "context_length",
    "content_policy",
    "reject_prefill",
    "pings",
    "empty_frames",
    "bom",
    "tool_calls",
    "one_line",
    "finish_reset",
    "needs_continue",
}
_DIALECTS = ("event", "field", "data", "anthropic", "ollama")
_INBAND_KINDS = ("server", "overloaded", "rate_limit", "context_length")
#: every fault kind (listed in the error for a bad spec)
KINDS = tuple(sorted(_PLAIN | _POSITIONAL | {"http5xx", "rate429", "slow_first", "reasoning"}))


@dataclass(frozen=True)
class Fault:
    """A parsed fault spec. ``tokens``: K of the positional kinds; ``times``: None = every request."""

    kind: str
    spec: str
    tokens: int | None = None
    seconds: float | None = None
    status: int = 503
    times: int | None = None
    arg: str | None = None  #: finish's REASON, inband's DIALECT
    arg2: str | None = None  #: inband's KIND


def parse_fault(spec: str) -> Fault:
    """Parse ``kind[:args][*times]`` (see the module doc); ValueError when invalid."""
    body, star, times_text = spec.strip().partition("*")
    kind, *args = body.split(":")
    times = _int(times_text, spec) if star else None
    if kind in _PLAIN and not args:
        return Fault(kind, spec, times=times)
    if kind == "echo_key" and not args:
        return Fault(kind, spec, tokens=1, times=times)
    if kind == "finish" and 1 <= len(args) <= 2 and args[0]:
        return Fault(kind, spec, tokens=_int(args[1], spec) if len(args) == 2 else None, times=times, arg=args[0])
    if kind == "inband" and 1 <= len(args) <= 3 and args[0] in _DIALECTS:
        inband_kind = args[2] if len(args) == 3 else "server"
        if inband_kind not in _INBAND_KINDS:
            raise ValueError(f"bad fault {spec!r}: KIND must be one of {', '.join(_INBAND_KINDS)}")
        tokens = _int(args[1], spec) if len(args) >= 2 else 0
        return Fault(kind, spec, tokens=tokens, times=times, arg=args[0], arg2=inband_kind)
    if kind == "reasoning" and 1 <= len(args) <= 2:
        delay = _seconds(args[1], spec) if len(args) == 2 else 0.0
        return Fault(kind, spec, tokens=_int(args[0], spec), seconds=delay, times=times)
    if kind in _POSITIONAL and kind != "stall" and len(args) == 1:
        return Fault(kind, spec, tokens=_int(args[0], spec), times=times)
    if kind == "stall" and len(args) == 2:
        return Fault(kind, spec, tokens=_int(args[0], spec), seconds=_seconds(args[1], spec), times=times)
    if kind == "slow_first" and len(args) == 1:
        return Fault(kind, spec, seconds=_seconds(args[0], spec), times=times)
    if kind == "rate429" and len(args) <= 1:
        seconds = _seconds(args[0], spec) if args else None
        return Fault(kind, spec, seconds=seconds, times=1 if times is None else times)
    if kind == "http5xx" and len(args) <= 2 and not star:
        count = _int(args[0], spec) if args else None
        status = _int(args[1], spec) if len(args) == 2 else 503
        if not 500 <= status <= 599:
            raise ValueError(f"bad fault {spec!r}: status must be 5xx")
        return Fault(kind, spec, status=status, times=count)
    raise ValueError(f"bad fault {spec!r}: expected kind[:args][*times] with kind one of {', '.join(KINDS)}")


def _int(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad fault {spec!r}: {text!r} is not a count")
    return int(text)


def _seconds(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad fault {spec!r}: {text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise ValueError(f"bad fault {spec!r}: seconds must be >= 0")
    return value


@dataclass
class _FaultState:
    fault: Fault
    remaining: int | None


# ------------------------------------------------------------------------------ HTTP


class _BadRequestError(Exception):
    """A request the fake cannot parse; answered with 400."""


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequestError("incomplete request head") from None
        return None  # client connected and left
    except asyncio.LimitOverrunError:
        raise _BadRequestError("request head too large") from None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise _BadRequestError("bad request line")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise _BadRequestError("chunked request bodies are not supported")
    length = headers.get("content-length", "0")
    if not length.isdigit() or int(length) > _MAX_BODY:
        raise _BadRequestError("bad content-length")
    body = await reader.readexactly(int(length)) if int(length) else b""
    return _Request(parts[0].upper(), parts[1].split("?", 1)[0], headers, body)


class _Conn:
    """One client connection. Responses are close-delimited (``Connection: close``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._gone: asyncio.Task[None] | None = None

    def watch(self) -> None:
        """Start noticing a hang-up; only once the request is read (one reader at a time)."""
        self._gone = asyncio.get_running_loop().create_task(self._watch(self.reader))

    @staticmethod
    async def _watch(reader: asyncio.StreamReader) -> None:
        # the client sends nothing after its request, so EOF here means it hung up
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass

    @property
    def disconnected(self) -> bool:
        return self._gone is not None and self._gone.done()

    async def send_head(self, status: int, headers: Mapping[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        await self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def send_json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        head = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
        await self.send_head(status, head)
        await self.write(body)

    async def write(self, data: bytes) -> None:
        if self.disconnected:
            raise ConnectionResetError("client disconnected")
        self.writer.write(data)
        await self.writer.drain()

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake early (raising) when the client hangs up meanwhile."""
        if seconds > 0 and self._gone is not None:
            await asyncio.wait([self._gone], timeout=seconds)
        elif seconds > 0:
            await asyncio.sleep(seconds)
        if self.disconnected:
            raise ConnectionResetError("client disconnected")

    def reset(self) -> None:
        """Hard close: SO_LINGER 0 makes the kernel send RST instead of FIN."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        if self._gone is not None:
            self._gone.cancel()
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


# ----------------------------------------------------------------------- wire formats


class _Wire:
    """How one API frames a stream: OpenAI SSE (completions/chat) or Ollama NDJSON (generate/chat)."""

    content_type = "text/event-stream"

    def __init__(self, model: str, chat: bool, include_usage: bool) -> None:
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.id = f"fake-{random.getrandbits(48):012x}"
        self.created = int(time.time())
        self.prompt_words = 0  # words of the rendered prompt (the Anthropic dialect reports them first)

    def _frame(self, obj: Any) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    def preamble(self) -> bytes:
        # a comment line exercises the client's SSE comment handling; chat opens with a role-only delta
        start = b": fakellm\n\n"
        return start + (self._frame(self._chunk({"role": "assistant", "content": ""}, None)) if self.chat else b"")

    def _chunk(self, delta: dict[str, str] | str, finish: str | None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        choice.update({"delta": delta} if self.chat else {"text": delta, "logprobs": None})
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def token(self, text: str) -> bytes:
        return self._frame(self._chunk({"content": text} if self.chat else text, None))

    def finish(self, reason: str, usage: dict[str, int], done: bool) -> bytes:
        out = self._frame(self._chunk({} if self.chat else "", reason))
        if self.include_usage:
            out += self._frame({"id": self.id, "object": "chunk", "model": self.model, "choices": [], "usage": usage})
        return out + (b"data: [DONE]\n\n" if done else b"")

    def garbage(self) -> bytes:
        return b"data: {not json\n\n"

    def error(self, message: str) -> bytes:
        return self._frame({"error": {"message": message, "type": "server_error", "code": 500}})

    def finish_only(self, reason: str) -> bytes:
        """The finish_reason chunk alone: no usage chunk, no [DONE]."""
        return self._frame(self._chunk({} if self.chat else "", reason))

    def pings(self) -> bytes:
        return b': ping\n\nevent: ping\ndata: {}\n\ndata: {"type": "ping"}\n\ndata: ping\n\n'

    def empty_frame(self) -> bytes:
        return b"data:\n\n"

    def reasoning(self, text: str) -> bytes:
        return self._frame(self._chunk({"reasoning_content": text}, None)) if self.chat else b": thinking\n\n"

    def tool_call(self) -> bytes:
        call = {"index": 0, "id": "call_fake", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        return self._frame(self._chunk({"tool_calls": [call]}, None))  # type: ignore[dict-item]

    def inband(self, dialect: str, kind: str, message: str | None = None) -> bytes:
        """An in-band error in ``dialect`` (see the module doc), of ``kind``."""
        text, kind_type, code = _INBAND[kind]
        text = message or text
        error = {"message": text, "type": kind_type, "code": code}
        if dialect == "event":
            return b"event: error\n" + self._frame({"error": error})
        if dialect == "field":  # llama.cpp: the error in a field of its own, then [DONE]
            return b"error: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"
        if dialect == "anthropic":
            return self._frame({"type": "error", "error": {"type": _ANTHROPIC_TYPES[kind], "message": text}})
        if dialect == "ollama":
            return self._frame({"error": text})
        return self._frame({"error": error})

    def whole(self, text: str, reason: str, usage: dict[str, int]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {"id": self.id, "object": "completion", "model": self.model, "choices": [choice], "usage": usage}

    def error_body(self, message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _OllamaWire(_Wire):
    content_type = "application/x-ndjson"

    def _line(self, obj: dict[str, Any]) -> bytes:
        return json.dumps({"model": self.model, "created_at": _now_iso(), **obj}).encode() + b"\n"

    def _text(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}} if self.chat else {"response": text}

    def preamble(self) -> bytes:
        return b""

    def token(self, text: str) -> bytes:
        return self._line({**self._text(text), "done": False})

    def finish(self, reason: str, usage: dict[str, int], done: bool) -> bytes:
        return self._line(self.whole("", reason, usage))

    def garbage(self) -> bytes:
        return b"{not json\n"

    def error(self, message: str) -> bytes:
        return self._line({"error": message})

    def finish_only(self, reason: str) -> bytes:
        return self.finish(reason, {"prompt_tokens": 0, "completion_tokens": 0}, True)

    def pings(self) -> bytes:
        return b"\n\n"

    def empty_frame(self) -> bytes:
        return b"\n"

    def reasoning(self, text: str) -> bytes:
        return self._line(
            {"message": {"role": "assistant", "content": "", "thinking": text}, "done": False}
            if self.chat
            else {"response": "", "thinking": text, "done": False}
        )

    def tool_call(self) -> bytes:
        call = {"function": {"name": "lookup", "arguments": {}}}
        return self._line({"message": {"role": "assistant", "content": "", "tool_calls": [call]}, "done": False})

    def inband(self, dialect: str, kind: str, message: str | None = None) -> bytes:
        return self._line({"error": message or _INBAND[kind][0]})

    def whole(self, text: str, reason: str, usage: dict[str, int]) -> dict[str, Any]:
        counts = {"prompt_eval_count": usage["prompt_tokens"], "eval_count": usage["completion_tokens"]}
        return {"model": self.model, **self._text(text), "done": True, "done_reason": reason, **counts}

    def error_body(self, message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
        return {"error": message}


class _AnthropicWire(_Wire):
    """Anthropic's Messages API stream: named SSE events from message_start to message_stop."""

    _STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}

    def _event(self, name: str, obj: dict[str, Any]) -> bytes:
        return f"event: {name}\n".encode() + self._frame({"type": name, **obj})

    def preamble(self) -> bytes:
        message: dict[str, Any] = {
            "id": f"msg_{self.id}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_words, "output_tokens": 1},
        }
        block = {"index": 0, "content_block": {"type": "text", "text": ""}}
        return self._event("message_start", {"message": message}) + self._event("content_block_start", block)

    def token(self, text: str) -> bytes:
        return self._event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})

    def finish(self, reason: str, usage: dict[str, int], done: bool) -> bytes:
        out = self._event("content_block_stop", {"index": 0}) + self.finish_only(reason, usage)
        return out + (self._event("message_stop", {}) if done else b"")

    def garbage(self) -> bytes:
        return b"event: content_block_delta\ndata: {not json\n\n"

    def error(self, message: str) -> bytes:
        return self.inband("anthropic", "server", message)

    def finish_only(self, reason: str, usage: dict[str, int] | None = None) -> bytes:
        delta = {"stop_reason": self._STOP.get(reason, reason), "stop_sequence": None}
        out_tokens = {"output_tokens": usage["completion_tokens"] if usage else 0}
        return self._event("message_delta", {"delta": delta, "usage": out_tokens})

    def pings(self) -> bytes:
        return self._event("ping", {})

    def reasoning(self, text: str) -> bytes:
        return self._event("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta", "thinking": text}})

    def tool_call(self) -> bytes:
        start = {"index": 1, "content_block": {"type": "tool_use", "id": "toolu_fake", "name": "lookup", "input": {}}}
        delta = {"index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}}
        return self._event("content_block_start", start) + self._event("content_block_delta", delta)

    def inband(self, dialect: str, kind: str, message: str | None = None) -> bytes:
        """Always Anthropic's own: ``event: error`` with ``{"type": "error", "error": {...}}``."""
        error = {"type": _ANTHROPIC_TYPES[kind], "message": message or _INBAND[kind][0]}
        return self._event("error", {"error": error})

    def whole(self, text: str, reason: str, usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": f"msg_{self.id}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": self._STOP.get(reason, reason),
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]},
        }

    def error_body(self, message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
        kind = "overloaded_error" if code == "service_unavailable" else kind
        kind = "rate_limit_error" if code == "rate_limit_exceeded" else kind
        return {"type": "error", "error": {"type": kind, "message": message}}


_WIRES: dict[str, type[_Wire]] = {"ollama": _OllamaWire, "anthropic": _AnthropicWire}


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


#: in-band error kinds: (message, type, code)
_INBAND: dict[str, tuple[str, str, str | None]] = {
    "server": ("fake internal error while generating", "server_error", None),
    "overloaded": ("the fake server is overloaded", "overloaded_error", None),
    "rate_limit": ("Rate limit reached (fake)", "requests", "rate_limit_exceeded"),
    "context_length": (
        "This model's maximum context length is 4096 tokens (fake)",
        "invalid_request_error",
        "context_length_exceeded",
    ),
}
_ANTHROPIC_TYPES = {
    "server": "api_error",
    "overloaded": "overloaded_error",
    "rate_limit": "rate_limit_error",
    "context_length": "invalid_request_error",
}

_ERRORS = {
    "context_length": (
        400,
        "This model's maximum context length is 4096 tokens. However, your request exceeds it (fake).",
        "context_length_exceeded",
    ),
    "content_policy": (
        400,
        "Your request was rejected by the fake content policy: the prompt asks for forbidden content.",
        "content_policy_violation",
    ),
    "reject_prefill": (
        400,
        "assistant prefill is not supported: the final message must be from the user (fake)",
        "prefill_not_supported",
    ),
}

# ---------------------------------------------------------------------------- server


@dataclass
class _Generation:
    """One parsed generation request, before faults and planning."""

    api: str
    model: str
    chat: bool
    prompt: str | None
    messages: list[Any] | None
    stream: bool
    max_tokens: int | None
    include_usage: bool
    body: dict[str, Any] = field(default_factory=dict)
    authorization: str | None = None  # only for the echo_key fault; never logged
    entry: dict[str, Any] = field(default_factory=dict)


_ROUTES = {
    "/v1/completions": ("openai", False),
    "/completions": ("openai", False),
    "/v1/chat/completions": ("openai", True),
    "/chat/completions": ("openai", True),
    "/api/generate": ("ollama", False),
    "/api/chat": ("ollama", True),
    "/v1/messages": ("anthropic", True),
}


class FakeLLMServer:
    """The fake server on the current event loop. ``faults`` maps a model (or "*") to a fault spec."""

    def __init__(
        self,
        *,
        faults: Mapping[str, str] | None = None,
        token_delay: float = 0.0,
        model_delays: Mapping[str, float] | None = None,
        n_tokens: int = DEFAULT_TOKENS,
    ) -> None:
        self.token_delay = token_delay
        self.model_delays: dict[str, float] = dict(model_delays or {})
        self.n_tokens = n_tokens
        self._faults: dict[str, _FaultState] = {}
        self._requests: list[dict[str, Any]] = []
        self._models: set[str] = {DEFAULT_MODEL}
        for model, spec in (faults or {}).items():
            self.set_fault(model, spec)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0
        self.host = "127.0.0.1"

    # -------------------------------------------------------------- control

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Copies of the request log entries, oldest first."""
        return [dict(entry) for entry in self._requests]

    def clear_requests(self) -> None:
        self._requests.clear()

    def set_fault(self, model: str, fault: str | None) -> None:
        """Set (or with None clear) the fault of ``model``; "*" applies to models without their own."""
        if fault is None:
            self._faults.pop(model, None)
            return
        parsed = parse_fault(fault)
        self._faults[model] = _FaultState(parsed, parsed.times)
        self._models.add(model)

    def clear_faults(self) -> None:
        self._faults.clear()

    def set_token_delay(self, seconds: float, model: str | None = None) -> None:
        if model is None:
            self.token_delay = seconds
        else:
            self.model_delays[model] = seconds

    def expected_answer(self, prompt: str) -> str:
        return full_answer_text(prompt, self.n_tokens)

    # ------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # a deep backlog: hundreds of streams may connect at once (the capacity tests)
        self._server = await asyncio.start_server(self._on_connect, host, port, backlog=1024)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()  # a stalled stream must not hold up shutdown
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> FakeLLMServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -------------------------------------------------------------- routing

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Conn(reader, writer)
        try:
            request = await _read_request(reader)
            if request is not None:
                conn.watch()
                await self._route(conn, request)
        except _BadRequestError as exc:
            with contextlib.suppress(ConnectionError):
                await conn.send_json(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # only stop() cancels these tasks; re-raising would make asyncio's stream callback log it
            pass
        finally:
            await conn.close()
            self._tasks.discard(task)

    async def _route(self, conn: _Conn, request: _Request) -> None:
        if request.method == "POST" and request.path in _ROUTES:
            api, chat = _ROUTES[request.path]
            await self._generate(conn, request, api, chat)
            return
        handler = self._admin.get((request.method, request.path))
        if handler is None:
            await conn.send_json(404, {"error": {"message": f"no route {request.method} {request.path}"}})
            return
        status, body = handler(request)
        await conn.send_json(status, body)

    @property
    def _admin(self) -> dict[tuple[str, str], Callable[[_Request], tuple[int, Any]]]:
        return {
            ("GET", "/health"): lambda _: (200, {"status": "ok"}),
            ("GET", "/v1/models"): self._get_models,
            ("GET", "/models"): self._get_models,
            ("GET", "/api/tags"): lambda _: (200, {"models": [{"name": m, "model": m} for m in sorted(self._models)]}),
            ("GET", "/_requests"): lambda _: (200, self.requests),
            ("DELETE", "/_requests"): self._delete_requests,
            ("GET", "/_faults"): lambda _: (200, {m: s.fault.spec for m, s in self._faults.items()}),
            ("POST", "/_faults"): self._post_fault,
            ("DELETE", "/_faults"): self._delete_faults,
        }

    def _get_models(self, _: _Request) -> tuple[int, Any]:
        return 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in sorted(self._models)]}

    def _delete_requests(self, _: _Request) -> tuple[int, Any]:
        self.clear_requests()
        return 200, {"cleared": True}

    def _delete_faults(self, _: _Request) -> tuple[int, Any]:
        self.clear_faults()
        return 200, {"cleared": True}

    def _post_fault(self, request: _Request) -> tuple[int, Any]:
        try:
            body = json.loads(request.body or b"{}")
            model = body["model"]
            if "fault" in body:
                self.set_fault(model, body["fault"])
            if "token_delay" in body:
                self.set_token_delay(float(body["token_delay"]), model)
        except (ValueError, KeyError, TypeError) as exc:
            return 400, {"error": {"message": f"bad fault request: {exc}"}}
        return 200, {"model": model, "fault": body.get("fault"), "token_delay": body.get("token_delay")}

    # ----------------------------------------------------------- generation

    def _take_fault(self, model: str, header: str | None) -> Fault | None:
        """The fault for this request: the header's, else the model's (or "*"), consuming one use."""
        if header:
            try:
                return parse_fault(header)
            except ValueError as exc:
                raise _BadRequestError(str(exc)) from None
        key = model if model in self._faults else "*" if "*" in self._faults else None
        if key is None:
            return None
        state = self._faults[key]
        if state.remaining is not None:
            state.remaining -= 1
            if state.remaining <= 0:
                del self._faults[key]
        return state.fault

    def _parse_generation(self, request: _Request, api: str, chat: bool) -> _Generation:
        try:
            body = json.loads(request.body)
        except ValueError:
            raise _BadRequestError("body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise _BadRequestError("body must be an object with a model")
        prompt, messages = body.get("prompt"), body.get("messages")
        if api == "anthropic" and isinstance(body.get("system"), str) and isinstance(messages, list):
            messages = [{"role": "system", "content": body["system"]}, *messages]  # rendered like a system message
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if chat and not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise _BadRequestError("messages must be a non-empty list of objects")
        if not chat and not isinstance(prompt, str):
            raise _BadRequestError("prompt must be a string")
        options = _dict(body.get("options"))
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", options.get("num_predict")))
        stream_options = _dict(body.get("stream_options"))
        return _Generation(
            api=api,
            model=body["model"],
            chat=chat,
            prompt=None if chat else prompt,
            messages=messages if chat else None,
            stream=bool(body.get("stream", api == "ollama")),  # Ollama streams unless told not to
            max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
            include_usage=bool(stream_options.get("include_usage")),
            body=body,
            authorization=request.headers.get("authorization"),
        )

    def _record(self, request: _Request, gen: _Generation, fault: Fault | None) -> dict[str, Any]:
        entry = {
            "id": len(self._requests) + 1,
            "method": request.method,
            "path": request.path,
            "model": gen.model,
            "prompt": gen.prompt,
            "messages": gen.messages,
            "stream": gen.stream,
            "max_tokens": gen.max_tokens,
            "fault": fault.spec if fault else None,
            # a credential is never echoed: only its digest, so tests can check which key was sent
            "authorization_sha256": _digest(request.headers.get("authorization") or request.headers.get("x-api-key")),
            "body": gen.body,
            "outcome": "started",
            "tokens_sent": 0,
            "at": time.time(),
        }
        self._requests.append(entry)
        self._models.add(gen.model)
        return entry

    async def _generate(self, conn: _Conn, request: _Request, api: str, chat: bool) -> None:
        gen = self._parse_generation(request, api, chat)
        fault = self._take_fault(gen.model, request.headers.get("x-fake-fault"))
        gen.entry = entry = self._record(request, gen, fault)
        wire = _WIRES.get(api, _Wire)(gen.model, chat, gen.include_usage)
        try:
            if fault is not None and await self._refuse_early(conn, gen, wire, fault):
                return
            if api == "anthropic" and _prefill(gen) and _field((gen.messages or [])[-1], "content")[-1:].isspace():
                # the Messages API's own rule, so the adapter's prefill is checked against it
                message = "messages: final assistant content cannot end with trailing whitespace"
                await conn.send_json(400, wire.error_body(message, "invalid_request_error"))
                entry["outcome"] = "error:trailing_whitespace"
                return
            messages = gen.messages or []
            if chat:
                base, prefix = _chat_split(messages, self.n_tokens)
                new_turn = not gen.body.get("continue_final_message")
                if fault is not None and fault.kind == "needs_continue" and _prefill(gen) and new_turn:
                    base, prefix = render_messages(messages), ""  # a new assistant turn: the answer restarts
            else:
                base, prefix = split_continuation(gen.prompt or "", self.n_tokens)
            chunks, reason = _remaining(base, prefix, self.n_tokens, gen.max_tokens)
            prompt_words = len((render_messages(messages) if chat else gen.prompt or "").split())
            wire.prompt_words = prompt_words
            if not gen.stream:
                usage = _usage(prompt_words, len(chunks))
                await conn.send_json(200, wire.whole("".join(chunks), reason, usage))
                entry.update(outcome="completed", tokens_sent=len(chunks))
                return
            await self._stream(conn, gen, wire, fault, chunks, reason, prompt_words)
        except ConnectionError:
            entry["outcome"] = "client_disconnected"
            raise

    async def _refuse_early(self, conn: _Conn, gen: _Generation, wire: _Wire, fault: Fault) -> bool:
        """Apply a fault that replaces the whole response; True when one did."""
        entry = gen.entry
        if fault.kind == "refuse":
            conn.reset()
            entry["outcome"] = "refused"
            return True
        if fault.kind == "http5xx":
            body = wire.error_body("The fake server is overloaded", "service_unavailable", "server_error")
            await conn.send_json(fault.status, body)
        elif fault.kind == "rate429":
            headers = {} if fault.seconds is None else {"Retry-After": f"{fault.seconds:g}"}
            body = wire.error_body("Rate limit reached (fake)", "rate_limit_exceeded", "requests")
            await conn.send_json(429, body, headers)
        elif fault.kind in ("context_length", "content_policy") or (fault.kind == "reject_prefill" and _prefill(gen)):
            status, message, code = _ERRORS[fault.kind]
            await conn.send_json(status, wire.error_body(message, code))
        else:
            return False
        entry["outcome"] = f"error:{fault.kind}"
        return True

    async def _stream(
        self,
        conn: _Conn,
        gen: _Generation,
        wire: _Wire,
        fault: Fault | None,
        chunks: list[str],
        reason: str,
        prompt_words: int,
    ) -> None:
        entry = gen.entry
        delay = self.model_delays.get(gen.model, self.token_delay)
        kind = fault.kind if fault is not None else None
        usage = _usage(prompt_words, len(chunks))
        await conn.send_head(200, {"Content-Type": wire.content_type, "Cache-Control": "no-cache"})
        await conn.write((b"\xef\xbb\xbf" if kind == "bom" else b"") + wire.preamble())
        if fault is not None and kind == "slow_first":
            await conn.pause(fault.seconds or 0.0)
        if fault is not None and kind == "reasoning":
            for i in range(fault.tokens or 0):
                await conn.pause(fault.seconds or 0.0)
                await conn.write(wire.reasoning(f"step {i}. "))
        if kind == "tool_calls":
            await conn.write(wire.tool_call())
            await conn.write(wire.finish("stop" if isinstance(wire, _OllamaWire) else "tool_calls", usage, True))
            entry["outcome"] = "tool_calls"
            return
        if kind == "one_line" and chunks:
            chunks = ["".join(chunks)]
        at = None
        if fault is not None and fault.kind in _POSITIONAL:
            at = min(len(chunks) if fault.tokens is None else fault.tokens, len(chunks))
        for i in range(len(chunks) + 1):
            if i == at and fault is not None and await self._fault_at(conn, wire, fault, entry, gen, usage):
                return
            if i == len(chunks):
                break
            if i and delay:
                await conn.pause(delay)
            await conn.write(
                (wire.pings() if kind == "pings" else wire.empty_frame() if kind == "empty_frames" else b"")
                + wire.token(chunks[i])
            )
            entry["tokens_sent"] = i + 1
        if kind == "finish_reset":
            await conn.write(wire.finish_only(reason))
            await asyncio.sleep(0.05)
            conn.reset()
            entry["outcome"] = "finish_reset"
            return
        done = fault is None or fault.kind != "no_done"
        await conn.write(wire.finish(reason, usage, done))
        entry["outcome"] = "completed"

    async def _fault_at(
        self, conn: _Conn, wire: _Wire, fault: Fault, entry: dict[str, Any], gen: _Generation, usage: dict[str, int]
    ) -> bool:
        """Apply a positional fault after K tokens; True when the response ends here."""
        if fault.kind == "stall":
            await conn.pause(fault.seconds or 0.0)
            return False
        if fault.kind == "malformed":
            await conn.write(wire.garbage())
            return False
        if fault.kind == "stream_error":
            await conn.write(wire.error("fake internal error while generating"))
        elif fault.kind == "finish":
            sent = entry["tokens_sent"]  # usage counts what this response really sent
            await conn.write(wire.finish(fault.arg or "stop", _usage(usage["prompt_tokens"], sent), True))
        elif fault.kind == "inband":
            await conn.write(wire.inband(fault.arg or "data", fault.arg2 or "server"))
        elif fault.kind == "echo_key":
            echoed = f"invalid credentials: {gen.authorization or 'none'}"
            await conn.write(wire.inband("data", "server", echoed))
        elif fault.kind == "die_after":
            # let the tokens already written reach the client before the reset
            await asyncio.sleep(0.05)
            conn.reset()
        entry["outcome"] = fault.kind
        return True  # cut: the caller's finally closes cleanly (FIN, no terminator)


#: reason phrases, plus Anthropic's 529 (overloaded), which http.HTTPStatus does not know
_PHRASES = {s.value: s.phrase for s in http.HTTPStatus} | {529: "Overloaded"}


def _digest(value: str | None) -> str | None:
    return None if value is None else hashlib.sha256(value.encode("utf-8")).hexdigest()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _prefill(gen: _Generation) -> bool:
    return bool(gen.chat and gen.messages and _field(gen.messages[-1], "role") == "assistant")


def _usage(prompt_words: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_words, "completion_tokens": completion, "total_tokens": prompt_words + completion}


# ------------------------------------------------------------------------ thread helper


class FakeLLMServerThread:
    """A FakeLLMServer on its own event loop in a daemon thread (for sync tests and scripts)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **server_kwargs: Any) -> None:
        self.server = FakeLLMServer(**server_kwargs)
        self._address = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.call(lambda: self.server.requests)

    def set_fault(self, model: str, fault: str | None) -> None:
        self.call(lambda: self.server.set_fault(model, fault))

    def clear_faults(self) -> None:
        self.call(self.server.clear_faults)

    def clear_requests(self) -> None:
        self.call(self.server.clear_requests)

    def set_token_delay(self, seconds: float, model: str | None = None) -> None:
        self.call(lambda: self.server.set_token_delay(seconds, model))

    def start(self) -> FakeLLMServerThread:
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure), name="fakellm", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.server.start(*self._address))
        except BaseException as exc:  # handed to the starting thread
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.server.stop())
            loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (its state belongs to that thread) and return its result."""
        assert self._loop is not None, "server thread not started"

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = self._thread = None

    def __enter__(self) -> FakeLLMServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------- process


def serve(
    host: str = "127.0.0.1",
    port: int = 8001,
    faults: Mapping[str, str] | None = None,
    token_delay: float = 0.0,
    *,
    model_delays: Mapping[str, float] | None = None,
    n_tokens: int = DEFAULT_TOKENS,
) -> None:
    """Run the fake server until SIGINT/SIGTERM."""
    asyncio.run(_serve(host, port, faults, token_delay, model_delays, n_tokens))


async def _serve(
    host: str,
    port: int,
    faults: Mapping[str, str] | None,
    token_delay: float,
    model_delays: Mapping[str, float] | None,
    n_tokens: int,
) -> None:
    server = FakeLLMServer(faults=faults, token_delay=token_delay, model_delays=model_delays, n_tokens=n_tokens)
    await server.start(host, port)
    print(f"fakellm listening on {server.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{what} must look like MODEL=VALUE, got {value!r}")
        out[key] = rest
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flo_coord.testing.fakellm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--fault", action="append", default=[], metavar="MODEL=SPEC", help='MODEL may be "*"')
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--model-delay", action="append", default=[], metavar="MODEL=SECONDS")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="answer length in tokens")
    args = parser.parse_args(argv)
    try:
        faults = _pairs(args.fault, "--fault")
        for spec in faults.values():
            parse_fault(spec)
        delays = {m: float(s) for m, s in _pairs(args.model_delay, "--model-delay").items()}
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    serve(args.host, args.port, faults, args.token_delay, model_delays=delays, n_tokens=args.tokens)


if __name__ == "__main__":
    main()
