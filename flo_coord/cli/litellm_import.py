"""Translate a LiteLLM proxy ``config.yaml`` into flo_coord TOML (``flo-coord import-litellm``).

The common subset maps one to one:

- ``model_list[]``: one ``[[backends]]`` deployment per entry (named ``<model_name>-<n>``),
  ``litellm_params.model`` ``provider/model`` giving the provider and wire kind,
  ``api_base`` the base_url, ``api_key: os.environ/NAME`` the api_key_env, ``weight``
  and ``order`` the deployment's weight and tier in the ``[[models]]`` group of its
  ``model_name``; ``stream_timeout`` of every entry (the smallest) ``first_token_timeout``;
- ``fallbacks`` / ``context_window_fallbacks`` (under ``router_settings`` or
  ``litellm_settings``): each group's lists;
- ``num_retries``: ``[failover] max_retries``; ``timeout`` / ``request_timeout``:
  ``[failover] failover_timeout``; ``retry_after``: ``[executor] backoff_initial``;
  ``allowed_fails``: ``[breaker] threshold``; ``cooldown_time``: ``[breaker] cooldown``.

Everything else is listed as untranslated, key by key, never silently dropped. A literal
``api_key`` is never copied (it names the key's place, not its value). Needs PyYAML.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from flo_coord.errors import ConfigError

__all__ = ["PROVIDERS", "Translation", "translate"]

#: LiteLLM provider prefix -> (ServingBackend, flo_coord kind, default base_url or None)
PROVIDERS: dict[str, tuple[str, str, str | None]] = {
    "openai": ("OpenAI", "openai", None),
    "text-completion-openai": ("OpenAI", "openai", None),
    "anthropic": ("Anthropic", "anthropic", None),
    "groq": ("Groq", "openai", None),
    "together_ai": ("Together", "openai", None),
    "fireworks_ai": ("Fireworks", "openai", None),
    "hosted_vllm": ("Vllm", "openai", None),
    "vllm": ("Vllm", "openai", None),
    "ollama": ("Ollama", "ollama", "http://localhost:11434"),
    "ollama_chat": ("Ollama", "ollama", "http://localhost:11434"),
    "llamafile": ("Llamafile", "openai", "http://localhost:8080/v1"),
    "huggingface": ("HuggingFace", "openai", None),
    "anyscale": ("Anyscale", "openai", "https://api.endpoints.anyscale.com/v1"),
}
#: models LiteLLM routes to a provider without a prefix
_BARE = (("claude", "anthropic"), ("gpt-", "openai"), ("o1", "openai"), ("o3", "openai"), ("o4", "openai"))
_ENV = re.compile(r"^os\.environ/([A-Za-z_][A-Za-z0-9_]*)$")
_DEPLOYMENT_KEYS = {"model", "api_base", "api_key", "weight", "order", "stream_timeout"}


class Translation:
    """The TOML text (``toml``) and the untranslated keys with the reason for each (``skipped``)."""

    def __init__(self) -> None:
        self.skipped: list[str] = []
        self.sections: dict[str, dict[str, Any]] = {}
        self.backends: list[dict[str, Any]] = []
        self.models: dict[str, dict[str, Any]] = {}

    def skip(self, key: str, why: str = "no flo_coord equivalent") -> None:
        self.skipped.append(f"{key}: {why}")

    @property
    def toml(self) -> str:
        out = ["# flo_coord configuration translated from a LiteLLM config.yaml by `flo-coord import-litellm`"]
        for section, values in self.sections.items():
            out += ["", f"[{section}]", *(f"{k} = {_value(v)}" for k, v in values.items())]
        for backend in self.backends:
            out += ["", "[[backends]]", *(f"{k} = {_value(v)}" for k, v in backend.items())]
        for group in self.models.values():
            out += ["", "[[models]]", *(f"{k} = {_value(v)}" for k, v in group.items() if v != [])]
        return "\n".join(out) + "\n"


def _value(value: Any) -> str:
    """A TOML value: JSON's strings and numbers are TOML's; lists and inline tables built here."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value, ensure_ascii=False)


def translate(config: Any) -> Translation:
    """The flo_coord equivalent of a parsed LiteLLM config (a dict from ``yaml.safe_load``).

    Raises ConfigError when it is not a mapping with a ``model_list`` list.
    """
    if not isinstance(config, dict) or not isinstance(config.get("model_list"), list):
        raise ConfigError("not a LiteLLM config: expected a mapping with a model_list list")
    result = Translation()
    for index, entry in enumerate(config["model_list"]):
        _deployment(result, index, entry)
    for name in ("router_settings", "litellm_settings"):
        settings = config.get(name) or {}
        if not isinstance(settings, dict):
            result.skip(name, "not a mapping")
            continue
        for key, value in settings.items():
            _setting(result, f"{name}.{key}", key, value)
    for key in config:
        if key not in ("model_list", "router_settings", "litellm_settings"):
            result.skip(key)
    _check_fallbacks(result)
    return result


def _provider(model: str) -> tuple[str, str, str, str | None] | None:
    """(ServingBackend, kind, model id, default base_url) for a LiteLLM ``model``; None if unsupported."""
    prefix, sep, rest = model.partition("/")
    if sep and prefix in PROVIDERS:
        backend, kind, base = PROVIDERS[prefix]
        return backend, kind, rest, base
    if sep:
        return None
    for start, prefix in _BARE:
        if model.startswith(start):
            backend, kind, base = PROVIDERS[prefix]
            return backend, kind, model, base
    return None


def _deployment(result: Translation, index: int, entry: Any) -> None:
    where = f"model_list[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("model_name"), str):
        result.skip(where, "needs a model_name and litellm_params")
        return
    params = entry.get("litellm_params")
    model = params.get("model") if isinstance(params, dict) else None
    provider = _provider(model) if isinstance(model, str) else None
    if provider is None:
        result.skip(f"{where} ({entry['model_name']})", f"provider of model {model!r} is not supported; entry left out")
        return
    assert isinstance(params, dict)
    backend, kind, model_id, base = provider
    empty: dict[str, Any] = {"deployments": [], "fallbacks": [], "context_window_fallbacks": []}
    group = result.models.setdefault(entry["model_name"], {"name": entry["model_name"], **empty})
    name = f"{_slug(entry['model_name'])}-{len(group['deployments']) + 1}"
    spec: dict[str, Any] = {"name": name, "provider": backend, "kind": kind}
    api_base = params.get("api_base") or base
    if api_base:
        spec["base_url"] = api_base
    spec["model"] = model_id
    key = params.get("api_key")
    if isinstance(key, str) and _ENV.match(key):
        spec["api_key_env"] = _ENV.match(key)[1]  # type: ignore[index]
    elif key is not None:
        result.skip(f"{where}.litellm_params.api_key", "a literal key is not copied: use os.environ/NAME")
    result.backends.append(spec)
    member: dict[str, Any] = {"name": name}
    if isinstance(params.get("weight"), int | float) and not isinstance(params.get("weight"), bool):
        member["weight"] = float(params["weight"])
    if isinstance(params.get("order"), int) and params["order"] >= 1:
        member["tier"] = params["order"]
    group["deployments"].append(member if len(member) > 1 else name)
    if isinstance(params.get("stream_timeout"), int | float):
        executor = result.sections.setdefault("executor", {})
        executor["first_token_timeout"] = float(min(params["stream_timeout"], executor.get("first_token_timeout", 1e9)))
    for extra in params:
        if extra not in _DEPLOYMENT_KEYS:
            result.skip(f"{where}.litellm_params.{extra}")
    for extra in entry:
        if extra not in ("model_name", "litellm_params"):
            result.skip(f"{where}.{extra}")


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "model"
    return slug[:56]


def _number(section: str, key: str, cast: Callable[[Any], Any]) -> Callable[[Translation, Any], None]:
    def apply(result: Translation, value: Any) -> None:
        result.sections.setdefault(section, {})[key] = cast(value)

    return apply


_SETTINGS: dict[str, Callable[[Translation, Any], None]] = {
    "num_retries": _number("failover", "max_retries", int),
    "timeout": _number("failover", "failover_timeout", float),
    "request_timeout": _number("failover", "failover_timeout", float),
    "retry_after": _number("executor", "backoff_initial", float),
    "allowed_fails": _number("breaker", "threshold", int),
    "cooldown_time": _number("breaker", "cooldown", float),
}
#: routing strategies flo_coord's weight + in-flight choice stands in for
_ROUTING = {"simple-shuffle", "least-busy"}


def _setting(result: Translation, where: str, key: str, value: Any) -> None:
    if key in ("fallbacks", "context_window_fallbacks"):
        _fallbacks(result, where, key, value)
    elif key == "routing_strategy" and value in _ROUTING:
        return  # weight (simple-shuffle) and in-flight count (least-busy) are how flo_coord picks
    elif key in _SETTINGS and isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        _SETTINGS[key](result, value)
    else:
        result.skip(where)


def _fallbacks(result: Translation, where: str, key: str, value: Any) -> None:
    """``[{"gpt-4o": ["claude", ...]}, ...]`` into each group's ``fallbacks``/``context_window_fallbacks``."""
    if not isinstance(value, list):
        result.skip(where, "expected a list of {model: [fallbacks]}")
        return
    for item in value:
        pairs = item.items() if isinstance(item, dict) else []
        for model, targets in pairs:
            group = result.models.get(model)
            if group is None or not isinstance(targets, list):
                result.skip(f"{where}.{model}", "not a model_name of model_list")
                continue
            group[key] += [t for t in targets if t not in group[key]]


def _check_fallbacks(result: Translation) -> None:
    for group in result.models.values():
        for key in ("fallbacks", "context_window_fallbacks"):
            unknown = [t for t in group[key] if t not in result.models]
            for target in unknown:
                result.skip(f"{key} of {group['name']}: {target}", "not a model_name of model_list")
            group[key] = [t for t in group[key] if t in result.models]
