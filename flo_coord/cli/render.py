"""Plain-text tables and value formatting for the terminal."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from flo_coord.redact import redact_secrets


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; ``right``: indexes of right-aligned columns."""
    cells = [[str(h) for h in headers]] + [["" if c is None else redact_secrets(str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def pairs(rows: Sequence[tuple[str, Any]]) -> str:
    """``key  value`` lines, keys aligned."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {'-' if v is None or v == '' else redact_secrets(str(v))}" for k, v in rows)


def shorten(text: str, limit: int = 60, *, tail: bool = False) -> str:
    text = text.replace("\n", "\\n")
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1) :] if tail else text[: limit - 1] + "…"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def clock(epoch_seconds: float | None) -> str:
    if epoch_seconds is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(epoch_seconds)) + f".{int(epoch_seconds * 1000) % 1000:03d}"
