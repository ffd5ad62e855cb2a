"""Backend adapters: stream text from OpenAI-compatible, Ollama and Anthropic servers over httpx.

An adapter only turns HTTP into typed events (TextChunk, Progress, then one StreamEnd)
and typed errors. Retries, stall and time-to-first-token deadlines and failover belong to
the executor, so the HTTP read timeout is disabled here on purpose.

How a stream ends (one model for every adapter; README "How a stream ends"):

- finish_reason ``stop``/``eos``/``eos_token``/``end_turn``/``stop_sequence`` (Ollama
  ``done: true`` with ``done_reason`` ``stop`` or none): complete, ``StreamEnd("stop")``;
- ``length``/``max_tokens``: complete, ``StreamEnd("length")``;
- ``content_filter``: ContentPolicyRejection (final, no retry anywhere);
- ``tool_calls``/``function_call``: ToolCallsOnlyError (final: no text answer to deliver);
- ``abort``, ``error`` or any other value: StreamAbortedError (transient: continue elsewhere);
- the body ends (with or without ``[DONE]``) before any finish_reason: StreamCutError;
- a connection error after the finish_reason arrived changes nothing: complete.

In-band errors (``event: error``, an ``error:`` SSE field, ``data: {"error": ...}``,
Anthropic's ``{"type": "error", ...}``, Ollama's ``{"error": "..."}``) raise the class
of the matching HTTP status and never deliver their text. What is not a chunk is
skipped, never malformed: SSE comments, ping/keep-alive events, empty ``data:`` frames,
a byte-order mark, role-only deltas and usage-only chunks.
"""

from __future__ import annotations

import contextlib
import email.utils
import math
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx
import msgspec
from msgspec import UNSET, UnsetType

from flo_coord import defaults
from flo_coord.constraints import (
    TOKEN_COUNT_LIMIT,
    USAGE_FIELDS,
    USAGE_NAME_LENGTH,
    Checked,
    DeploymentName,
    NonBlank,
    PositiveInt,
    PositiveSeconds,
)
from flo_coord.errors import ConfigError, FloCoordError, ValidationError
from flo_coord.execution import wire
from flo_coord.models import ChatMessage, ServingBackend

__all__ = [
    "ANTHROPIC_VERSION",
    "CONTINUATION_DEFAULTS",
    "DEFAULT_BASE_URLS",
    "MAX_ERROR_BODY",
    "AnthropicBackend",
    "Backend",
    "BackendConfigError",
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
    "PoolExhaustedError",
    "PrefillRejectedError",
    "Progress",
    "RateLimitedError",
    "ServerError",
    "StreamAbortedError",
    "StreamCutError",
    "StreamEnd",
    "StreamEvent",
    "TextChunk",
    "ToolCallsOnlyError",
    "UnsupportedRequestError",
    "classify_error",
    "make_backend",
    "parse_retry_after",
]

MAX_ERROR_BODY = 64 * 1024  # bytes of an error body kept for classification and messages
_MESSAGE_LIMIT = 300  # chars of a provider message quoted in an exception's str
_SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key"})
DEFAULT_MAX_CONNECTIONS = defaults.BACKEND_MAX_CONNECTIONS  # per backend pool when neither spec nor Coordinator says

#: How a backend continues a chat answer from a committed prefix:
#: "prefill": the prefix as a final assistant message (llama.cpp, Ollama, Groq, Together, ...);
#: "continue_final_message": that, plus ``continue_final_message: true`` and
#: ``add_generation_prompt: false`` (vLLM, TGI, SGLang: without them they start a new turn);
#: "completions": the completions endpoint with the chat rendered as a prompt plus the prefix;
#: "none": it cannot continue a chat answer (OpenAI, Azure OpenAI start a new turn).
Continuation = Literal["prefill", "continue_final_message", "completions", "none"]
#: The default per ServingBackend; any other backend defaults to "prefill". Overridable per
#: backend with ``continuation = "..."`` in the TOML file.
CONTINUATION_DEFAULTS: dict[ServingBackend, Continuation] = {
    ServingBackend.Vllm: "continue_final_message",
    ServingBackend.Tgi: "continue_final_message",
    ServingBackend.HuggingFace: "continue_final_message",
    ServingBackend.OpenAI: "none",
    ServingBackend.AzureOpenAI: "none",
}
#: The base_url of a deployment that sets none, for hosted providers with a public API
#: (their ``api_host()``, with the path of their OpenAI-compatible or native API).
DEFAULT_BASE_URLS: dict[ServingBackend, str] = {
    ServingBackend.OpenAI: "https://api.openai.com/v1",
    ServingBackend.Anthropic: "https://api.anthropic.com",
    ServingBackend.Groq: "https://api.groq.com/openai/v1",
    ServingBackend.Together: "https://api.together.xyz/v1",
    ServingBackend.Fireworks: "https://api.fireworks.ai/inference/v1",
}

# ------------------------------------------------------------------------------ config


class BackendSpec(Checked, kw_only=True, forbid_unknown_fields=True):
    """One deployment: a configured model endpoint. Holds the NAME of the key's env var, never the key.

    ``name`` is free and unique per configuration (DEPLOYMENT_NAME_PATTERN: it keys the
    breaker, the failed set, capability memory and in-flight counts). ``provider`` is the
    ServingBackend it runs on (parsed case-insensitively), which fixes ``is_local()``, the
    privacy tier, the default continuation and the default ``base_url`` of hosted APIs;
    when left out, ``name`` must itself be a ServingBackend name (older configs).
    ``connect_timeout`` is in seconds; ``max_connections`` an integer >= 1.
    Raises ConfigError for anything invalid.
    """

    name: DeploymentName
    provider: str | None = None
    #: the wire protocol; None: "anthropic" for the Anthropic provider, else "openai"
    kind: Literal["openai", "ollama", "anthropic"] | None = None
    #: "" (left out): the provider's public API (DEFAULT_BASE_URLS), for the hosted providers listed there
    base_url: str = ""
    model: NonBlank
    api_key_env: NonBlank | None = None
    prefill: bool = True
    chat: bool = True
    completions: bool = True
    connect_timeout: PositiveSeconds = defaults.CONNECT_TIMEOUT
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    # ask OpenAI-style servers for a final usage chunk; off for servers that reject stream_options
    stream_usage: bool = True
    #: how this backend continues a chat answer (see Continuation); None: the backend's default
    continuation: Continuation | None = None
    #: size of this backend's HTTP connection pool; None: the Coordinator's concurrency
    max_connections: PositiveInt | None = None

    def _finish(self) -> None:
        if self.provider is None:
            try:
                self.provider = ServingBackend.parse(self.name)
            except ConfigError:
                raise ConfigError(
                    f"backend {self.name}: unknown backend {self.name!r} and no provider; a free deployment name "
                    f"needs provider = one of {', '.join(b.value for b in ServingBackend)}"
                ) from None
        else:
            self.provider = ServingBackend.parse(self.provider)
        if self.kind is None:
            self.kind = "anthropic" if self.provider is ServingBackend.Anthropic else "openai"
        if self.base_url == "":
            self.base_url = DEFAULT_BASE_URLS.get(self.backend, "")
            if not self.base_url:
                raise ConfigError(f"backend {self.name}: base_url is required for provider {self.provider}")
        if self.kind == "anthropic" and self.continuation in ("continue_final_message", "completions"):
            raise ConfigError(f"backend {self.name}: the anthropic kind continues by prefill or not at all")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"backend {self.name}: base_url must be an http(s) URL, got {self.base_url!r}")

    @property
    def continues_chat(self) -> Continuation:
        """How this backend continues a chat answer: the configured mode, else its default.

        ``prefill = false`` (the older switch) means "none" unless a mode is configured.
        """
        if self.continuation is not None:
            return self.continuation
        if not self.prefill:
            return "none"
        return CONTINUATION_DEFAULTS.get(self.backend, "prefill")

    def serves(self, *, chat: bool) -> bool:
        """Whether this deployment takes chat requests (``chat=True``) or prompt (text
        completion) requests at all: the spec's ``chat``/``completions``, and no prompt
        form for the Anthropic Messages API."""
        return self.chat if chat else self.completions and self.kind != "anthropic"

    @property
    def safe_url(self) -> str:
        """``base_url`` with any user:password replaced by ``***`` (for logs and reprs)."""
        return _safe_url(self.base_url)

    @property
    def backend(self) -> ServingBackend:
        """The provider (a ServingBackend): is_local(), privacy tier and defaults come from it."""
        return ServingBackend(str(self.provider))  # normalised by _finish

    def __repr__(self) -> str:
        # headers may carry credentials a user put there by hand: never print their values
        headers = {k: ("***" if k.lower() in _SENSITIVE_HEADERS else v) for k, v in self.headers.items()}
        return (
            f"BackendSpec(name={self.name!r}, provider={self.backend.value!r}, kind={self.kind!r}, "
            f"base_url={self.safe_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, prefill={self.prefill}, chat={self.chat}, "
            f"completions={self.completions}, connect_timeout={self.connect_timeout}, headers={headers!r}, "
            f"stream_usage={self.stream_usage}, continuation={self.continues_chat!r}, "
            f"max_connections={self.max_connections})"
        )


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"***@{host}").geturl()


class GenerationRequest(Checked):
    """What to generate: exactly one of ``prompt`` (text completion) or ``messages`` (chat, at
    least one); ``prefix`` is text already generated that the backend must continue;
    ``max_tokens`` an integer >= 1 or None; ``params`` sampling parameters (temperature, top_p,
    stop, seed, ...) the adapters add to the payload. ValidationError otherwise."""

    _error: ClassVar[type[ValidationError]] = ValidationError

    prompt: str | None = None
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, description="a non-empty list")] | None = None
    prefix: str = ""
    max_tokens: PositiveInt | None = None
    request_id: str = ""
    params: dict[str, Any] | None = None

    def _finish(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValidationError("GenerationRequest needs exactly one of prompt or messages")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


# ------------------------------------------------------------------------------ events


class TextChunk(msgspec.Struct, frozen=True):
    text: str


class Progress(msgspec.Struct, frozen=True):
    """A well-formed delta without answer text: ``kind`` is "reasoning" or "tool_call".

    It proves the backend is working, so it resets the first-token and stall timers.
    """

    kind: str


class StreamEnd(msgspec.Struct, frozen=True):
    """The answer is complete: ``finish_reason`` is "stop" or "length" (normalised)."""

    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    model: str | None = None


StreamEvent = TextChunk | Progress | StreamEnd

# ------------------------------------------------------------------------------ errors


class BackendError(FloCoordError):
    """A backend failed. ``transient``: the same request may succeed on a retry or another backend.

    ``received_text`` is True when the stream had already produced text before failing.
    """

    transient: ClassVar[bool] = False
    #: True when the failure says nothing about the backend's health (never counts on its breaker)
    local: ClassVar[bool] = False
    #: usage the backend reported before failing (e.g. a usage chunk before ``abort``)
    usage: dict[str, int] | None = None

    def __init__(self, detail: str, *, backend: str, model: str, received_text: bool = False) -> None:
        self.backend = backend
        self.model = model
        self.detail = detail
        self.received_text = received_text
        super().__init__(f"backend {backend} (model {model!r}): {detail}")


class BackendConfigError(BackendError, ConfigError):
    """This backend's configuration cannot work here (e.g. its ``api_key_env`` variable is unset).

    It fails the backend for the request like any backend fault, without counting on the
    shared breaker: other workers may be configured correctly.
    """

    local = True


class PoolExhaustedError(BackendError):
    """No connection of this worker's pool for the backend came free in time: a local capacity fault."""

    transient = True
    local = True


class StreamAbortedError(BackendError):
    """The stream ended with finish_reason ``abort``, ``error`` or one the adapter does not know."""

    transient = True


class ToolCallsOnlyError(BackendError):
    """The answer ended in tool calls, which the Coordinator cannot represent as text."""


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


#: in-band error types and codes (OpenAI, Anthropic, vLLM, TGI) and the HTTP status they stand for
_STREAM_ERROR_STATUS = {
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "requests": 429,
    "overloaded_error": 529,
    "overloaded": 529,
    "api_error": 500,
    "server_error": 500,
    "internal_server_error": 500,
    "service_unavailable": 503,
    "invalid_request_error": 400,
    "request_too_large": 413,
    "context_length_exceeded": 400,
    "content_policy_violation": 400,
    "content_filter": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
}


def _stream_error_status(code: str | None, message: str, kind: str | None = None) -> int:
    """An in-band error has no HTTP status: its numeric code, else its type or code, else its wording."""
    if code is not None and code.isdigit() and 400 <= int(code) <= 599:
        return int(code)
    for name in (code, kind):
        if name is not None and name.lower() in _STREAM_ERROR_STATUS:
            return _STREAM_ERROR_STATUS[name.lower()]
    low = message.lower()
    if _POLICY_PATTERNS.search(low) or _CONTEXT_PATTERNS.search(low) or _PREFILL_PATTERNS.search(low):
        return 400
    if "rate limit" in low:
        return 429
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
        """(TextChunk | Progress)* then one StreamEnd, or a BackendError.

        Cancel the task or ``aclose()`` it to drop the HTTP response.
        """
        ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------------------ adapters


class _ChunkShapeError(ValueError):
    """A decoded chunk does not have the shape the adapter expects."""


def _usage(raw: dict[str, Any] | UnsetType | None) -> dict[str, int] | None:
    """The token counts of a decoded ``usage`` object: what ``constraints.Usage`` admits
    (nested details, non-integers, negative or huge counts and long names dropped; at most
    ``USAGE_FIELDS``), so a provider's odd usage never fails the answer it came with."""
    if not raw:
        return None
    counts = {
        name: count
        for name, count in raw.items()
        if type(count) is int and 0 <= count < TOKEN_COUNT_LIMIT and 0 < len(name) <= USAGE_NAME_LENGTH
    }
    return dict(list(counts.items())[:USAGE_FIELDS]) or None


def _root_cause(exc: BaseException) -> str:
    """The innermost cause (httpx wraps a reset in layers whose own text is empty)."""
    seen = 0
    while (inner := exc.__cause__ or exc.__context__) is not None and seen < 8:
        exc, seen = inner, seen + 1
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redact(text: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


#: finish reasons that mean the answer is complete, and what the caller sees for each
_COMPLETE = {
    "stop": "stop",
    "eos": "stop",
    "eos_token": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "max_tokens": "length",
}
_FILTERED = frozenset({"content_filter", "content_filtered", "safety", "refusal"})
_TOOL_FINISH = frozenset({"tool_calls", "function_call", "tool_use"})
#: event names and ``type``/``object`` values of keep-alive frames, which are skipped
_KEEPALIVE = frozenset({"ping", "keep-alive", "keepalive", "heartbeat"})


class _Ending:
    """What one response has shown so far; decides how the stream ended."""

    def __init__(self) -> None:
        self.received = False
        self.tool_calls = False
        self.finish: str | None = None
        self.usage: dict[str, int] | None = None
        self.model: str | None = None


class _HTTPBackend:
    """Shared plumbing: request building hooks, HTTP status handling, transport error mapping."""

    spec: BackendSpec

    def __init__(
        self, spec: BackendSpec, client: httpx.AsyncClient | None = None, *, max_connections: int | None = None
    ) -> None:
        self.spec = spec
        self._owns_client = client is None
        if client is None:
            size = spec.max_connections or max_connections or DEFAULT_MAX_CONNECTIONS
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=min(size, 100))
            client = httpx.AsyncClient(timeout=self._timeout(), limits=limits)
        self._client = client

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name}, model={self.spec.model!r}, base_url={self.spec.safe_url!r})"

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
            raise BackendConfigError(
                f"environment variable {name} (api_key_env) is not set", backend=self.spec.name, model=self.spec.model
            )
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
        chat_by_completions = request.is_chat and bool(request.prefix) and spec.continues_chat == "completions"
        if request.is_chat and not spec.chat and not chat_by_completions:
            raise self._local_error(UnsupportedRequestError, "chat requests are disabled for this backend")
        if (not request.is_chat or chat_by_completions) and not spec.completions:
            raise self._local_error(UnsupportedRequestError, "completion requests are disabled for this backend")
        if request.is_chat and request.prefix and spec.continues_chat == "none":
            raise self._local_error(PrefillRejectedError, "this backend cannot continue a chat answer (continuation)")

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

    def _prompt(self, request: GenerationRequest) -> str:
        """The completions prompt (a chat rendered as one for continuation "completions") plus the prefix."""
        if request.messages is None:
            return (request.prompt or "") + request.prefix
        from flo_coord.store import render_messages  # the store imports no adapter; import here keeps layers apart

        return render_messages(request.messages) + request.prefix

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        self._check_capabilities(request)
        url, payload = self._build(request)
        key = self._api_key()
        ending = _Ending()
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
                async with contextlib.aclosing(self._events(response, ending, key)) as events:
                    async for event in events:
                        yield event
        except httpx.PoolTimeout as exc:
            raise PoolExhaustedError(
                "no free connection in this worker's pool for the backend (local capacity, not a backend fault)",
                backend=self.spec.name,
                model=self.spec.model,
            ) from exc
        except httpx.TransportError as exc:
            raise self._connect_error(exc, ending.received, key) from exc

    def _connect_error(self, exc: httpx.TransportError, received: bool, key: str | None) -> BackendConnectError:
        when = "mid-stream after text was received" if received else "before any text was received"
        cause = _root_cause(exc)  # said once: "ConnectError: ConnectError: ..." says nothing new
        cause = cause if cause.startswith(type(exc).__name__) else f"{type(exc).__name__}: {cause}"
        detail = _redact(f"connection failed {when}: {cause}", key, urlsplit(self.spec.base_url).password)
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

    def _in_band_error(self, error: Any, ending: _Ending, key: str | None) -> BackendHTTPError:
        """An error object (or text) the backend sent inside a 200 stream, classified like its HTTP status."""
        if isinstance(error, dict) and isinstance(error.get("error"), dict | str):
            error = error["error"]  # ``event: error`` frames wrap the object once more
        body = _redact(msgspec.json.encode({"error": error}).decode(), key)
        message, code, kind = _error_fields(body)
        status = _stream_error_status(code, message, kind)
        error_obj = classify_error(self.spec, status, body, received_text=ending.received)
        error_obj.usage = ending.usage
        return error_obj

    def _end(self, ending: _Ending) -> StreamEnd:
        """The StreamEnd of a complete answer, or the typed error of every other ending."""
        spec, reason = self.spec, ending.finish
        common: dict[str, Any] = {"backend": spec.name, "model": spec.model, "received_text": ending.received}
        error: BackendError
        if reason is None:
            error = StreamCutError("stream ended without a finish_reason", **common)
        elif reason.lower() in _COMPLETE and (ending.received or not ending.tool_calls):
            return StreamEnd(_COMPLETE[reason.lower()], ending.usage, ending.model)
        elif reason.lower() in _FILTERED:
            message = f"the provider's content filter stopped the answer (finish_reason {reason!r})"
            error = ContentPolicyRejection(None, "", message=message, code="content_filter", **common)
        elif reason.lower() in _TOOL_FINISH or ending.tool_calls:
            error = ToolCallsOnlyError(
                f"the answer is tool calls (finish_reason {reason!r}), which flo_coord cannot deliver as text",
                **common,
            )
        else:
            error = StreamAbortedError(f"stream ended with finish_reason {reason!r}", **common)
        error.usage = ending.usage
        raise error

    # subclass hooks
    _accept = "application/json"

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def _events(self, response: httpx.Response, ending: _Ending, key: str | None) -> AsyncGenerator[StreamEvent, None]:
        raise NotImplementedError


def _ollama_options(params: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI-style sampling parameters in Ollama's shape (``options``; ``stop`` included)."""
    names = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")
    options = {name: params[name] for name in names if params and params.get(name) is not None}
    return {"options": options} if options else {}


# ------------------------------------------------------------------------------ OpenAI


class _SSEEvent(msgspec.Struct):
    """One SSE event: its ``event`` name, joined ``data`` lines, an ``error:`` field, and
    ``complete`` False for a trailing event cut by the end of the body."""

    event: str = ""
    data: str | None = None
    error: str | None = None
    complete: bool = True


async def _sse_events(lines: AsyncIterator[str]) -> AsyncGenerator[_SSEEvent, None]:
    """The events of an SSE body (WHATWG rules: comments skipped, a leading BOM dropped)."""
    event, data, error = "", list[str](), list[str]()
    first = True
    async for line in lines:
        if first:
            line, first = line.removeprefix("\ufeff"), False
        if not line:
            if data or error or event:
                yield _SSEEvent(event, "\n".join(data) if data else None, "\n".join(error) if error else None)
            event, data, error = "", [], []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value.strip()
        elif field == "error":  # llama.cpp sends its error in a field of its own
            error.append(value)
    if data or error:
        yield _SSEEvent(event, "\n".join(data) if data else None, "\n".join(error) if error else None, False)


def _loads(text: str) -> Any:
    """JSON if it is JSON, else the text itself (error payloads come both ways)."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


def _is_keepalive(chunk: str | wire.OpenAIChunk | wire.OllamaChunk) -> bool:
    """A keep-alive frame: the text "ping" (or another _KEEPALIVE name), or an object whose
    ``type``/``object``/``event`` is one."""
    if isinstance(chunk, str):
        return chunk.strip().lower() in _KEEPALIVE
    return any(name is not None and name.lower() in _KEEPALIVE for name in (chunk.type, chunk.object, chunk.event))


def _openai_url(base_url: str, path: str) -> str:
    base = base_url.rstrip("/")
    return f"{base}{path}" if base.endswith("/v1") else f"{base}/v1{path}"


class OpenAIBackend(_HTTPBackend):
    """OpenAI-compatible server (OpenAI, vLLM, llama.cpp, TGI, Together, Groq, ...) over SSE."""

    _accept = "text/event-stream"

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        payload: dict[str, Any] = {**(request.params or {}), "model": self.spec.model, "stream": True}
        if self.spec.stream_usage:
            payload["stream_options"] = {"include_usage": True}
        if request.max_tokens is not None:
            payload["max_tokens"] = request.max_tokens
        mode = self.spec.continues_chat
        if request.messages is None or (request.prefix and mode == "completions"):
            payload["prompt"] = self._prompt(request)
            return _openai_url(self.spec.base_url, "/completions"), payload
        payload["messages"] = self._chat_messages(request)
        if request.prefix and mode == "continue_final_message":
            # vLLM, TGI and SGLang start a new assistant turn unless told to continue the final message
            payload.update(continue_final_message=True, add_generation_prompt=False)
        return _openai_url(self.spec.base_url, "/chat/completions"), payload

    def _events(self, response: httpx.Response, ending: _Ending, key: str | None) -> AsyncGenerator[StreamEvent, None]:
        return self._parse_sse(response, ending, key, chat=response.url.path.endswith("/chat/completions"))

    async def _parse_sse(
        self, response: httpx.Response, ending: _Ending, key: str | None, *, chat: bool
    ) -> AsyncGenerator[StreamEvent, None]:
        try:
            async with contextlib.aclosing(_sse_events(response.aiter_lines())) as events:
                async for event in events:
                    if event.error is not None or event.event == "error":
                        raise self._in_band_error(_loads(event.error or event.data or ""), ending, key)
                    data = (event.data or "").strip()
                    if not data or event.event.lower() in _KEEPALIVE or _is_keepalive(data):
                        continue  # empty frames and keep-alives are not chunks
                    if data == "[DONE]":
                        break
                    for item in self._chunk_events(data, event.complete, ending, key, chat):
                        yield item
        except httpx.TransportError:
            if ending.finish is None:
                raise
            # the finish_reason arrived: a reset before [DONE] changes nothing
        yield self._end(ending)

    def _chunk_events(self, data: str, complete: bool, ending: _Ending, key: str | None, chat: bool) -> list[Any]:
        try:
            chunk = wire.openai_chunk(data)
            if _is_keepalive(chunk) and (isinstance(chunk, str) or not chunk.choices):
                return []
            if isinstance(chunk, str):
                raise _ChunkShapeError("chunk is not an object")
            text, kind, finish, usage, model, error = _openai_chunk(chunk, chat)
        except (msgspec.DecodeError, _ChunkShapeError) as exc:  # msgspec.ValidationError included
            if not complete:
                return []  # a half-written final event is a cut, not garbage
            raise self._malformed(f"malformed stream chunk ({exc})", _redact(data, key), ending.received) from None
        if error is not None:
            raise self._in_band_error(error, ending, key)
        ending.finish = finish or ending.finish
        ending.usage = usage or ending.usage
        ending.model = model or ending.model
        if kind == "tool_call":
            ending.tool_calls = True
        if text:
            ending.received = True
            return [TextChunk(text)]
        return [Progress(kind)] if kind else []


def _openai_chunk(
    chunk: wire.OpenAIChunk, chat: bool
) -> tuple[str | None, str | None, str | None, dict[str, int] | None, str | None, Any]:
    """(text, progress kind, finish_reason, usage, model, error) of one chunk; _ChunkShapeError
    for a chunk with neither ``choices`` nor ``usage``."""
    if chunk.error is not None:  # OpenAI/vLLM {"error": ...} and Anthropic {"type": "error", "error": ...}
        return None, None, None, None, None, chunk.error
    if chunk.choices is None or chunk.choices is UNSET:
        if chunk.usage is UNSET:
            raise _ChunkShapeError("chunk has neither choices nor usage")
        return None, None, None, _usage(chunk.usage), chunk.model, None  # a usage-only chunk
    usage = _usage(chunk.usage)
    if not chunk.choices:
        return None, None, None, usage, chunk.model, None  # a usage-only chunk
    choice = chunk.choices[0]
    if not chat:
        return choice.text, None, choice.finish_reason, usage, chunk.model, None
    delta = choice.delta or _NO_DELTA
    return delta.content, _delta_kind(delta), choice.finish_reason, usage, chunk.model, None


_NO_DELTA = wire.Delta()


def _delta_kind(delta: wire.Delta) -> str | None:
    """The progress kind of a delta without text: "tool_call", "reasoning", or None.

    Reasoning deltas: vLLM/DeepSeek ``reasoning_content``, OpenRouter ``reasoning``, Ollama ``thinking``.
    """
    if delta.tool_calls or delta.function_call:
        return "tool_call"
    if delta.reasoning_content or delta.reasoning or delta.thinking:
        return "reasoning"
    return None


# ------------------------------------------------------------------------------ Ollama

_OLLAMA_COMPLETE = {"stop": "stop", "length": "length"}


class OllamaBackend(_HTTPBackend):
    """Ollama's native API (/api/generate raw, /api/chat) with newline-delimited JSON streaming."""

    _accept = "application/x-ndjson"

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        payload: dict[str, Any] = {"model": self.spec.model, "stream": True, **_ollama_options(request.params)}
        if request.max_tokens is not None:
            payload["options"] = {**payload.get("options", {}), "num_predict": request.max_tokens}
        base = self.spec.base_url.rstrip("/")
        if request.messages is None or (request.prefix and self.spec.continues_chat == "completions"):
            # raw: no chat template, so prompt+prefix is continued verbatim
            payload.update(prompt=self._prompt(request), raw=True)
            return f"{base}/api/generate", payload
        payload["messages"] = self._chat_messages(request)
        return f"{base}/api/chat", payload

    def _events(self, response: httpx.Response, ending: _Ending, key: str | None) -> AsyncGenerator[StreamEvent, None]:
        return self._parse_ndjson(response, ending, key, chat=response.url.path.endswith("/api/chat"))

    async def _parse_ndjson(
        self, response: httpx.Response, ending: _Ending, key: str | None, *, chat: bool
    ) -> AsyncGenerator[StreamEvent, None]:
        try:
            async for line, complete in _ndjson_lines(response.aiter_text()):
                try:
                    chunk = wire.ollama_chunk(line)
                    if _is_keepalive(chunk):
                        continue
                    if isinstance(chunk, str):
                        raise _ChunkShapeError("line is not an object")
                    text, kind, done = _ollama_chunk(chunk, chat)
                except (msgspec.DecodeError, _ChunkShapeError) as exc:  # msgspec.ValidationError included
                    if not complete:
                        break  # a half-written last line is a cut, not garbage
                    raise self._malformed(
                        f"malformed stream line ({exc})", _redact(line, key), ending.received
                    ) from None
                if chunk.error is not None:
                    raise self._in_band_error(chunk.error, ending, key)
                ending.tool_calls = ending.tool_calls or kind == "tool_call"
                if text:
                    ending.received = True
                    yield TextChunk(text)
                elif kind:
                    yield Progress(kind)
                if done is not None:
                    reason, ending.usage, ending.model = done
                    ending.finish = _OLLAMA_COMPLETE.get(reason, reason)
                    break
        except httpx.TransportError:
            if ending.finish is None:
                raise
        yield self._end(ending)


async def _ndjson_lines(chunks: AsyncIterator[str]) -> AsyncGenerator[tuple[str, bool], None]:
    """Non-blank lines (a leading BOM dropped), each with False for a trailing line not ended by a newline."""
    buffer = ""
    first = True
    async for chunk in chunks:
        if first and chunk:
            chunk, first = chunk.removeprefix("\ufeff"), False
        buffer += chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if line.strip():
                yield line, True
    if buffer.strip():
        yield buffer, False


def _ollama_chunk(
    chunk: wire.OllamaChunk, chat: bool
) -> tuple[str | None, str | None, tuple[str, dict[str, int] | None, str | None] | None]:
    """(text, progress kind, (done_reason, usage, model) on the done line); _ChunkShapeError
    for a line without ``done`` that is not an error line."""
    if chunk.error is not None:
        return None, None, None
    if chat:
        message = chunk.message or _NO_DELTA
        text, kind = message.content, _delta_kind(message)
    else:
        text, kind = chunk.response, "reasoning" if chunk.thinking else None
    if chunk.done is None:
        raise _ChunkShapeError("done is missing")
    if not chunk.done:
        return text, kind, None
    usage = {
        name: count
        for name, count in (("prompt_tokens", chunk.prompt_eval_count), ("completion_tokens", chunk.eval_count))
        if count is not None
    }
    reason = chunk.done_reason or "stop"  # Ollama before 0.1.33 sends no done_reason
    return text, kind, (reason, usage or None, chunk.model)


# ------------------------------------------------------------------------------ Anthropic

#: the Messages API version sent as ``anthropic-version`` (the stable one its SSE format is documented for)
ANTHROPIC_VERSION = "2023-06-01"
#: ``max_tokens`` is required by the Messages API: what is sent when the request sets none
ANTHROPIC_DEFAULT_MAX_TOKENS = 4096


class AnthropicBackend(_HTTPBackend):
    """Anthropic's Messages API (POST /v1/messages, ``stream: true``) over SSE.

    Text comes from ``content_block_delta`` events (``text_delta``; ``thinking_delta`` and
    ``input_json_delta`` are Progress), the ending from ``message_delta``'s ``stop_reason``
    (end_turn/stop_sequence: stop, max_tokens: length, refusal: ContentPolicyRejection,
    tool_use: ToolCallsOnlyError, any other: StreamAbortedError), usage from
    ``message_start`` (input_tokens) and ``message_delta`` (output_tokens). An in-band
    ``error`` event is classified like its HTTP status (overloaded_error: 529, a
    ServerError). Authenticates with ``x-api-key`` and sends ``anthropic-version``.
    Continuation is an assistant prefill; the API refuses a final assistant message that
    ends in whitespace, so that whitespace is left out of the prefill and dropped from the
    start of the continued text. System messages go to the top-level ``system`` field.
    The Messages API has no text completion: a prompt (non-chat) request is refused locally
    (UnsupportedRequestError), so the Coordinator moves on to a deployment that has one.
    """

    _accept = "text/event-stream"

    def _request_headers(self, key: str | None) -> dict[str, str]:
        headers = {"Accept": self._accept, "anthropic-version": ANTHROPIC_VERSION, **self.spec.headers}
        if key is not None:
            headers["x-api-key"] = key
        return headers

    def _check_capabilities(self, request: GenerationRequest) -> None:
        if not request.is_chat:
            raise self._local_error(UnsupportedRequestError, "the Messages API serves chat requests only")
        if request.prefix and self.spec.continues_chat == "none":
            raise self._local_error(PrefillRejectedError, "this backend cannot continue an answer (continuation)")
        if request.is_chat and not self.spec.chat:
            raise self._local_error(UnsupportedRequestError, "chat requests are disabled for this backend")

    def _build(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        assert request.messages is not None  # _check_capabilities refused prompts
        chat = [{"role": m.role, "content": m.content} for m in request.messages]
        system = "\n\n".join(m["content"] for m in chat if m["role"] == "system")
        messages = [m for m in chat if m["role"] != "system"]
        prefill = request.prefix.rstrip()  # the API rejects a final assistant message ending in whitespace
        if prefill:
            if messages and messages[-1]["role"] == "assistant":
                messages[-1] = {"role": "assistant", "content": messages[-1]["content"] + prefill}
            else:
                messages.append({"role": "assistant", "content": prefill})
        payload: dict[str, Any] = {
            "model": self.spec.model,
            "stream": True,
            "max_tokens": request.max_tokens or ANTHROPIC_DEFAULT_MAX_TOKENS,
            "messages": messages,
        }
        if system:
            payload["system"] = system
        base = self.spec.base_url.rstrip("/")
        return (f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"), payload

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        # the whitespace left out of the prefill comes back at the start of the continuation: drop it once
        trimmed = request.prefix[len(request.prefix.rstrip()) :] if request.prefix.rstrip() else ""
        async with contextlib.aclosing(super().stream(request)) as events:
            async for event in events:
                if trimmed and isinstance(event, TextChunk):
                    text, trimmed = _drop_echo(event.text, trimmed)
                    if not text:
                        continue
                    event = TextChunk(text)
                yield event

    def _events(self, response: httpx.Response, ending: _Ending, key: str | None) -> AsyncGenerator[StreamEvent, None]:
        return self._parse_messages(response, ending, key)

    async def _parse_messages(
        self, response: httpx.Response, ending: _Ending, key: str | None
    ) -> AsyncGenerator[StreamEvent, None]:
        try:
            async with contextlib.aclosing(_sse_events(response.aiter_lines())) as events:
                async for event in events:
                    data = (event.data or "").strip()
                    if event.event == "error" or event.error is not None:
                        raise self._in_band_error(_loads(event.error or data), ending, key)
                    if not data or event.event.lower() in _KEEPALIVE:
                        continue
                    try:
                        message_event = wire.anthropic_event(data)
                        item, stop = self._message_event(message_event, ending)
                    except msgspec.DecodeError as exc:  # msgspec.ValidationError included
                        if not event.complete:
                            break  # a half-written final event is a cut, not garbage
                        detail = f"malformed stream event ({exc})"
                        raise self._malformed(detail, _redact(data, key), ending.received) from None
                    if message_event.type == "error":
                        raise self._in_band_error({"type": "error", "error": message_event.error}, ending, key)
                    if item is not None:
                        yield item
                    if stop:
                        break
        except httpx.TransportError:
            if ending.finish is None:
                raise
        yield self._end(ending)

    def _message_event(self, event: wire.AnthropicEvent, ending: _Ending) -> tuple[StreamEvent | None, bool]:
        """(event to yield, True at message_stop) for one decoded Messages API event."""
        kind = event.type
        if kind == "message_start":
            if event.message is not None:
                ending.model = event.message.model or ending.model
                self._add_usage(ending, event.message.usage)
        elif kind == "content_block_delta":
            delta = event.delta
            if delta is None:
                raise msgspec.ValidationError("content_block_delta without a delta")
            if delta.type == "text_delta":
                if delta.text:
                    ending.received = True
                    return TextChunk(delta.text), False
            elif delta.type in ("thinking_delta", "signature_delta"):
                return Progress("reasoning"), False
            elif delta.type == "input_json_delta":
                ending.tool_calls = True
                return Progress("tool_call"), False
        elif kind == "content_block_start":
            if event.content_block is not None and event.content_block.type == "tool_use":
                ending.tool_calls = True
                return Progress("tool_call"), False
        elif kind == "message_delta":
            if event.delta is not None:
                ending.finish = event.delta.stop_reason or ending.finish
            self._add_usage(ending, event.usage)
        elif kind == "message_stop":
            return None, True
        return None, False  # ping, content_block_stop and event types added later are skipped

    @staticmethod
    def _add_usage(ending: _Ending, raw: dict[str, Any] | None) -> None:
        """Fold Anthropic usage (input_tokens, output_tokens: cumulative) into prompt/completion/total."""
        usage = _usage(raw) or {}
        merged = dict(ending.usage or {})
        if "input_tokens" in usage:
            merged["prompt_tokens"] = usage["input_tokens"]
        if "output_tokens" in usage:
            merged["completion_tokens"] = usage["output_tokens"]
        if merged:
            merged["total_tokens"] = merged.get("prompt_tokens", 0) + merged.get("completion_tokens", 0)
            ending.usage = merged


def _drop_echo(text: str, trimmed: str) -> tuple[str, str]:
    """``text`` without the leading part of ``trimmed`` (whitespace left out of a prefill) it repeats."""
    common = 0
    while common < min(len(text), len(trimmed)) and text[common] == trimmed[common]:
        common += 1
    if common == len(text):
        return "", trimmed[common:]
    return text[common:], ""


# ------------------------------------------------------------------------------ factory


def make_backend(
    spec: BackendSpec, client: httpx.AsyncClient | None = None, *, max_connections: int | None = None
) -> Backend:
    """The adapter for ``spec.kind``; an own httpx client unless one is shared in.

    The own client's pool holds ``spec.max_connections``, else ``max_connections`` (the
    Coordinator passes its concurrency), else DEFAULT_MAX_CONNECTIONS connections.
    """
    if spec.kind == "ollama":
        return OllamaBackend(spec, client, max_connections=max_connections)
    if spec.kind == "anthropic":
        return AnthropicBackend(spec, client, max_connections=max_connections)
    return OpenAIBackend(spec, client, max_connections=max_connections)
