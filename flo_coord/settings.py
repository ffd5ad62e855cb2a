"""One configuration file (TOML), decoded and validated with msgspec.

Precedence, highest first: command-line flags > environment variables > this file >
the defaults in ``flo_coord.defaults``. Example (every key, with its default)::

    [redis]
    url = "redis://localhost:6379/0"   # or $FLO_REDIS_URL
    namespace = "flo"                  # or $FLO_NAMESPACE
    durability = "primary"             # "replica": WAIT for one replica on each write

    [ownership]
    lease_ttl = 5.0        # seconds a worker owns a request without renewing
    max_age = 86400.0      # keys of requests nobody completes expire after this
    retention = 3600.0     # finished answers stay followable this long

    [failover]
    max_retries = 2
    failover_timeout = 30.0
    min_tokens_for_recovery = 5
    include_prefix = true
    fallback_order = ["Realizar", "Ollama", "Together", "Groq"]

    [executor]
    first_token_timeout = 30.0
    stall_timeout = 15.0
    same_backend_retries = 1
    rate_limit_retries = 2
    rate_limit_max_wait = 30.0
    backoff_initial = 0.5
    backoff_max = 8.0

    [breaker]
    threshold = 3
    window = 30.0
    cooldown = 10.0
    probe_ttl = 30.0

    [gateway]                          # flo-coord serve (docs/GATEWAY.md)
    host = "127.0.0.1"                 # or $FLO_GATEWAY_HOST
    port = 8080                        # or $FLO_GATEWAY_PORT
    keys_env = []                      # NAMES of variables holding bearer keys
    key_hashes = []                    # "sha256:<hex>" of bearer keys; no key: no auth
    on_disconnect = "keep"             # or "cancel": end a request its client left
    disconnect_grace = 10.0            # seconds a client has to come back first
    cors_origins = []                  # CORS off unless origins are listed
    max_body_bytes = 1114112           # larger bodies get a 413
    follow_wait = 5.0                  # seconds a resume waits for a request to appear
    # the gateway's ``model`` names a model group ([[models]] below)

    [[backends]]                       # one deployment; several may share a provider
    name = "vllm-a"                    # free and unique: keys its breaker, in-flight count, ...
    provider = "Vllm"                  # a ServingBackend (any case); default: the name, if it is one
    kind = "openai"                    # or "ollama", "anthropic"; default "anthropic" for Anthropic
    base_url = "http://vllm:8000"      # default for OpenAI, Anthropic, Groq, Together, Fireworks: their API
    model = "meta-llama/Llama-3.1-8B-Instruct"
    api_key_env = "VLLM_API_KEY"       # the variable's NAME; the key is never stored
    prefill = true
    chat = true
    completions = true
    connect_timeout = 5.0
    # how it continues a chat answer from a committed prefix: "prefill", "continue_final_message"
    # (vLLM, TGI, SGLang), "completions" (the chat rendered as a prompt), "none"; default per
    # ServingBackend (backends.CONTINUATION_DEFAULTS: Vllm/Tgi/HuggingFace continue_final_message,
    # OpenAI/AzureOpenAI none, every other prefill)
    continuation = "continue_final_message"
    max_connections = 64               # its HTTP pool; default: the worker's --concurrency

    [[models]]                         # a model group: what clients ask for (``model=``, the gateway's
                                       # ``model``); none: one group per deployment ``model``, its
                                       # deployments first, then failover.fallback_order
    name = "llama"
    deployments = ["vllm-a", { name = "vllm-b", weight = 2 }, { name = "groq", tier = 2 }]
    fallbacks = ["llama-small"]        # other groups, after every deployment here failed
    context_window_fallbacks = ["llama-long"]  # instead, after a context-too-long failure
    privacy = "Standard"               # "Sovereign": local providers only; "Private": + private clouds
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from flo_coord import defaults
from flo_coord.constraints import Checked, Namespace, Port, PositiveSeconds, Seconds, convert
from flo_coord.errors import ConfigError
from flo_coord.execution.backends import BackendSpec
from flo_coord.execution.breaker import BreakerConfig
from flo_coord.execution.coordinator import ExecutorConfig
from flo_coord.execution.groups import ModelGroup, Router, check_unique
from flo_coord.models import FailoverConfig

#: Every ``FLO_*`` environment variable flo_coord reads, each named once. These override the
#: file (and are overridden by flags): variable -> (section, key) of the TOML file.
ENVIRONMENT = {
    defaults.REDIS_URL_ENV: ("redis", "url"),
    "FLO_NAMESPACE": ("redis", "namespace"),
    "FLO_DURABILITY": ("redis", "durability"),
    "FLO_LEASE_TTL": ("ownership", "lease_ttl"),
    "FLO_GATEWAY_HOST": ("gateway", "host"),
    "FLO_GATEWAY_PORT": ("gateway", "port"),
}
#: Environment variable naming the TOML file when no ``--config`` flag is given.
CONFIG_ENV = "FLO_CONFIG"
#: Settings that exist only on the command line (not in the TOML file): CLI setting -> variable
#: (read by ``flo_coord.cli.common.env_value``).
CLI_ENVIRONMENT = {
    "worker_id": "FLO_WORKER_ID",
    "concurrency": "FLO_CONCURRENCY",
    "metrics_port": "FLO_METRICS_PORT",
    "log_format": "FLO_LOG_FORMAT",
    "log_level": "FLO_LOG_LEVEL",
}


class RedisSettings(msgspec.Struct, Checked, kw_only=True, forbid_unknown_fields=True):
    """``[redis]``: where the store lives. ``url`` (``$FLO_REDIS_URL``), ``namespace`` (the key
    prefix, ``$FLO_NAMESPACE``), ``durability`` ("primary", or "replica": WAIT for one replica
    on each write, ``$FLO_DURABILITY``). ConfigError when a value is invalid."""

    url: str = defaults.REDIS_URL
    namespace: Namespace = defaults.NAMESPACE
    durability: Literal["primary", "replica"] = defaults.DURABILITY  # type: ignore[assignment]


class OwnershipSettings(msgspec.Struct, Checked, kw_only=True, forbid_unknown_fields=True):
    """``[ownership]``, in seconds (0.001 to ten years): ``lease_ttl`` a worker owns a request
    without renewing (``$FLO_LEASE_TTL``), ``max_age`` after which the keys of a request nobody
    completes expire, ``retention`` a finished answer stays followable. ConfigError when invalid."""

    lease_ttl: PositiveSeconds = defaults.LEASE_TTL
    max_age: PositiveSeconds = defaults.MAX_AGE
    retention: PositiveSeconds = defaults.RETENTION


class GatewaySettings(msgspec.Struct, Checked, kw_only=True, forbid_unknown_fields=True):
    """``[gateway]``: ``flo-coord serve``, the OpenAI-compatible HTTP gateway (docs/GATEWAY.md).

    ``host``/``port`` it listens on (``$FLO_GATEWAY_HOST``/``$FLO_GATEWAY_PORT``); ``keys_env``:
    NAMES of variables holding bearer keys; ``key_hashes``: ``sha256:<hex>`` of bearer keys (no
    key at all: no auth); ``on_disconnect``: "keep" or "cancel" a request its client left, after
    ``disconnect_grace`` seconds; ``cors_origins``: allowed origins (none: CORS off);
    ``max_body_bytes``: larger bodies get a 413; ``follow_wait``: seconds a resume waits for a
    request to appear. ConfigError when a value is invalid.
    """

    host: str = defaults.GATEWAY_HOST
    port: Port = defaults.GATEWAY_PORT
    keys_env: list[str] = msgspec.field(default_factory=list)
    key_hashes: list[
        Annotated[str, msgspec.Meta(pattern="^sha256:[0-9a-f]{64}$", description="sha256:<64 hex digits>")]
    ] = msgspec.field(default_factory=list)
    on_disconnect: Literal["keep", "cancel"] = "keep"
    disconnect_grace: Seconds = defaults.DISCONNECT_GRACE
    cors_origins: list[str] = msgspec.field(default_factory=list)
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, description="an integer >= 1024")] = defaults.MAX_BODY_BYTES
    follow_wait: Seconds = defaults.FOLLOW_WAIT


class Settings(msgspec.Struct, Checked, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration: one field per TOML section (module docstring), each with its
    defaults. Deployment names must be unique and every model group must name known
    deployments its privacy tier allows: ConfigError otherwise."""

    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    ownership: OwnershipSettings = msgspec.field(default_factory=OwnershipSettings)
    failover: FailoverConfig = msgspec.field(default_factory=FailoverConfig)
    executor: ExecutorConfig = msgspec.field(default_factory=ExecutorConfig)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    backends: list[BackendSpec] = msgspec.field(default_factory=list)
    models: list[ModelGroup] = msgspec.field(default_factory=list)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)

    def _finish(self) -> None:
        check_unique(self.backends)
        Router(self.models, {spec.name: spec.backend for spec in self.backends})  # raises ConfigError

    def manager_options(self) -> dict[str, Any]:
        """Keyword arguments for ``AsyncFailoverManager`` and its subclasses, after the config."""
        return {
            "url": self.redis.url,
            "namespace": self.redis.namespace,
            "lease_ttl": self.ownership.lease_ttl,
            "max_age": self.ownership.max_age,
            "retention": self.ownership.retention,
            "durability": self.redis.durability,
        }

    def coordinator_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Coordinator`` (backends included; the manager's too, which
        it ignores when given a ``manager=``)."""
        return {
            "backends": self.backends,
            "models": self.models,
            "config": self.failover,
            "executor": self.executor,
            "breaker": self.breaker,
            **self.manager_options(),
        }


def _merge(base: dict[str, Any], overrides: dict[tuple[str, str], Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for (section, key), value in overrides.items():
        if value is not None:
            merged.setdefault(section, {})[key] = value
    return merged


def _environment(environ: dict[str, str]) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    for variable, place in ENVIRONMENT.items():
        if environ.get(variable):
            out[place] = environ[variable]
    return out


def load_settings(
    path: str | Path | None = None,
    *,
    overrides: dict[tuple[str, str], Any] | None = None,
    environ: dict[str, str] | None = None,
    backends: list[BackendSpec] | None = None,
) -> Settings:
    """Settings from flags (``overrides``), the environment, the TOML file and defaults.

    ``backends``: deployments given as flags; they replace the file's ``[[backends]]``
    before anything is checked, so the file's ``[[models]]`` may name them. Raises
    ConfigError for every problem (unknown keys in any section included)."""
    environ = dict(os.environ) if environ is None else environ
    path = path or environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        if not isinstance(path, str | Path):
            raise ConfigError(f"config path must be a str or Path, got {type(path).__name__}")
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: nesting deeper than the parser's stack (a hostile file)
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte or a surrogate in the path
            raise ConfigError(
                f"config file {str(path)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}"
            ) from None
    data = _merge(data, _environment(environ))
    data = _merge(data, overrides or {})
    if backends:
        # the file's own entries are still checked (a typo there is an error), then replaced
        convert(data.get("backends", []), list[BackendSpec], strict=False, label="invalid configuration: backends")
        data["backends"] = msgspec.to_builtins(backends)
    # strict=False lets environment strings ("2.5") become numbers where the schema says so.
    settings: Settings = convert(data, Settings, strict=False, label="invalid configuration: ")
    return settings
