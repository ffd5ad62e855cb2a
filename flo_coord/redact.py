"""Redaction of secrets: the one function every log line, stored error and CLI output goes through.

``redact_secrets(text)`` replaces, wherever they appear in ``text``:

- every secret registered with ``register_secret`` (the API keys a worker loaded), exactly;
- the password of a URL (``scheme://user:password@host`` becomes ``scheme://user:***@host``);
- ``Bearer <token>`` and ``Basic <token>`` credentials;
- the value after a credential-like name (``api_key``, ``apikey``, ``x-api-key``,
  ``authorization``, ``password``, ``secret``, ``token``, ``access_token``) followed by
  ``=`` or ``:``, quoted or not (JSON error bodies that echo the key);
- provider key shapes (``sk-...``, ``sk-ant-...``, ``hf_...``, ``gsk_...``, ``AIza...``).

Used by flo_coord.logs (every formatted line), the history and failure-reason recording
path (flo_coord.store.codec / core.fail) and the CLI (URLs and JSON/table output); backends.py
redacts adapter errors with it too. Replacement text is ``***``; the result never grows
a secret back and stays valid JSON when the input was (only characters inside a value are
replaced).
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

MASK = "***"

# scheme://user:password@ (user kept) or scheme://password@ (Redis URLs read a lone userinfo
# as the password): the userinfo ends at the last @ before the host.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)(?:([^\s:/@\"'<>]*):)?([^\s/@\"'<>]+)@")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=\-]{4,}")
_NAMED = re.compile(
    r"(?i)((?:x[-_])?(?:api[-_]?key|authorization|password|passwd|secret|access[-_]?token|refresh[-_]?token|token)"
    r"\\?[\"']?\s*[:=]\s*\\?[\"']?)(?!\*\*\*)(?:(bearer|basic)\s+)?([^\s\"'\\,;&}\]]+)"
)
_KEY_SHAPES = re.compile(
    r"\b(sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{8,}|gsk_[A-Za-z0-9]{8,}|AIza[0-9A-Za-z_\-]{20,})"
)

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def register_secret(value: str | None) -> None:
    """Redact ``value`` wherever it appears from now on (e.g. a backend's API key; 4+ chars)."""
    global _secrets
    if isinstance(value, str) and len(value) >= 4:
        with _lock:
            if value not in _secrets:  # longest first, so a key containing another is masked whole
                _secrets = tuple(sorted((*_secrets, value), key=len, reverse=True))


#: Header names whose values are credentials.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key"})


def register_backend_secrets(spec: Any) -> None:
    """Register the credentials a backend spec carries: its API key (read from ``api_key_env``)
    and the values of credential headers (``Bearer`` tokens by their token)."""
    env = getattr(spec, "api_key_env", None)
    if isinstance(env, str) and env:
        register_secret(os.environ.get(env))
    headers = getattr(spec, "headers", None)
    for name, value in (headers or {}).items() if isinstance(headers, dict) else ():
        if isinstance(name, str) and name.lower() in CREDENTIAL_HEADERS and isinstance(value, str):
            register_secret(value.split()[-1] if value.split() else value)


def _named(match: re.Match[str]) -> str:
    scheme = f"{match.group(2)} " if match.group(2) else ""
    return f"{match.group(1)}{scheme}{MASK}"


def redact_secrets(text: str) -> str:
    """``text`` with every credential replaced by ``***`` (see the module docstring)."""
    if not isinstance(text, str) or not text:
        return text
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}:{MASK}@", text)
    text = _NAMED.sub(_named, text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    return _KEY_SHAPES.sub(MASK, text)


def redact_url(url: str) -> str:
    """A URL safe to print: its password (if any) replaced by ``***``."""
    return redact_secrets(url)
