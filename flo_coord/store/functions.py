"""Redis Functions: every script of the registry runs as a function of one library.

Why: a worker that may ``EVALSHA`` may also ``SCRIPT LOAD`` and run any Lua on its keys
(a busy loop blocks the server for every client). With Functions, an operator loads the
library once (``flo-coord install-functions``, or a worker whose credential may run
``FUNCTION LOAD``) and workers only ``FCALL`` it, so their ACL refuses ``EVAL``,
``EVALSHA`` and ``SCRIPT``.

The conversion is generic: each ``Script`` in ``flo_coord.store.scripts.registry()`` becomes
the function ``flo_<version>_<name>`` of the library ``flo_coord_<version>``, its body
wrapped as ``function(KEYS, ARGV) <source> end`` so the script text is unchanged and its
keys are declared exactly as with ``EVALSHA`` (``FCALL name numkeys keys... args...``, so
ACL key patterns and Cluster slot routing apply to them). ``<version>`` is a hash of the
library code: a worker of another release calls other names and never runs a library of
the wrong version; a worker that finds its version missing loads it (if allowed) or
raises ConfigError saying which command to run. Libraries of other versions stay until
``flo-coord install-functions --prune`` removes them (after a rolling upgrade).

Fallback: where Functions are unavailable (Redis < 7, or a server or proxy that does not
know ``FCALL``/``FUNCTION``) the shell switches to ``EVALSHA`` + ``SCRIPT LOAD`` of the same
scripts. That mode needs the older, wider ACL (docs/OPERATING.md).
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache
from typing import Any

import redis.exceptions as rex

from flo_coord.errors import ConfigError
from flo_coord.store.scripts import Script, registry, registry_version

log = logging.getLogger("flo_coord.functions")

#: Every library flo_coord loads is named with this prefix, then its version.
LIBRARY_PREFIX = "flo_coord_"
INSTALL_HINT = "run `flo-coord install-functions --redis URL` with a credential allowed FUNCTION LOAD"


@lru_cache(maxsize=4)
def _build(scripts: tuple[Script, ...]) -> tuple[str, str, dict[str, str]]:
    bodies = "\n".join(f"-- {s.name}\n{s.source}" for s in scripts)
    version = hashlib.sha1(bodies.encode()).hexdigest()[:12]
    names = {s.sha: f"flo_{version}_{re.sub(r'[^A-Za-z0-9_]', '_', s.name)}" for s in scripts}
    parts = [f"#!lua name={LIBRARY_PREFIX}{version}"]
    for s in scripts:
        parts.append(f"redis.register_function('{names[s.sha]}', function(KEYS, ARGV)\n{s.source}\nend)")
    return f"{LIBRARY_PREFIX}{version}", "\n".join(parts), names


_current: list[tuple[str, str, dict[str, str]]] = []
_built_for: list[tuple[int, int]] = [(-1, -1)]


def _library() -> tuple[str, str, dict[str, str]]:
    """The library of the registry, rebuilt only when the registry changed since."""
    version = registry_version()
    if not _current or _built_for[0] != version:
        _current[:] = [_build(registry())]
        _built_for[0] = version
    return _current[0]


def library() -> tuple[str, str]:
    """(library name, library code) for the scripts registered now."""
    name, code, _ = _library()
    return name, code


def function_name(script: Script) -> str:
    """The function that runs ``script`` (``flo_<version>_<name>``)."""
    names = _library()[2]
    if script.sha not in names:  # a script re-registered under a known name: rebuild
        _current.clear()
        names = _library()[2]
    try:
        return names[script.sha]
    except KeyError:
        raise ConfigError(f"script {script.name!r} is not in flo_coord.store.scripts' registry") from None


def client_rules() -> list[str]:
    """ACL rules letting a client FCALL only the functions submit and follow need (this version).

    Redis ACLs can allow FCALL by function name (``+fcall|<name>``); the names carry the
    library version, so these rules change with it (``install-functions`` prints them).
    """
    from flo_coord.store.scripts import FOLLOW_READ, READ

    return [f"+fcall|{function_name(READ)}", f"+fcall|{function_name(FOLLOW_READ)}"]


def is_missing(reply: Any) -> bool:
    """Redis does not have this script or function (yet): load it and send the call again."""
    if isinstance(reply, rex.NoScriptError):
        return True
    return isinstance(reply, rex.ResponseError) and ("function not found" in str(reply).lower() or _unsupported(reply))


def _unsupported(exc: BaseException) -> bool:
    message = str(exc).lower()
    return (
        isinstance(exc, rex.ResponseError)
        and "unknown command" in message
        and ("fcall" in message or "function" in message)
    )


def _noperm(exc: BaseException) -> ConfigError:
    name, _ = library()
    return ConfigError(
        f"the Redis Functions library {name} is not loaded and this credential may not load it ({exc}): " + INSTALL_HINT
    )


class Scripting:
    """How one shell runs the registry's scripts: ``FCALL`` (default) or ``EVALSHA`` (fallback)."""

    def __init__(self) -> None:
        self.functions = True
        # (command, function name or sha) per script: built once, not per call (the hot
        # path's arguments); valid for one registry version and one mode
        self._prefixes: dict[Script, tuple[str, str]] = {}
        self._prefixes_for = registry_version()

    @property
    def command(self) -> str:
        return "FCALL" if self.functions else "EVALSHA"

    def prefix(self, script: Script) -> tuple[str, str]:
        """``(command, target)`` that run ``script``: ``("FCALL", name)`` or ``("EVALSHA", sha)``."""
        version = registry_version()
        if version != self._prefixes_for:  # a script was added or removed: the names changed
            self._prefixes.clear()
            self._prefixes_for = version
        prefix = self._prefixes.get(script)
        if prefix is None:
            prefix = self._prefixes[script] = (self.command, function_name(script) if self.functions else script.sha)
        return prefix

    def args(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The whole command: ``FCALL name numkeys keys... args...`` (or ``EVALSHA sha ...``)."""
        return (*self.prefix(script), len(keys), *keys, *args)

    def _fall_back(self, exc: BaseException) -> bool:
        if self.functions and _unsupported(exc):
            log.warning("this Redis has no Functions (%s): running the scripts with EVALSHA instead", exc)
            self.functions = False
            self._prefixes.clear()
            return True
        return False

    def load(self, client: Any, missing: dict[Script, BaseException]) -> None:
        """Load what a reply said was missing (sync client)."""
        if any(self._fall_back(exc) for exc in missing.values()):
            return
        try:
            if self.functions:
                client.function_load(library()[1], replace=True)
            else:
                for script in missing:
                    client.script_load(script.source)
        except rex.NoPermissionError as exc:
            raise _noperm(exc) from exc
        except rex.ResponseError as exc:
            if not self._fall_back(exc):
                raise

    async def aload(self, client: Any, missing: dict[Script, BaseException]) -> None:
        """Load what a reply said was missing (asyncio client)."""
        if any(self._fall_back(exc) for exc in missing.values()):
            return
        try:
            if self.functions:
                await client.function_load(library()[1], replace=True)
            else:
                for script in missing:
                    await client.script_load(script.source)
        except rex.NoPermissionError as exc:
            raise _noperm(exc) from exc
        except rex.ResponseError as exc:
            if not self._fall_back(exc):
                raise


def ensure_loaded(client: Any, namespace: str) -> None:
    """Fail fast when this Redis lacks the library and the credential may not load it.

    Calls the read-only READ function on a probe key of ``namespace`` (a synchronous
    client): a missing library is loaded when allowed (else ConfigError naming
    ``install-functions``); a server without Functions switches to the EVALSHA fallback;
    an ACL refusing FCALL itself is a ConfigError too. A worker runs it at start.
    """
    from flo_coord.store.scripts import READ

    scripting = Scripting()
    keys = tuple(f"{namespace}:{{flo-probe}}:{kind}" for kind in ("ctx", "result", "text", "feed"))
    for _ in range(3):
        try:
            client.execute_command(*scripting.args(READ, keys, ()))
            return
        except rex.NoPermissionError as exc:
            raise ConfigError(
                f"this credential may not call flo_coord's functions ({exc}); see the worker ACL"
            ) from exc
        except rex.ResponseError as exc:
            if not is_missing(exc):
                raise
            scripting.load(client, {READ: exc})


def _libraries(client: Any) -> list[str]:
    listed = client.function_list(library=LIBRARY_PREFIX + "*")
    if isinstance(listed, dict):  # a Cluster client answers per node
        listed = [lib for node in listed.values() for lib in (node or [])]
    names = set()
    for lib in listed or []:
        fields = dict(zip(lib[::2], lib[1::2], strict=False)) if isinstance(lib, list) else dict(lib)
        name = fields.get(b"library_name", fields.get("library_name", b""))
        names.add(name.decode() if isinstance(name, bytes) else str(name))
    return sorted(names)


def install(client: Any, *, prune: bool = False) -> tuple[str, list[str]]:
    """Load the current library on ``client`` (every primary of a Cluster); an operator step.

    ``client``: a synchronous redis-py client whose user may run ``FUNCTION LOAD`` (and
    ``FUNCTION LIST``/``DELETE`` with ``prune``). ``prune=True`` deletes the flo_coord
    libraries of other versions (run it once no worker of an older release is left).
    Returns (the library loaded, the libraries deleted). Raises ConfigError when the
    server has no Functions or the credential may not load them.
    """
    name, code = library()
    try:
        client.function_load(code, replace=True)
        removed = [lib for lib in _libraries(client) if lib != name] if prune else []
        for lib in removed:
            client.function_delete(lib)
    except rex.NoPermissionError as exc:
        raise ConfigError(f"this credential may not manage Redis Functions: {exc}") from exc
    except rex.ResponseError as exc:
        if _unsupported(exc):
            raise ConfigError(
                f"this Redis has no Functions (Redis >= 7 needed): {exc}; workers fall back to EVALSHA scripts"
            ) from exc
        raise
    return name, removed
