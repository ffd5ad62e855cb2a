"""Backend adapters: stream text from OpenAI-compatible and Ollama servers over httpx.

An adapter only turns HTTP into typed events (TextChunk*, StreamEnd) and typed errors.
Retries, stall and time-to-first-token deadlines and failover belong to the executor, so
the HTTP read timeout is disabled here on purpose.
"""

from __future__ import annotations

import contextlib
import email.utils
import math
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx
import msgspec

from flo_coord.errors import ConfigError, FloCoordError, ValidationError
from flo_coord.models import ChatMessage, ServingBackend

__all__ = [
    "MAX_ERROR_BODY",
    "Backend",
    "BackendConnectError",
    "BackendError",
    "BackendHTTPError",
    "BackendSpec",
    "BadRequestError",
    "ContentPolicyRejection",
    "ContextLengthError",
    "GenerationRequest",
    "MalformedChunkError",
    "OllamaBackend",
    "OpenAIBackend",
    "PrefillRejectedError",
    "RateLimitedError",
    "ServerError",
    "StreamCutError",
    "StreamEnd",
    "StreamEvent",
    "TextChunk",
    "UnsupportedRequestError",
    "classify_error",
    "make_backend",
    "parse_retry_after",
]

MAX_ERROR_BODY = 64 * 1024  # bytes of an error body kept for classification and messages
_MESSAGE_LIMIT = 300  # chars of a provider message quoted in an exception's str
_SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key"})

# ------------------------------------------------------------------------------ config


class BackendSpec(msgspec.Struct, kw_only=True):
    """One configured model endpoint. Holds the NAME of the key's env var, never the key."""

    name: str
    kind: Literal["openai", "ollama"] = "openai"
    base_url: str
    model: str
    api_key_env: str | None = None
    prefill: bool = True
    chat: bool = True
    completions: bool = True
    connect_timeout: float = 5.0
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    # ask OpenAI-style servers for a final usage chunk; off for servers that reject stream_options
    stream_usage: bool = True

    def __post_init__(self) -> None:
        ServingBackend.parse(self.name)
        if self.kind not in ("openai", "ollama"):
            raise ConfigError(f"backend {self.name}: kind must be 'openai' or 'ollama', got {self.kind!r}")
        parts = urlsplit(self.base_url) if isinstance(self.base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"backend {self.name}: base_url must be an http(s) URL, got {self.base_url!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"backend {self.name}: model must be a non-empty string")
        if self.api_key_env is not None and (not isinstance(self.api_key_env, str) or not self.api_key_env.strip()):
            raise ConfigError(f"backend {self.name}: api_key_env must be an environment variable name")
        timeout = self.connect_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise ConfigError(f"backend {self.name}: connect_timeout must be a finite number > 0, got {timeout!r}")
        if not isinstance(self.headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.headers.items()
        ):
            raise ConfigError(f"backend {self.name}: headers must map strings to strings")
        self.connect_timeout = float(timeout)

    @property
    def backend(self) -> ServingBackend:
        return ServingBackend(self.name)

    def __repr__(self) -> str:
        # headers may carry credentials a user put there by hand: never print their values
        headers = {k: ("***" if k.lower() in _SENSITIVE_HEADERS else v) for k, v in self.headers.items()}
        return (
            f"BackendSpec(name={self.name!r}, kind={self.kind!r}, base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, prefill={self.prefill}, chat={self.chat}, "
            f"completions={self.completions}, connect_timeout={self.connect_timeout}, headers={headers!r}, "
            f"stream_usage={self.stream_usage})"
        )


class GenerationRequest(msgspec.Struct):
    """What to generate. ``prefix`` is text already generated that the backend must continue."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prefix: str = ""
    max_tokens: int | None = None
    request_id: str = ""

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValidationError("GenerationRequest needs exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValidationError("GenerationRequest.messages must not be empty")
        tokens = self.max_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValidationError(f"max_tokens must be an integer >= 1, got {tokens!r}")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


# ------------------------------------------------------------------------------ events


class TextChunk(msgspec.Struct, frozen=True):
    text: str


class StreamEnd(msgspec.Struct, frozen=True):
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    model: str | None = None


StreamEvent = TextChunk | StreamEnd

# ------------------------------------------------------------------------------ errors


class BackendError(FloCoordError):
    """A backend failed. ``transient``: the same request may succeed on a retry or another backend.

    ``received_text`` is True when the stream had already produced text before failing.
    """

    transient: ClassVar[bool] = False

    def __init__(self, detail: str, *, backend: str, model: str, received_text: bool = False) -> None:
        self.backend = backend
        self.model = model
        self.detail = detail
        self.received_text = received_text
        super().__init__(f"backend {backend} (model {model!r}): {detail}")


class BackendConnectError(BackendError):
    """Connection refused/reset/DNS/connect timeout, or the body read failed mid-stream."""

    transient = True


class StreamCutError(BackendError):
    """The body ended cleanly but without a terminator or a finish_reason."""

    transient = True


class MalformedChunkError(BackendError):
    """A stream chunk was not valid JSON or lacked the expected fields."""

    transient = True

    def __init__(self, detail: str, *, backend: str, model: str, received_text: bool = False, line: str = "") -> None:
        self.line = line[:200]
        super().__init__(f"{detail}: {self.line!r}", backend=backend, model=model, received_text=received_text)


class BackendHTTPError(BackendError):
    """The backend answered with an error status (or an error object inside a stream).

    ``status`` is None when the error was raised locally, before any HTTP (capability check).
    """

    def __init__(
        self,
        status: int | None,
        body_text: str = "",
        retry_after: float | None = None,
        *,
        backend: str,
        model: str,
        message: str | None = None,
        code: str | None = None,
        received_text: bool = False,
    ) -> None:
        self.status = status
        self.body_text = body_text
        self.retry_after = retry_after
        self.code = code
        self.message = message if message is not None else body_text.strip()
        detail = f"HTTP {status}" if status is not None else "rejected locally"
        if code and code != str(status):
            detail += f" [{code}]"
        if self.message:
            detail += f": {_shorten(self.message)}"
        if retry_after is not None:
            detail += f" (retry after {retry_after:g}s)"
        super().__init__(detail, backend=backend, model=model, received_text=received_text)


class RateLimitedError(BackendHTTPError):
    transient = True


class ServerError(BackendHTTPError):
    transient = True


class BadRequestError(BackendHTTPError):
    """A 4xx that is neither of the specific kinds below: this backend will not take the request."""


class ContextLengthError(BadRequestError):
    """The prompt (plus prefix and max_tokens) does not fit this backend's context window."""


class ContentPolicyRejection(BadRequestError):  # noqa: N818 - name fixed by the executor API
    """Refused on content policy; ``reason`` is the provider's message. Not worth retrying anywhere."""

    @property
    def reason(self) -> str:
        return self.message


class PrefillRejectedError(BadRequestError):
    """The backend does not accept an assistant prefill as the final chat message."""


class UnsupportedRequestError(BadRequestError):
    """The spec says this backend cannot serve this kind of request (chat or completions)."""


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


# ------------------------------------------------------------------------ classification

_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"})
_CONTEXT_PATTERNS = re.compile(
    r"maximum context length|context length|context window|context size|too long|max_new_tokens` must be"
)
_POLICY_CODES = frozenset({"content_policy_violation", "content_filter", "content_policy"})
_POLICY_PATTERNS = re.compile(r"content (management )?policy|safety")
_PREFILL_PATTERNS = re.compile(
    r"prefill|(final|last) (message|role)\b.*\bassistant|(final|last) assistant message|continue_final_message"
)


def _error_fields(body_text: str) -> tuple[str, str | None, str | None]:
    """(message, code, type) out of the error bodies of OpenAI, vLLM, llama.cpp, Ollama and FastAPI."""
    try:
        obj = msgspec.json.decode(body_text)
    except msgspec.DecodeError:
        return body_text.strip(), None, None
    if not isinstance(obj, dict):
        return body_text.strip(), None, None
    err = obj.get("error", obj)
    if isinstance(err, str):
        return err, None, None
    if not isinstance(err, dict):
        return body_text.strip(), None, None
    message = err.get("message", err.get("detail", ""))
    message = message if isinstance(message, str) else msgspec.json.encode(message).decode()
    code, kind = err.get("code"), err.get("type")
    return message, None if code in (None, "") else str(code), None if kind in (None, "") else str(kind)


def classify_error(
    spec: BackendSpec,
    status: int,
    body_text: str,
    retry_after: float | None = None,
    *,
    received_text: bool = False,
) -> BackendHTTPError:
    """The typed error for an error status and body (or an in-stream error object)."""
    message, code, kind = _error_fields(body_text)
    codes = {c.lower() for c in (code, kind) if c}
    cls = _error_class(status, message.lower(), codes)
    return cls(
        status,
        body_text,
        retry_after if cls is RateLimitedError else None,
        backend=spec.name,
        model=spec.model,
        message=message,
        code=code or kind,
        received_text=received_text,
    )


def _error_class(status: int, message: str, codes: set[str]) -> type[BackendHTTPError]:
    if status == 429:
        return RateLimitedError
    if status >= 500:
        return ServerError
    if not 400 <= status < 500:
        return BackendHTTPError
    # explicit codes win over wording; wording is checked most specific first
    if codes & _POLICY_CODES:
        return ContentPolicyRejection
    if codes & _CONTEXT_CODES or status == 413:
        return ContextLengthError
    if _PREFILL_PATTERNS.search(message):
        return PrefillRejectedError
    if _POLICY_PATTERNS.search(message):
        return ContentPolicyRejection
    if _CONTEXT_PATTERNS.search(message):
        return ContextLengthError
    return BadRequestError


def _stream_error_status(code: str | None, message: str) -> int:
    """An in-stream error object has no HTTP status: use its numeric code, else guess from wording."""
    if code is not None and code.isdigit() and 400 <= int(code) <= 599:
        return int(code)
    low = message.lower()
    if _POLICY_PATTERNS.search(low) or _CONTEXT_PATTERNS.search(low) or _PREFILL_PATTERNS.search(low):
        return 400
    return 500


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds or an HTTP-date; None if absent/invalid."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _retry_after(headers: httpx.Headers) -> float | None:
    seconds = parse_retry_after(headers.get("retry-after"))
    if seconds is None and (ms := parse_retry_after(headers.get("retry-after-ms"))) is not None:
        seconds = ms / 1000.0
    return seconds


# ------------------------------------------------------------------------------ protocol


@runtime_checkable
class Backend(Protocol):
    spec: BackendSpec

    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """TextChunk* then one StreamEnd; cancel the task or ``aclose()`` it to drop the HTTP response."""
        ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------------------ adapters


class _ChunkShapeError(ValueError):
    """A decoded chunk does not have the shape the adapter expects."""


def _usage(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    return {k: v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _ChunkShapeError(f"{key} is not a string")
    return value


def _root_cause(exc: BaseException) -> str:
    """The innermost cause (httpx wraps a reset in layers whose own text is empty)."""
    seen = 0
    while (inner := exc.__cause__ or exc.__context__) is not None and seen < 8:
        exc, seen = inner, seen + 1
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


class _HTTPBackend:
    """Shared plumbing: request building hooks, HTTP status handling, transport error mapping."""

    spec: BackendSpec

    def __init__(self, spec: BackendSpec, client: httpx.AsyncClient | None = None) -> None:
        self.spec = spec
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=self._timeout())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name}, model={self.spec.model!r}, base_url={self.spec.base_url!r})"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _timeout(self) -> httpx.Timeout:
        # read=None: stalls and time-to-first-token are the executor's deadlines, not ours
        return httpx.Timeout(connect=self.spec.connect_timeout, read=None, write=None, pool=self.spec.connect_timeout)

    def _api_key(self) -> str | None:
        name = self.spec.api_key_env
        if name is None:
            return None
        key = os.environ.get(name)
        if not key:
            raise ConfigError(f"backend {self.spec.name}: environment variable {name} (api_key_env) is not set")
        return key

    def _request_headers(self, key: str | None) -> dict[str, str]:
        headers = {"Accept": self._accept, **self.spec.headers}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _local_error(self, cls: type[BackendHTTPError], message: str) -> BackendHTTPError:
        return cls(None, "", backend=self.spec.name, model=self.spec.model, message=message)

    def _check_capabilities(self, request: GenerationRequest) -> None:
        spec = self.spec
        if request.is_chat and not spec.chat:
            raise self._local_error(UnsupportedRequestError, "chat requests are disabled for this backend")
        if not request.is_chat and not spec.completions:
            raise self._local_error(UnsupportedRequestError, "completion requests are disabled for this backend")
        if request.is_chat and request.prefix and not spec.prefill:
            raise self._local_error(PrefillRejectedError, "assistant prefill is not supported by this backend")

    def _chat_messages(self, request: GenerationRequest) -> list[dict[str, str]]:
        """The messages to send; a non-empty prefix becomes (or extends) the final assistant message."""
        assert request.messages is not None
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if request.prefix:
            if messages[-1]["role"] == "assistant":
                messages[-1] = {"role": "assistant", "content": messages[-1]["content"] + request.prefix}
            else:
                messages.append({"role": "assistant", "content": request.prefix})
        return messages

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        self._check_capabilities(request)
        url, payload = self._build(request)
        key = self._api_key()
        received = False
        try:
            async with self._client.stream(
                "POST",
                url,
                content=msgspec.json.encode(payload),
                headers={"Content-Type": "application/json", **self._request_headers(key)},
                timeout=self._timeout(),
            ) as response:
                if not response.is_success:
                    raise await self._status_error(response, key)
                # aclosing: an early exit must finalise the parser now, not whenever it is collected
                async with contextlib.aclosing(self._events(response)) as events:
                    async for event in events:
                        received = received or isinstance(event, TextChunk)
                        yield event
        except httpx.TransportError as exc:
            raise self._connect_error(exc, received, key) from exc

    def _connect_error(self, exc: httpx.TransportError, received: bool, key: str | None) -> BackendConnectError:
        when = "mid-stream after text was received" if received else "before any text was received"
        detail = _redact(f"connection failed {when}: {type(exc).__name__}: {_root_cause(exc)}", key)
        return BackendConnectError(detail, backend=self.spec.name, model=self.spec.model, received_text=received)

    async def _status_error(self, response: httpx.Response, key: str | None) -> BackendHTTPError:
        body = bytearray()
        try:
            async for part in response.aiter_bytes():
                body += part
                if len(body) >= MAX_ERROR_BODY:
                    break
        except httpx.TransportError:
            pass  # a truncated error body still classifies by status
        text = _redact(bytes(body[:MAX_ERROR_BODY]).decode("utf-8", "replace"), key)
        return classify_error(self.spec, response.status_code, text, _retry_after(response.headers))

    def _malformed(self, detail: str, line: str, received: bool) -> MalformedChunkError:
        return MalformedChunkError(
            detail, backend=self.spec.name, model=self.spec.model, received_text=received, line=line
        )

    def _cut(self, received: bool, what: str) -> StreamCutError:
        return StreamCutError(
            f"stream ended without {what}", backend=self.spec.name, model=self.spec.model, received_text=received
        )

    def _in_stream_error(self, error: Any, received: bool) -> BackendHTTPError:
        body = msgspec.json.encode({"error": error}).decode()
        message, code, _ = _error_fields(body)
        return classify_error(self.spec, _stream_error_status(code, message), body, received_text=received)

    # subclass hooks
    _accept = "application/json"

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def _events(self, response: httpx.Response) -> AsyncGenerator[StreamEvent, None]:
        raise NotImplementedError


# ------------------------------------------------------------------------------ OpenAI


async def _sse_data(lines: AsyncIterator[str]) -> AsyncGenerator[tuple[str, bool], None]:
    """The data payload of each SSE event, with False for a trailing event cut by EOF."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data), True
                data = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
    if data:
        yield "\n".join(data), False


# vLLM starts a new assistant turn unless told to continue the final message
_PREFILL_EXTRA: dict[str, dict[str, Any]] = {
    ServingBackend.Vllm.value: {"continue_final_message": True, "add_generation_prompt": False},
}


def _openai_url(base_url: str, path: str) -> str:
    base = base_url.rstrip("/")
    return f"{base}{path}" if base.endswith("/v1") else f"{base}/v1{path}"


class OpenAIBackend(_HTTPBackend):
    """OpenAI-compatible server (OpenAI, vLLM, llama.cpp, TGI, Together, Groq, ...) over SSE."""

    _accept = "text/event-stream"

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        payload: dict[str, Any] = {"model": self.spec.model, "stream": True}
        if self.spec.stream_usage:
            payload["stream_options"] = {"include_usage": True}
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        if request.messages is None:
            assert request.prompt is not None
            payload["prompt"] = request.prompt + request.prefix
            return _openai_url(self.spec.base_url, "/completions"), payload
        payload["messages"] = self._chat_messages(request)
        if request.prefix:
            payload.update(_PREFILL_EXTRA.get(self.spec.name, {}))
        return _openai_url(self.spec.base_url, "/chat/completions"), payload

    def _events(self, response: httpx.Response) -> AsyncGenerator[StreamEvent, None]:
        return self._parse_sse(response, chat=response.url.path.endswith("/chat/completions"))

    async def _parse_sse(self, response: httpx.Response, *, chat: bool) -> AsyncGenerator[StreamEvent, None]:
        received = False
        finish: str | None = None
        usage: dict[str, int] | None = None
        model: str | None = None
        async with contextlib.aclosing(_sse_data(response.aiter_lines())) as payloads:
            async for data, complete in payloads:
                if data.strip() == "[DONE]":
                    yield StreamEnd(finish, usage, model)
                    return
                try:
                    obj = msgspec.json.decode(data)
                    text, chunk_finish, chunk_usage, chunk_model, error = _openai_chunk(obj, chat)
                except (msgspec.DecodeError, _ChunkShapeError) as exc:
                    if not complete:
                        break  # a half-written final event is a cut, not garbage
                    raise self._malformed(f"malformed stream chunk ({exc})", data, received) from None
                if error is not None:
                    raise self._in_stream_error(error, received)
                finish = chunk_finish or finish
                usage = chunk_usage or usage
                model = chunk_model or model
                if text:
                    received = True
                    yield TextChunk(text)
        if finish is None:
            raise self._cut(received, "[DONE] or a finish_reason")
        yield StreamEnd(finish, usage, model)


def _openai_chunk(obj: Any, chat: bool) -> tuple[str | None, str | None, dict[str, int] | None, str | None, Any]:
    """(text, finish_reason, usage, model, error) of one decoded chunk; _ChunkShapeError if off-shape."""
    if not isinstance(obj, dict):
        raise _ChunkShapeError("chunk is not an object")
    if obj.get("error") is not None:
        return None, None, None, None, obj["error"]
    choices = obj.get("choices")
    usage = _usage(obj.get("usage"))
    if choices is None and usage is None:
        raise _ChunkShapeError("chunk has neither choices nor usage")
    if choices is not None and not isinstance(choices, list):
        raise _ChunkShapeError("choices is not a list")
    model = _optional_str(obj, "model")
    if not choices:
        return None, None, usage, model, None
    choice = choices[0]
    if not isinstance(choice, dict):
        raise _ChunkShapeError("choice is not an object")
    if chat:
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise _ChunkShapeError("delta is not an object")
        text = _optional_str(delta, "content")
    else:
        text = _optional_str(choice, "text")
    return text, _optional_str(choice, "finish_reason"), usage, model, None


# ------------------------------------------------------------------------------ Ollama


class OllamaBackend(_HTTPBackend):
    """Ollama's native API (/api/generate raw, /api/chat) with newline-delimited JSON streaming."""

    _accept = "application/x-ndjson"

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        payload: dict[str, Any] = {"model": self.spec.model, "stream": True}
        if request.max_tokens is not None:
            payload["options"] = {"num_predict": request.max_tokens}
        base = self.spec.base_url.rstrip("/")
        if request.messages is None:
            assert request.prompt is not None
            # raw: no chat template, so prompt+prefix is continued verbatim
            payload.update(prompt=request.prompt + request.prefix, raw=True)
            return f"{base}/api/generate", payload
        payload["messages"] = self._chat_messages(request)
        return f"{base}/api/chat", payload

    def _events(self, response: httpx.Response) -> AsyncGenerator[StreamEvent, None]:
        return self._parse_ndjson(response, chat=response.url.path.endswith("/api/chat"))

    async def _parse_ndjson(self, response: httpx.Response, *, chat: bool) -> AsyncGenerator[StreamEvent, None]:
        received = False
        async for line, complete in _ndjson_lines(response.aiter_text()):
            try:
                obj = msgspec.json.decode(line)
                text, end = _ollama_chunk(obj, chat)
            except (msgspec.DecodeError, _ChunkShapeError) as exc:
                if not complete:
                    break  # a half-written last line is a cut, not garbage
                raise self._malformed(f"malformed stream line ({exc})", line, received) from None
            if obj.get("error") is not None:
                raise self._in_stream_error(obj["error"], received)
            if text:
                received = True
                yield TextChunk(text)
            if end is not None:
                yield end
                return
        raise self._cut(received, "a done: true line")


async def _ndjson_lines(chunks: AsyncIterator[str]) -> AsyncGenerator[tuple[str, bool], None]:
    """Non-blank lines, each with False when it is a trailing line not ended by a newline."""
    buffer = ""
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if line.strip():
                yield line, True
    if buffer.strip():
        yield buffer, False


def _ollama_chunk(obj: Any, chat: bool) -> tuple[str | None, StreamEnd | None]:
    """(text, StreamEnd if this is the done line) of one decoded line; _ChunkShapeError if off-shape."""
    if not isinstance(obj, dict):
        raise _ChunkShapeError("line is not an object")
    if obj.get("error") is not None:
        return None, None
    if chat:
        message = obj.get("message") or {}
        if not isinstance(message, dict):
            raise _ChunkShapeError("message is not an object")
        text = _optional_str(message, "content")
    else:
        text = _optional_str(obj, "response")
    done = obj.get("done")
    if not isinstance(done, bool):
        raise _ChunkShapeError("done is missing or not a bool")
    if not done:
        return text, None
    usage = {
        name: obj[field]
        for name, field in (("prompt_tokens", "prompt_eval_count"), ("completion_tokens", "eval_count"))
        if isinstance(obj.get(field), int) and not isinstance(obj.get(field), bool)
    }
    finish = _optional_str(obj, "done_reason") or "stop"
    return text, StreamEnd(finish, usage or None, _optional_str(obj, "model"))


# ------------------------------------------------------------------------------ factory


def make_backend(spec: BackendSpec, client: httpx.AsyncClient | None = None) -> Backend:
    """The adapter for ``spec.kind``; an own httpx client unless one is shared in."""
    if spec.kind == "ollama":
        return OllamaBackend(spec, client)
    return OpenAIBackend(spec, client)
