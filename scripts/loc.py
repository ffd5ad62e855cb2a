#!/usr/bin/env python
"""Library size by layer: physical lines and code lines of every package of flo_coord.

    python scripts/loc.py [--json]

"Code lines" are lines that carry a Python token other than a comment or a docstring
(blank lines, comment lines and docstrings are not counted; a statement spread over
three lines counts three). The issue-12 target ("the library without ``testing/`` and
``cli/`` well under 5k lines") is read off the ``library`` row. Only the standard
library is used, so the figure is reproducible anywhere.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import pathlib
import tokenize

ROOT = pathlib.Path(__file__).resolve().parent.parent / "flo_coord"
#: Packages that are shipped but are not the library: the commands and the test tooling.
NOT_LIBRARY = ("cli", "testing")
_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str) and first.end_lineno is not None:
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def count(path: pathlib.Path) -> tuple[int, int]:
    """(physical lines, code lines) of one source file."""
    source = path.read_text(encoding="utf-8")
    docs = _docstring_lines(ast.parse(source))
    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _SKIP:
            code.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docs)
    return source.count("\n"), len(code)


def layer(path: pathlib.Path) -> str:
    """The package a file belongs to: ``store``, ``execution``, ... or ``flo_coord`` for top-level modules."""
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else "flo_coord"


def measure() -> dict[str, dict[str, int]]:
    """{layer: {"files", "lines", "code"}} plus ``library`` (all but cli/ and testing/) and ``total``."""
    table: dict[str, dict[str, int]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        lines, code = count(path)
        for name in (layer(path), "total") + (() if layer(path) in NOT_LIBRARY else ("library",)):
            row = table.setdefault(name, {"files": 0, "lines": 0, "code": 0})
            row["files"] += 1
            row["lines"] += lines
            row["code"] += code
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    table = measure()
    if parser.parse_args().json:
        print(json.dumps(table, indent=2))
        return
    print(f"{'layer':<12}{'files':>7}{'lines':>8}{'code':>8}")
    layers = sorted(name for name in table if name not in ("library", "total"))
    for name in [*layers, "library", "total"]:
        row = table[name]
        print(f"{name:<12}{row['files']:>7}{row['lines']:>8}{row['code']:>8}")


if __name__ == "__main__":
    main()
