"""``flo-coord demo``: crash a worker mid-stream and show that every answer still arrives, byte for byte.

It starts a Redis (embedded unless ``--redis-url``), a fake LLM server with two backends
(Vllm and Ollama on one port), and worker processes (``flo-coord worker``); submits a batch
of streaming requests; follows them all; SIGKILLs the worker owning the most active
requests once the answers are ``--kill-at`` done (and with ``--backend-fault`` cuts some
Vllm streams mid-answer); then checks every answer against ``full_answer_text(prompt)``,
both as followed live and as re-read from Redis, and prints a summary. Everything it
started is stopped on the way out, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from flo_coord.cli import render
from flo_coord.cli.common import CommandFailedError, UsageError, check_redis, redact, setup_logging
from flo_coord.cli.progress import LineView, LiveView, RequestView, View, WorkerView

VLLM_MODEL = "demo-vllm"
OLLAMA_MODEL = "demo-ollama"
FOLLOW_WAIT = 30.0  # seconds a follower waits for its request to be taken by a worker
TICK = 0.2


@dataclass
class Track:
    """One request of the demo: what was asked, what arrived, and what happened to it."""

    view: RequestView
    prompt: str
    expected: str
    token_ends: list[int]  # character offset where each answer token ends
    received: str = ""
    outcome: str | None = None
    replay_ok: bool = False
    victim: bool = False
    chars_at_kill: int | None = None
    first_commit_after_kill: float | None = None  # monotonic

    @property
    def request_id(self) -> str:
        return self.view.request_id

    def tokens_in(self, chars: int) -> int:
        return sum(1 for end in self.token_ends if end <= chars)


@dataclass
class Stats:
    takeovers: int = 0
    failovers: int = 0
    recovered_chars: int = 0
    recovered_tokens: int = 0
    claim_latencies: list[float] = field(default_factory=list)
    killed: str | None = None
    killed_at: float | None = None  # seconds since the view started
    kill_wall: float | None = None
    kill_mono: float | None = None
    victims: int = 0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Demo:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.namespace = args.namespace or f"demo-{uuid.uuid4().hex[:8]}"
        self.redis_url: str = args.redis_url or ""
        self.redis_server: Any = None
        self.redis_label = ""
        self.fake: Any = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logdir: str | None = None  # created with the first worker
        self.tracks: list[Track] = []
        self.stats = Stats()
        self.view: View | None = None
        self.history_id = "0-0"
        self.pids: dict[str, int] = {}
        self._clock_offset = 0.0  # Redis clock minus ours, for claim latencies from history timestamps

    # ------------------------------------------------------------ processes

    def start(self) -> None:
        from flo_coord.embedded import RedisServer, start_embedded_redis
        from flo_coord.fakellm import FakeLLMServerThread

        if self.redis_url:
            check_redis(self.redis_url)
            self._require_unused_namespace()
            self.redis_label = f"{redact(self.redis_url)} (namespace {self.namespace})"
        else:
            self.redis_server = start_embedded_redis()
            self.redis_url = self.redis_server.url
            kind = "redis-server" if isinstance(self.redis_server, RedisServer) else "fakeredis"
            self.redis_label = f"embedded {kind} on port {self.redis_server.port}"
            if isinstance(self.redis_server, RedisServer) and self.redis_server.pid:
                self.pids["redis-server"] = self.redis_server.pid
        self.fake = FakeLLMServerThread(token_delay=self.args.token_delay, n_tokens=self.args.tokens).start()
        for i in range(1, self.args.workers + 1):
            self._spawn_worker(f"w{i}")

    def _spawn_worker(self, worker_id: str) -> None:
        if self.logdir is None:
            self.logdir = tempfile.mkdtemp(prefix="flo-demo-")
        base = self.fake.base_url
        concurrency = max(1, math.ceil(self.args.requests / self.args.workers))
        command = [
            sys.executable, "-m", "flo_coord", "worker",
            "--redis-url", self.redis_url,
            "--namespace", self.namespace,
            "--worker-id", worker_id,
            "--lease-ttl", str(self.args.lease_ttl),
            "--concurrency", str(concurrency),
            "--grace", "1",
            "--backend", f"Vllm={base},{VLLM_MODEL}",
            "--backend", f"Ollama={base},{OLLAMA_MODEL},ollama",
            "--exit-with-parent",
            "--log-level", "info",
        ]  # fmt: skip
        # The demo is self-contained: the user's FLO_* settings (a config file...) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(os.path.join(self.logdir, f"{worker_id}.log"), "ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only the demo, which stops them in order
            )
        self.procs[worker_id] = proc
        self.pids[worker_id] = proc.pid

    def log_tail(self, worker_id: str, lines: int = 8) -> str:
        if self.logdir is None:
            return ""
        try:
            with open(os.path.join(self.logdir, f"{worker_id}.log"), encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Stop everything this demo started. Idempotent; safe after a partial start."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.fake is not None:
            self.fake.stop()
            self.fake = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
        elif self.redis_url:
            self._drop_namespace()

    def finish_logs(self, keep: bool) -> None:
        """Keep the workers' logs (and say where) or remove them."""
        if self.logdir is None:
            return
        if keep:
            print(f"worker logs kept in {self.logdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)

    def _require_unused_namespace(self) -> None:
        """Against a user's Redis, the demo runs only in a namespace nobody uses (its request ids would collide)."""
        from flo_coord.connection import connect

        client = connect(self.redis_url, timeout=3.0)
        try:
            used = next(iter(client.scan_iter(match=f"{self.namespace}:*", count=1000)), None)
        finally:
            client.close()
        if used is not None:
            raise UsageError(
                f"namespace {self.namespace!r} on {redact(self.redis_url)} already holds keys; "
                "give an unused --namespace, or none (the demo then makes up its own)"
            )

    def _drop_namespace(self) -> None:
        """Against a user's Redis: delete the keys of the namespace the demo made up (never a given one)."""
        if self.args.namespace:
            return
        with contextlib.suppress(Exception):
            from flo_coord.connection import connect

            client = connect(self.redis_url, timeout=3.0)
            try:
                keys = list(client.scan_iter(match=f"{self.namespace}:*", count=1000))
                for i in range(0, len(keys), 500):
                    client.delete(*keys[i : i + 500])
            finally:
                client.close()

    # ------------------------------------------------------------------- run

    def _make_tracks(self) -> None:
        from flo_coord.fakellm import full_answer

        for i in range(1, self.args.requests + 1):
            prompt = f"Question {i}: how does a fenced lease keep stream {i} exactly-once across a crash?"
            tokens = full_answer(prompt, self.args.tokens)
            ends, at = [], 0
            for token in tokens:
                at += len(token)
                ends.append(at)
            expected = "".join(tokens)
            view = RequestView(f"req-{i:02d}", total_chars=len(expected), total_tokens=len(tokens))
            self.tracks.append(Track(view=view, prompt=prompt, expected=expected, token_ends=ends))

    def _make_view(self) -> View:
        tty = sys.stdout.isatty() and not self.args.plain and os.environ.get("TERM") != "dumb"
        fault = " · Vllm streams cut mid-answer" if self.args.backend_fault else ""
        title = (
            f"flo-coord demo · {self.args.requests} requests · {self.args.workers} workers · "
            f"lease {self.args.lease_ttl:g}s\nRedis: {self.redis_label} · fake LLM: {self.fake.base_url} "
            f"(backends Vllm, Ollama){fault}"
        )
        workers = [WorkerView(wid, proc.pid) for wid, proc in self.procs.items()]
        cls = LiveView if tty else LineView
        return cls(sys.stdout, title, [t.view for t in self.tracks], workers)

    async def run(self) -> bool:
        from flo_coord.manager import AsyncFailoverManager

        self._make_tracks()
        manager = AsyncFailoverManager(url=self.redis_url, namespace=self.namespace, worker_id="demo-client")
        try:
            await self._wait_for_workers()
            self.view = self._make_view()
            started = ", ".join(f"{name} (pid {pid})" for name, pid in self.pids.items())
            self._event(f"started {started}")
            if self.args.backend_fault:
                await self._inject_fault()
            await self._submit_all(manager)
            followers = [asyncio.create_task(self._follow(manager, t)) for t in self.tracks]
            try:
                await self._monitor(manager, followers)
            finally:
                for task in followers:
                    task.cancel()
                await asyncio.gather(*followers, return_exceptions=True)
            await self._poll_history(manager)
            await self._verify(manager)
            self.view.refresh()
        finally:
            if self.view is not None:
                self.view.close()
            await manager.aclose()
        return all(t.view.ok for t in self.tracks)

    async def _wait_for_workers(self, timeout: float = 30.0) -> None:
        """Until every worker says it is ready (so they share the batch), or one dies."""
        deadline = time.monotonic() + timeout
        waiting = set(self.procs)
        while waiting:
            for worker_id in sorted(waiting):
                proc = self.procs[worker_id]
                if proc.poll() is not None:
                    raise CommandFailedError(
                        f"worker {worker_id} exited with code {proc.returncode} while starting:\n"
                        f"{self.log_tail(worker_id)}"
                    )
                if f"ready: worker {worker_id} " in self.log_tail(worker_id, 50):
                    waiting.discard(worker_id)
            if time.monotonic() > deadline:
                raise CommandFailedError(f"workers {sorted(waiting)} did not start within {timeout:g}s")
            await asyncio.sleep(0.05)

    async def _inject_fault(self) -> None:
        """Cut a quarter of the Vllm streams a third of the way in (through the fake's admin endpoint)."""
        import httpx

        cut_at = max(2, self.args.tokens // 3)
        times = max(1, math.ceil(self.args.requests / 4))
        spec = f"cut:{cut_at}*{times}"
        async with httpx.AsyncClient() as client:
            reply = await client.post(f"{self.fake.base_url}/_faults", json={"model": VLLM_MODEL, "fault": spec})
            reply.raise_for_status()
        self._event(f"fault set: the next {times} Vllm streams are cut after {cut_at} tokens ({spec})")

    async def _submit_all(self, manager: Any) -> None:
        from flo_coord import queue

        for t in self.tracks:
            submission = queue.Submission(request_id=t.request_id, prompt=t.prompt)
            await manager.shell.run(queue.submit(manager.core, submission), "submit", t.request_id)
        self._event(f"submitted {len(self.tracks)} requests")

    async def _follow(self, manager: Any, t: Track) -> None:
        from flo_coord.delivery import follow
        from flo_coord.errors import RequestFailedError

        try:
            async for chunk in follow(manager, t.request_id, len(t.received), wait=FOLLOW_WAIT):
                t.received += chunk
                t.view.chars = len(t.received)
                t.view.tokens = t.tokens_in(len(t.received))
                first_after_kill = t.chars_at_kill is not None and len(t.received) > t.chars_at_kill
                if first_after_kill and t.first_commit_after_kill is None:
                    t.first_commit_after_kill = time.monotonic()
        except RequestFailedError as exc:
            t.view.error = str(exc)[:60]
        t.view.done = True

    def _event(self, text: str) -> None:
        if self.view is not None:
            self.view.event(text)

    async def _monitor(self, manager: Any, followers: list[asyncio.Task[None]]) -> None:
        deadline = time.monotonic() + self.args.timeout
        while not all(task.done() for task in followers):
            if time.monotonic() > deadline:
                raise CommandFailedError(f"the demo did not finish within {self.args.timeout:g}s")
            await self._poll_contexts(manager)
            await self._poll_history(manager)
            self._check_workers()
            if self._should_kill():
                await self._kill_busiest(manager)
            assert self.view is not None
            self.view.refresh()
            await asyncio.sleep(TICK)

    async def _poll_contexts(self, manager: Any) -> None:
        live = [t for t in self.tracks if not t.view.done]
        contexts = await asyncio.gather(*(manager.get_context(t.request_id) for t in live))
        for t, ctx in zip(live, contexts, strict=True):
            if ctx is not None:
                t.view.owner, t.view.epoch = ctx.owner, ctx.epoch
                t.view.backend = ctx.current_backend or t.view.backend

    async def _poll_history(self, manager: Any) -> None:
        from flo_coord.codec import decode_history, pairs, text
        from flo_coord.models import Takeover

        entries = await manager.redis.xrange(manager.core.keys.history, min=self.history_id, max="+", count=500)
        by_id = {t.request_id: t for t in self.tracks}
        for entry_id, fields in entries:
            entry_id = text(entry_id)
            if entry_id == self.history_id:
                continue
            self.history_id = entry_id
            entry = decode_history(pairs(fields).get("e", ""))
            t = by_id.get(entry.request_id or "") if entry is not None else None
            if entry is None or t is None:
                continue
            if isinstance(entry, Takeover):
                self._on_takeover(t, entry)
            elif entry.result is not None and entry.result.is_failure():
                self.stats.failovers += 1
                t.view.failovers.append(str(entry.backend))
                reason = re.sub(r"^backend \S+ \(model [^)]*\): ", "", entry.result.message or entry.result.name)
                self._event(
                    f"{t.request_id}: {entry.backend} failed on {entry.worker_id} "
                    f"({render.shorten(reason, 48)}); failing over to the next backend"
                )
            elif entry.result is not None:
                t.view.backend = str(entry.backend)

    def _on_takeover(self, t: Track, entry: Any) -> None:
        tokens = t.tokens_in(entry.prefix_chars)
        self.stats.takeovers += 1
        self.stats.recovered_chars += entry.prefix_chars
        self.stats.recovered_tokens += tokens
        if self.stats.kill_wall is not None:
            self.stats.claim_latencies.append(entry.at - self.stats.kill_wall - self._clock_offset)
        t.view.takeovers += 1
        t.view.owner, t.view.epoch = entry.new_owner, entry.epoch
        self._event(
            f"{entry.new_owner} took over {t.request_id} from {entry.old_owner} at epoch {entry.epoch}: "
            f"{tokens} tokens ({entry.prefix_chars} chars) carried over"
        )

    def _check_workers(self) -> None:
        assert self.view is not None
        for w in self.view.workers:
            code = self.procs[w.worker_id].poll()
            if code is not None and not w.killed and w.exited is None:
                w.exited = code
                self._event(f"worker {w.worker_id} exited unexpectedly (code {code}); its requests will be taken over")

    def _should_kill(self) -> bool:
        if self.args.no_kill or self.stats.killed is not None or self.view is None:
            return False
        return self.view.progress() >= self.args.kill_at

    async def _kill_busiest(self, manager: Any) -> None:
        from flo_coord.cli.common import redis_time

        assert self.view is not None
        alive = [w for w in self.view.workers if not w.killed and w.exited is None]
        if len(alive) < 2:
            return  # nobody would be left to take over
        busiest = max(alive, key=lambda w: self.view.active(w.worker_id))  # type: ignore[union-attr]
        victims = [t for t in self.tracks if not t.view.done and t.view.owner == busiest.worker_id]
        if not victims:
            return
        self.procs[busiest.worker_id].send_signal(signal.SIGKILL)
        self.stats.kill_mono, self.stats.kill_wall = time.monotonic(), time.time()
        self.stats.killed, self.stats.killed_at, self.stats.victims = (
            busiest.worker_id,
            self.view.elapsed(),
            len(victims),
        )
        busiest.killed = True
        self._event(f"SIGKILL {busiest.worker_id} (pid {busiest.pid}) while it owned {len(victims)} active requests")
        with contextlib.suppress(Exception):
            self._clock_offset = await redis_time(manager) - time.time()
        contexts = await asyncio.gather(*(manager.get_context(t.request_id) for t in victims))
        for t, ctx in zip(victims, contexts, strict=True):
            t.victim = True
            committed = len(ctx.generated_prefix) if ctx is not None else len(t.received)
            t.chars_at_kill = max(committed, 0)
            if len(t.received) > committed and t.first_commit_after_kill is None:
                t.first_commit_after_kill = time.monotonic()

    async def _verify(self, manager: Any) -> None:
        """Each answer as followed live, and as re-read from Redis from offset 0, must equal the expected text."""
        from flo_coord.delivery import follow

        async def replay(t: Track) -> str:
            return "".join([chunk async for chunk in follow(manager, t.request_id, 0)])

        outcomes = await asyncio.gather(*(manager.outcome(t.request_id) for t in self.tracks))
        replays = await asyncio.gather(*(replay(t) for t in self.tracks), return_exceptions=True)
        for t, outcome, again in zip(self.tracks, outcomes, replays, strict=True):
            t.outcome = outcome.state if outcome is not None else None
            t.replay_ok = again == t.expected
            t.view.ok = t.outcome == "Completed" and t.received == t.expected and t.replay_ok
            if not t.view.ok and not t.view.error:
                t.view.error = "answer differs" if t.outcome == "Completed" else f"outcome {t.outcome}"

    # --------------------------------------------------------------- summary

    def latencies(self) -> list[float]:
        kill = self.stats.kill_mono
        return [t.first_commit_after_kill - kill for t in self.tracks if kill and t.first_commit_after_kill]

    def summary(self, wall: float) -> dict[str, Any]:
        verified = sum(1 for t in self.tracks if t.view.ok)
        latencies, claims = self.latencies(), self.stats.claim_latencies
        return {
            "ok": verified == len(self.tracks),
            "requests": len(self.tracks),
            "verified": verified,
            "wrong": [t.request_id for t in self.tracks if not t.view.ok],
            "workers": len(self.procs),
            "killed_worker": self.stats.killed,
            "killed_at": self.stats.killed_at,
            "requests_owned_by_killed_worker": self.stats.victims,
            "takeovers": self.stats.takeovers,
            "backend_failovers": self.stats.failovers,
            "tokens_recovered": self.stats.recovered_tokens,
            "chars_recovered": self.stats.recovered_chars,
            "takeover_latency_p50": percentile(latencies, 0.50),
            "takeover_latency_p99": percentile(latencies, 0.99),
            "claim_latency_p50": percentile(claims, 0.50),
            "claim_latency_p99": percentile(claims, 0.99),
            "lease_ttl": self.args.lease_ttl,
            "wall_seconds": wall,
            "namespace": self.namespace,
            "redis": self.redis_label,
            "pids": dict(self.pids),
            "logs": self.logdir,
        }


def summary_table(s: dict[str, Any]) -> str:
    def lat(p50: float | None, p99: float | None) -> str:
        return "-" if p50 is None else f"p50 {render.seconds(p50)} · p99 {render.seconds(p99)}"

    killed = (
        "none"
        if not s["killed_worker"]
        else (
            f"{s['killed_worker']} SIGKILLed at {s['killed_at']:.1f}s, owning {s['requests_owned_by_killed_worker']} "
            "active requests"
        )
    )
    rows = [
        ("requests", s["requests"]),
        (
            "verified byte for byte",
            f"{s['verified']}/{s['requests']}" + ("" if s["ok"] else "  ✗ " + ", ".join(s["wrong"])),
        ),
        ("worker killed", killed),
        ("takeovers", s["takeovers"]),
        ("backend failovers", s["backend_failovers"]),
        (
            "tokens recovered",
            f"{s['tokens_recovered']} tokens ({s['chars_recovered']} chars) carried over by takeovers",
        ),
        (
            "takeover latency",
            f"{lat(s['takeover_latency_p50'], s['takeover_latency_p99'])}  "
            f"(kill → first commit by the new owner; lease {s['lease_ttl']:g}s)",
        ),
        ("claim latency", f"{lat(s['claim_latency_p50'], s['claim_latency_p99'])}  (kill → Takeover entry)"),
        ("wall time", render.seconds(s["wall_seconds"])),
    ]
    verdict = "PASS: every answer arrived complete and exact" if s["ok"] else "FAIL: some answers are wrong"
    return f"\n{render.pairs(rows)}\n\n{verdict}"


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (and SIGHUP) behave like Ctrl-C, so cleanup runs."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_demo(args: Any) -> int:
    setup_logging(args, "WARNING")
    if args.workers < 2 and not args.no_kill:
        raise UsageError("the demo kills a worker, so it needs --workers 2 or more (or --no-kill)")
    demo = Demo(args)
    started = time.monotonic()
    outcome = "error"  # or "ok", "wrong" (an answer differs), "interrupted"
    try:
        with _sigterm_raises():
            try:
                demo.start()
                outcome = "ok" if asyncio.run(demo.run()) else "wrong"
            except KeyboardInterrupt:
                outcome = "interrupted"
                print("\ninterrupted: stopping the workers, the fake LLM and Redis", file=sys.stderr)
                raise
            finally:
                demo.cleanup()
    finally:
        demo.finish_logs(keep=args.keep_logs or outcome in ("error", "wrong"))
    summary = demo.summary(time.monotonic() - started)
    print(summary_table(summary), flush=True)
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["ok"] else 1
