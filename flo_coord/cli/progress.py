"""The demo's live view: an ANSI-redrawn frame on a terminal, plain event lines otherwise."""

from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import TextIO

_COLORS = ("36", "35", "33", "34", "32", "96", "95", "93")
_RESET = "\x1b[0m"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def fit(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters (ANSI codes kept, colour reset at a cut)."""
    out, visible, at = [], 0, 0
    while at < len(line):
        match = _ANSI.match(line, at)
        if match:
            out.append(match.group())
            at = match.end()
            continue
        if visible >= width:
            return "".join(out) + _RESET
        out.append(line[at])
        visible += 1
        at += 1
    return "".join(out)


@dataclass
class RequestView:
    """What the view shows of one request (the demo updates it)."""

    request_id: str
    total_chars: int
    total_tokens: int
    chars: int = 0
    tokens: int = 0
    owner: str | None = None
    epoch: int = 0
    backend: str | None = None
    takeovers: int = 0
    failovers: list[str] = field(default_factory=list)
    done: bool = False
    ok: bool | None = None  # None until verified
    error: str | None = None


@dataclass
class WorkerView:
    worker_id: str
    pid: int
    killed: bool = False
    exited: int | None = None


class View:
    """Receives the demo's state; ``LiveView`` redraws it, ``LineView`` prints what changed."""

    def __init__(self, out: TextIO, title: str, requests: list[RequestView], workers: list[WorkerView]) -> None:
        self.out = out
        self.title = title
        self.requests = requests
        self.workers = workers
        self.events: list[tuple[float, str]] = []
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def event(self, text: str) -> None:
        self.events.append((self.elapsed(), text))

    def active(self, worker_id: str) -> int:
        return sum(1 for r in self.requests if not r.done and r.owner == worker_id)

    def progress(self) -> float:
        total = sum(r.total_chars for r in self.requests) or 1
        return sum(min(r.chars, r.total_chars) for r in self.requests) / total

    def refresh(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        self.refresh()


class LineView(View):
    """For logs and pipes: one line per event, and a progress line every ``every`` seconds."""

    def __init__(
        self, out: TextIO, title: str, requests: list[RequestView], workers: list[WorkerView], every: float = 1.0
    ) -> None:
        super().__init__(out, title, requests, workers)
        self.every = every
        self._printed_events = 0
        self._last_progress = -math.inf
        self._done: set[str] = set()
        print(self.title, file=self.out, flush=True)

    def _state(self, w: WorkerView) -> str:
        if w.killed:
            return "killed"
        return "exited" if w.exited is not None else str(self.active(w.worker_id))

    def _line(self, at: float, text: str) -> None:
        print(f"[{at:6.1f}s] {text}", file=self.out, flush=True)

    def refresh(self) -> None:
        for at, text in self.events[self._printed_events :]:
            self._line(at, text)
        self._printed_events = len(self.events)
        for r in self.requests:
            if r.done and r.request_id not in self._done:
                self._done.add(r.request_id)
                extra = f", {r.takeovers} takeover(s)" if r.takeovers else ""
                via = " → ".join([*r.failovers, r.backend or "?"]) if r.failovers else r.backend
                self._line(self.elapsed(), f"{r.request_id} finished: {r.tokens} tokens via {via} by {r.owner}{extra}")
        if self.elapsed() - self._last_progress >= self.every:
            self._last_progress = self.elapsed()
            done = sum(r.done for r in self.requests)
            workers = " · ".join(f"{w.worker_id} {self._state(w)}" for w in self.workers)
            self._line(
                self._last_progress,
                f"progress {self.progress():4.0%} · {done}/{len(self.requests)} done · owned: {workers}",
            )


class LiveView(View):
    """For a terminal: the whole frame redrawn in place with ANSI cursor movement."""

    BAR = 24
    EVENTS = 6

    def __init__(self, out: TextIO, title: str, requests: list[RequestView], workers: list[WorkerView]) -> None:
        super().__init__(out, title, requests, workers)
        self._drawn = 0
        self.out.write("\x1b[?25l")  # hide the cursor while redrawing

    def _color(self, worker_id: str | None, width: int = 0) -> str:
        shown = (worker_id or "-").ljust(width)
        index = next((i for i, w in enumerate(self.workers) if w.worker_id == worker_id), None)
        if index is None:
            return shown
        dead = self.workers[index].killed or self.workers[index].exited is not None
        color = "9;31" if dead else _COLORS[index % len(_COLORS)]  # a dead owner: red, struck through
        return f"\x1b[{color}m{shown}{_RESET}"

    def _worker_cell(self, w: WorkerView) -> str:
        if w.killed:
            return f"{self._color(w.worker_id)} \x1b[31m✖ SIGKILLed{_RESET}"
        if w.exited is not None:
            return f"{self._color(w.worker_id)} \x1b[31m✖ exited ({w.exited}){_RESET}"
        return f"{self._color(w.worker_id)} \x1b[32m●{_RESET} {self.active(w.worker_id)} active"

    def _request_line(self, r: RequestView) -> str:
        filled = round(self.BAR * min(r.chars, r.total_chars) / max(r.total_chars, 1))
        color = "32" if r.ok else "31" if r.ok is False or r.error else "37"
        bar = f"\x1b[{color}m{'█' * filled}{_RESET}{'░' * (self.BAR - filled)}"
        owner = self._color(r.owner, max(len(w.worker_id) for w in self.workers))
        notes = []
        if r.takeovers:
            notes.append(f"\x1b[33m↻ taken over{' x' + str(r.takeovers) if r.takeovers > 1 else ''}{_RESET}")
        if r.failovers:
            notes.append(f"\x1b[35m⚡ {' → '.join([*r.failovers, r.backend or '?'])}{_RESET}")
        if r.ok:
            notes.append("\x1b[32m✓ verified\x1b[0m")
        elif r.ok is False or r.error:
            notes.append(f"\x1b[31m✗ {r.error or 'mismatch'}{_RESET}")
        backend = (r.backend or "-").ljust(6)
        return (
            f"{r.request_id:<8} {bar} {r.tokens:>3}/{r.total_tokens:<3} {owner} e{r.epoch:<2} {backend} "
            + "  ".join(notes)
        )

    def _frame(self) -> list[str]:
        size = shutil.get_terminal_size((100, 40))
        workers = "   ".join(self._worker_cell(w) for w in self.workers)
        done = sum(r.done for r in self.requests)
        lines = [
            *(f"\x1b[1m{part}\x1b[0m" if i == 0 else part for i, part in enumerate(self.title.split("\n"))),
            f"{workers}      {done}/{len(self.requests)} done · {self.progress():.0%} · {self.elapsed():.1f}s",
            "",
        ]
        room = max(3, size.lines - len(lines) - self.EVENTS - 3)
        shown = self.requests if len(self.requests) <= room else self._busiest(room - 1)
        lines += [self._request_line(r) for r in shown]
        if len(shown) < len(self.requests):
            lines.append(f"… {len(self.requests) - len(shown)} more requests not shown (terminal too short)")
        lines.append("")
        lines += [f"  {at:6.1f}s  {text}" for at, text in self.events[-self.EVENTS :]]
        return [fit(line, size.columns - 1) for line in lines]  # never wrap: wrapping breaks the redraw

    def _busiest(self, count: int) -> list[RequestView]:
        unfinished = [r for r in self.requests if not r.done]
        return (unfinished + [r for r in self.requests if r.done])[:count]

    def refresh(self) -> None:
        lines = self._frame()
        parts = [f"\x1b[{self._drawn}F"] if self._drawn else []
        parts += [line + "\x1b[K\n" for line in lines]
        if self._drawn > len(lines):
            parts.append("\x1b[J")
        self.out.write("".join(parts))
        self.out.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        self.refresh()
        self.out.write("\x1b[?25h")
        self.out.flush()
