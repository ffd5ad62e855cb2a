"""The schema: pure data types of the failover protocol. No I/O here.

Names, fields and defaults mirror batuta's ``serve::failover`` (failover.rs; see
/work/shared/reference) and ``serve::backends::ServingBackend``/``PrivacyTier``; the fields
flo_coord adds (ownership, usage, cancellation, ...) default so the original JSON still
decodes. Constraints on fields are declared types from ``flo_coord.constraints``.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from flo_coord import defaults
from flo_coord.constraints import (
    DEPLOYMENT_NAME_PATTERN,
    Checked,
    DeploymentName,
    NonNegativeInt,
    PositiveSeconds,
    convert,
)
from flo_coord.errors import ConfigError, ValidationError

# --------------------------------------------------------------------------- backends

_DEPLOYMENT_NAME = re.compile(DEPLOYMENT_NAME_PATTERN)


def is_deployment_name(name: object) -> bool:
    """True when ``name`` is a str matching DEPLOYMENT_NAME_PATTERN (a usable deployment name)."""
    return isinstance(name, str) and _DEPLOYMENT_NAME.fullmatch(name) is not None


class ServingBackend(enum.StrEnum):
    """Where a model is served: batuta's 22 ``ServingBackend`` variants (8 local, 12 remote,
    2 serverless), serialised as the exact Rust variant name."""

    # local
    Realizar = "Realizar"
    Ollama = "Ollama"
    LlamaCpp = "LlamaCpp"
    Llamafile = "Llamafile"
    Candle = "Candle"
    Vllm = "Vllm"
    Tgi = "Tgi"
    LocalAI = "LocalAI"
    # remote
    HuggingFace = "HuggingFace"
    Together = "Together"
    Replicate = "Replicate"
    Anyscale = "Anyscale"
    Modal = "Modal"
    Fireworks = "Fireworks"
    Groq = "Groq"
    OpenAI = "OpenAI"
    Anthropic = "Anthropic"
    AzureOpenAI = "AzureOpenAI"
    AwsBedrock = "AwsBedrock"
    GoogleVertex = "GoogleVertex"
    # serverless
    AwsLambda = "AwsLambda"
    CloudflareWorkers = "CloudflareWorkers"

    def is_local(self) -> bool:
        """True for the 8 local servers (Realizar, Ollama, LlamaCpp, Llamafile, Candle, Vllm, Tgi, LocalAI)."""
        return self in _LOCAL

    def is_remote(self) -> bool:
        """True for every variant that is not local (serverless ones included), as in batuta."""
        return not self.is_local()

    def is_serverless(self) -> bool:
        """True for AwsLambda, CloudflareWorkers and Modal."""
        return self in _SERVERLESS

    def api_host(self) -> str | None:
        """The provider's API host name (e.g. "api.groq.com"); None for local servers."""
        return _API_HOSTS.get(self)

    @classmethod
    def parse(cls, name: str) -> ServingBackend:
        """The variant called ``name``, matched case-insensitively ("vllm" is Vllm); ConfigError if unknown."""
        try:
            return cls(name)
        except ValueError:
            pass
        folded = name.casefold() if isinstance(name, str) else None
        for backend in cls:
            if backend.value.casefold() == folded:
                return backend
        raise ConfigError(f"unknown backend {name!r}; expected one of {', '.join(b.value for b in cls)}")


_B = ServingBackend
_LOCAL = frozenset({_B.Realizar, _B.Ollama, _B.LlamaCpp, _B.Llamafile, _B.Candle, _B.Vllm, _B.Tgi, _B.LocalAI})
_SERVERLESS = frozenset({_B.AwsLambda, _B.CloudflareWorkers, _B.Modal})
_API_HOSTS: dict[ServingBackend, str] = {
    _B.HuggingFace: "api-inference.huggingface.co",
    _B.Together: "api.together.xyz",
    _B.Replicate: "api.replicate.com",
    _B.Anyscale: "api.endpoints.anyscale.com",
    _B.Modal: "modal.com",
    _B.Fireworks: "api.fireworks.ai",
    _B.Groq: "api.groq.com",
    _B.OpenAI: "api.openai.com",
    _B.Anthropic: "api.anthropic.com",
    _B.AzureOpenAI: "openai.azure.com",
    _B.AwsBedrock: "bedrock-runtime.amazonaws.com",
    _B.GoogleVertex: "aiplatform.googleapis.com",
    _B.AwsLambda: "lambda.amazonaws.com",
    _B.CloudflareWorkers: "workers.cloudflare.com",
}


class PrivacyTier(enum.StrEnum):
    """Which backends a request may use (batuta's PrivacyTier)."""

    Sovereign = "Sovereign"
    Private = "Private"
    Standard = "Standard"

    def allows(self, backend: ServingBackend) -> bool:
        """Whether a prompt of this tier may go to ``backend``: Sovereign only local servers,
        Private local plus AzureOpenAI, AwsBedrock, GoogleVertex and AwsLambda, Standard any."""
        if self is PrivacyTier.Standard:
            return True
        if self is PrivacyTier.Sovereign:
            return backend.is_local()
        return backend.is_local() or backend in _PRIVATE_CLOUD


_PRIVATE_CLOUD = frozenset({_B.AzureOpenAI, _B.AwsBedrock, _B.GoogleVertex, _B.AwsLambda})

# ------------------------------------------------------------ tagged values (Rust enums)


class _Variant:
    """A Rust-style enum value: a name, and for one variant a message. Equal by value."""

    __slots__ = ("message", "name")
    _WITH_MESSAGE: ClassVar[str]

    def __init__(self, name: str, message: str | None = None) -> None:
        self.name = name
        self.message = message

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.name, self.message) == (other.name, other.message)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name, self.message))

    def __repr__(self) -> str:
        if self.message is None:
            return f"{type(self).__name__}.{self.name}"
        return f"{type(self).__name__}.{self.name}({self.message!r})"

    def to_wire(self) -> str | dict[str, str]:
        """serde's external tagging: ``"Success"`` or ``{"BackendError": "msg"}``."""
        return self.name if self.message is None else {self.name: self.message}

    @classmethod
    def from_wire(cls, value: Any) -> Any:
        """The value of ``to_wire`` output (a unit name, or a one-item ``{name: message}``);
        ValueError for anything else."""
        if isinstance(value, str) and value in cls._UNIT_NAMES:  # type: ignore[attr-defined]
            return getattr(cls, value)
        if isinstance(value, dict) and len(value) == 1:
            ((name, message),) = value.items()
            if name == cls._WITH_MESSAGE and isinstance(message, str):
                return cls(name, message)
        raise ValueError(f"not a {cls.__name__}: {value!r}")


def _message(value: Any) -> str:
    """A variant's message: text that Redis can store (encodable as UTF-8)."""
    message = str(value)
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("message is not valid Unicode text (lone surrogate)") from None
    return message


class StreamState(_Variant):
    """State of a streaming response: Pending, Streaming, Completed, Failed(msg), Recovered."""

    _WITH_MESSAGE = "Failed"
    _UNIT_NAMES = ("Pending", "Streaming", "Completed", "Recovered")
    Pending: ClassVar[StreamState]
    Streaming: ClassVar[StreamState]
    Completed: ClassVar[StreamState]
    Recovered: ClassVar[StreamState]

    @classmethod
    def Failed(cls, message: str) -> StreamState:
        """Raises ValidationError for a message that is not valid Unicode text (lone surrogate)."""
        return cls("Failed", _message(message))


class FailoverResult(_Variant):
    """Result of a failover attempt: Success, Timeout, BackendError(msg), NoBackendsAvailable."""

    _WITH_MESSAGE = "BackendError"
    _UNIT_NAMES = ("Success", "Timeout", "NoBackendsAvailable")
    Success: ClassVar[FailoverResult]
    Timeout: ClassVar[FailoverResult]
    NoBackendsAvailable: ClassVar[FailoverResult]

    @classmethod
    def BackendError(cls, message: str) -> FailoverResult:
        """Raises ValidationError for a message that is not valid Unicode text (lone surrogate)."""
        return cls("BackendError", _message(message))

    def is_failure(self) -> bool:
        """True for every result but Success."""
        return self.name != "Success"


for _cls in (StreamState, FailoverResult):
    for _name in _cls._UNIT_NAMES:
        setattr(_cls, _name, _cls(_name))

# ------------------------------------------------------------------------ the context


def count_tokens(text: str) -> int:
    """The original's rough estimate (``StreamingContext::append``): whitespace-separated
    words of ``text``, at least 1 per append (so "" counts 1)."""
    return max(1, len(text.split()))


class ChatMessage(msgspec.Struct, frozen=True):
    """One chat message: ``role`` ("system", "developer", "user", "assistant") and its text
    ``content`` (OpenAI's message shape). Checked by ``validation.messages`` at the public edge."""

    role: str
    content: str


class StreamingContext(msgspec.Struct, kw_only=True):
    """Everything needed to resume one request on any worker.

    The first five fields are the original's; the rest default so the original
    five-field JSON still decodes.
    """

    prompt: str = ""
    generated_prefix: str = ""
    token_count: int = 0
    primary_backend: str = ""
    request_id: str = ""
    # chat requests keep their messages; ``prompt`` then holds their plain rendering
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = None
    # ownership (fencing): owner worker id, epoch bumped on every change of owner,
    # lease deadline from the Redis server clock (epoch seconds)
    owner: str | None = None
    epoch: int = 0
    lease_deadline: float | None = None
    last_seq: int = 0
    state: str = "Pending"
    state_reason: str | None = None
    failed_backends: list[str] = msgspec.field(default_factory=list)
    current_backend: str | None = None
    created_at: float | None = None
    takeovers: int = 0
    #: token usage the backends reported for this request so far, summed over attempts (JSON
    #: field "usage"), so a replica that takes it over reports the whole request's usage
    usage: dict[str, int] | None = None
    #: the model group the client asked for (``Coordinator.stream(..., model=...)``), so a
    #: replica that takes the request over routes it through the same deployments
    model_group: str | None = None
    # sampling parameters passed to every backend call (temperature, stop, ...), so a
    # replica that takes the request over continues with the same ones (JSON in the ctx hash)
    params: dict[str, Any] | None = None
    #: someone asked for the request to be cancelled (field "cancel" of the ctx hash, set by
    #: the CANCEL script): a replica that claims it ends it cancelled instead of generating
    cancelled: bool = False

    @classmethod
    def new(cls, prompt: str, request_id: str) -> StreamingContext:
        """A fresh context (no prefix, 0 tokens), as ``StreamingContext::new``."""
        return cls(prompt=prompt, request_id=request_id)

    def append(self, tokens: str) -> None:
        """Add ``tokens`` to the prefix and ``count_tokens(tokens)`` to ``token_count`` (in memory only)."""
        self.generated_prefix += tokens
        self.token_count += count_tokens(tokens)

    def continuation_prompt(self) -> str:
        """The prompt followed by the committed prefix, no separator (the original's)."""
        return self.prompt + self.generated_prefix if self.generated_prefix else self.prompt

    def worth_recovering(self, min_tokens: int = 5) -> bool:
        """True once ``min_tokens`` tokens exist (the original hard-coded 5)."""
        return self.token_count >= min_tokens

    @property
    def stream_state(self) -> StreamState:
        """``state`` (and ``state_reason``) as a StreamState value; Pending for an unknown name."""
        if self.state == "Failed":
            return StreamState.Failed(self.state_reason or "")
        return getattr(StreamState, self.state, StreamState.Pending)

    def lease_remaining(self, now: float) -> float | None:
        """Seconds of lease left at ``now`` (epoch seconds, the Redis clock), negative once
        expired; None when nobody owns the request."""
        return None if self.lease_deadline is None else self.lease_deadline - now


# ----------------------------------------------------------------------------- config


def _default_fallback_order() -> list[ServingBackend]:
    return [ServingBackend(name) for name in defaults.FALLBACK_ORDER]


class FailoverConfig(msgspec.Struct, Checked, kw_only=True, forbid_unknown_fields=True):
    """Failover policy: batuta's ``FailoverConfig`` fields and defaults (failover.rs).

    - ``max_retries``: failovers allowed per request, an integer >= 0 (default 2);
    - ``failover_timeout``: seconds one request may spend failing over, 0.001 to ten years (30);
    - ``min_tokens_for_recovery``: committed tokens before a takeover is worth it, >= 0 (5);
    - ``include_prefix``: continue from the committed prefix (True);
    - ``fallback_order``: ServingBackends tried in order, at least one (Realizar, Ollama,
      Together, Groq).

    Constructing one with a value outside these, or decoding one (``from_json``,
    ``from_dict``, a TOML ``[failover]`` table), raises ConfigError naming the field.
    """

    max_retries: NonNegativeInt = defaults.MAX_RETRIES
    failover_timeout: PositiveSeconds = defaults.FAILOVER_TIMEOUT
    min_tokens_for_recovery: NonNegativeInt = defaults.MIN_TOKENS_FOR_RECOVERY
    include_prefix: bool = True
    fallback_order: Annotated[
        list[ServingBackend], msgspec.Meta(min_length=1, description="a list of at least one ServingBackend name")
    ] = msgspec.field(default_factory=_default_fallback_order)

    @classmethod
    def from_json(cls, data: bytes | str) -> FailoverConfig:
        """Decode a JSON object (bytes or str). Anything invalid (syntax, unknown backend, bad
        value, a non-text argument) raises ConfigError."""
        try:
            parsed = msgspec.json.decode(data)
        except (msgspec.DecodeError, TypeError, RecursionError, UnicodeEncodeError) as exc:
            # TypeError: not bytes or str; UnicodeEncodeError: a str with a lone surrogate
            raise ConfigError(f"invalid failover config: {exc}") from None
        return cls.from_dict(parsed)

    @classmethod
    def from_dict(cls, data: Any) -> FailoverConfig:
        """A config from plain data (a dict, e.g. a parsed TOML table); ConfigError when invalid."""
        config: FailoverConfig = convert(data, cls)
        return config


# ---------------------------------------------------------------------------- history


class FailoverAttempt(msgspec.Struct, kw_only=True, tag="attempt", tag_field="kind"):
    """One attempt on one deployment. ``started_at`` is wall-clock epoch seconds.

    ``backend`` is the deployment's name: a ServingBackend name for configs whose backends
    are named after their provider (the original's case), else the free deployment name.
    """

    backend: DeploymentName
    started_at: float
    result: FailoverResult | None = None
    request_id: str | None = None
    worker_id: str | None = None
    model: str | None = None
    tokens: int = 0
    usage: dict[str, int] | None = None


class Takeover(msgspec.Struct, kw_only=True, tag="takeover", tag_field="kind"):
    """A change of owner of one request, recorded in the same history stream (flo_coord's own):
    ``old_owner`` (None: nobody held it) -> ``new_owner`` at fencing ``epoch``, ``at`` the
    Redis server time (epoch seconds), ``prefix_chars`` committed characters taken over."""

    request_id: str
    old_owner: str | None
    new_owner: str
    epoch: int
    at: float
    prefix_chars: int = 0


HistoryEntry = FailoverAttempt | Takeover


class FailoverRequest(msgspec.Struct, kw_only=True):
    """A failover request prepared for retry (``prepare_failover``, as the original's):
    the committed ``generated_prefix`` and ``token_count``, the chat ``messages`` if any,
    and ``next_backend`` from ``fallback_order`` (None when none is left)."""

    request_id: str
    prompt: str
    generated_prefix: str
    token_count: int
    messages: list[ChatMessage] | None = None
    next_backend: ServingBackend | None = None


class FailoverStats(msgspec.Struct, kw_only=True):
    """Counts over the newest 100 history entries, plus the live request count."""

    total_attempts: int = 0
    successful: int = 0
    timeouts: int = 0
    active_contexts: int = 0
    takeovers: int = 0

    def success_rate(self) -> float:
        """Successful attempts as a percentage 0..100 of ``total_attempts``; 0.0 with none."""
        return 0.0 if self.total_attempts == 0 else self.successful / self.total_attempts * 100.0


class RequestOutcome(msgspec.Struct, kw_only=True):
    """What is left of a finished request for its retention period (the ``result`` hash):
    ``state`` Completed or Failed (``error`` and ``error_kind`` then say why), the last
    ``owner``/``epoch``, the ``backend``/``model`` that answered, ``token_count``,
    ``finished_at`` (Redis server time, epoch seconds)."""

    request_id: str
    state: Literal["Completed", "Failed"]
    owner: str | None = None
    epoch: int = 0
    error: str | None = None
    error_kind: str | None = None
    backend: str | None = None
    model: str | None = None
    token_count: int = 0
    finished_at: float | None = None
    #: how the answer ended: "stop", "length" (cut by a token limit), "content_filter"; None if unknown
    finish_reason: str | None = None
    #: token usage summed over every attempt of the request (prompt tokens billed by each attempt,
    #: completion tokens); each attempt's own usage is in the history. None when no backend reported any.
    usage: dict[str, int] | None = None
