"""The store is the only way to Redis (issue 12): a static check of the layers.

Code above the store (every module of flo_coord outside flo_coord/store/: execution/,
gateway/, cli/, testing/, ownership, metrics, settings...) may import from the store only
the names of its public surface (``flo_coord.store.__all__``, and the facades from
``flo_coord.store.facade``), must not touch a manager's ``core``, ``shell`` or Redis client
(``.redis`` / ``.client``), and must not build Redis calls (``Cmd`` / ``Eval``). The store in
turn imports nothing above it (no import cycle through ownership or the execution layer).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import flo_coord
import flo_coord.store

PACKAGE = Path(flo_coord.__file__).parent
STORE = PACKAGE / "store"
#: What code above the store may import from flo_coord.store.facade.
FACADE_PUBLIC = frozenset({"FailoverManager", "AsyncFailoverManager"})
#: Attributes of the store's internals: nothing above the store reads them, of anything.
INTERNALS = frozenset({"core", "shell"})
#: A manager's Redis client, under either name.
CLIENTS = frozenset({"redis", "client"})
#: The sans-I/O call types: only the store builds Redis calls.
CALL_TYPES = frozenset({"Cmd", "Eval"})
#: The modules below the store, the only flo_coord modules the store may import.
BELOW_STORE = frozenset(
    {
        "flo_coord.errors",
        "flo_coord.models",
        "flo_coord.constraints",
        "flo_coord.defaults",
        "flo_coord.redact",
        "flo_coord.logs",
    }
)


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module an ImportFrom names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = _module_of(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _names_a_manager(node: ast.expr) -> bool:
    """``manager``, ``self.manager``, ``worker.manager``, ``mgr``...: an expression that names a manager."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "manager" in name.lower() or name == "mgr"


def violations(source: str, path: Path) -> list[str]:
    """Every way ``source`` (the module at ``path``, above the store) reaches into the store."""
    public = set(flo_coord.store.__all__)
    found: list[str] = []

    def say(node: ast.AST, what: str) -> None:
        found.append(f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            names = [alias.name for alias in node.names]
            allowed = public if module == "flo_coord.store" else FACADE_PUBLIC
            if module in ("flo_coord.store", "flo_coord.store.facade"):
                if set(names) - allowed:
                    say(node, f"imports {sorted(set(names) - allowed)} from {module}, not its public names")
            elif module.startswith("flo_coord.store."):
                say(node, f"imports store internals from {module}")
            elif module == "flo_coord" and "store" in names:
                say(node, "imports the store package as a name (use its public names)")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("flo_coord.store"):
                    say(node, f"imports module {alias.name}")
        elif isinstance(node, ast.Attribute):
            if node.attr in INTERNALS:
                say(node, f"reads .{node.attr}")
            elif node.attr in CLIENTS and _names_a_manager(node.value):
                say(node, f"reads a manager's Redis client (.{node.attr})")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in CALL_TYPES:
                say(node, f"builds a Redis call ({name})")
    return found


def _above_the_store() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if STORE not in p.parents)


def test_the_public_surface_is_explicit_and_importable() -> None:
    assert flo_coord.store.__all__, "flo_coord.store must list its public names"
    missing = [name for name in flo_coord.store.__all__ if not hasattr(flo_coord.store, name)]
    assert missing == []


def test_nothing_above_the_store_reaches_into_it() -> None:
    files = _above_the_store()
    assert {"ownership.py", "metrics.py", "coordinator.py", "app.py", "client.py", "fakellm.py"} <= {
        f.name for f in files
    }
    found = [v for path in files for v in violations(path.read_text(encoding="utf-8"), path)]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "from flo_coord.store.core import Cmd",
        "from flo_coord.store import core",
        "from flo_coord.store.facade import _Facade",
        "import flo_coord.store.shell",
        "from ..store import keys",
        "from .. import store",
        "from flo_coord import store",
        "x = self.manager.core.keys",
        "await self.manager.shell.run(op, 'x')",
        "await manager.redis.get('k')",
        "worker.manager.client.ping()",
        "op = Cmd(('GET', 'k'))",
        "op = core_mod.Eval(script, (), ())",
    ],
)
def test_each_kind_of_reach_is_found(source: str) -> None:
    assert len(violations(source, PACKAGE / "execution" / "example.py")) == 1


@pytest.mark.parametrize(
    "source",
    [
        "from flo_coord.store import AsyncFailoverManager, Submission, validation",
        "from flo_coord.store.facade import AsyncFailoverManager",
        "url = settings.redis.url",  # a setting named redis is not a client
        "self.client = httpx.AsyncClient()",
        "await manager.queue.submit(submission)",
    ],
)
def test_public_use_is_not_flagged(source: str) -> None:
    assert violations(source, PACKAGE / "execution" / "example.py") == []


def test_the_store_imports_nothing_above_it() -> None:
    """No cycle through the layers above (the heartbeat once imported ownership from the facade)."""
    found = []
    for path in sorted(STORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules: list[str] = []
            if isinstance(node, ast.ImportFrom):
                module = _absolute(node, path)
                modules = [f"{module}.{a.name}" for a in node.names] if module == "flo_coord" else [module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            for module in modules:
                inside = module == "flo_coord.store" or module.startswith("flo_coord.store.")
                if module.startswith("flo_coord") and not inside and module not in BELOW_STORE:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: imports {module}")
    assert found == [], "\n".join(found)
