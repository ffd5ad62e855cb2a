"""``flo-coord demo``: crash a gateway replica mid-answer and show that every client still gets its whole answer.

It starts a Redis (embedded unless ``--redis-url``), a fake LLM server with two backends
(Vllm and Ollama on one port), and ``--replicas`` gateway processes (``flo-coord serve``,
docs/GATEWAY.md) on free loopback ports. Its clients stream OpenAI chat completions over
HTTP (httpx, SSE), spread over the replicas, each POST carrying an ``Idempotency-Key``.
Once the answers are ``--kill-at`` done it SIGKILLs the replica serving the most streams
(and, with ``--backend-fault``, the default, the fake cuts some Vllm streams mid-answer,
which the serving replica fails over). Every client whose connection died resumes on
another live replica with ``Last-Event-ID`` (``GET /v1/requests/{id}/stream``). Every
answer is checked against ``full_answer_text(prompt)`` byte for byte, both as received
across resumes and as re-read from offset 0 through a replica, and a summary is printed.
Everything it started is stopped on the way out, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from flo_coord.cli import render
from flo_coord.cli.common import CommandFailedError, UsageError, check_redis, redact, setup_logging
from flo_coord.cli.progress import LineView, LiveView, RequestView, View, WorkerView

VLLM_MODEL = "demo-vllm"
OLLAMA_MODEL = "demo-ollama"
TICK = 0.2
MAX_RESUMES = 8  # per client: a bound, so a bug cannot loop forever


class StreamEndedError(Exception):
    """The stream ended with an SSE error event (OpenAI's error JSON in ``error``)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message", error)))
        self.error = error


@dataclass
class Replica:
    """One ``flo-coord serve`` process of the demo."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str = ""
    killed: bool = False

    def alive(self) -> bool:
        return not self.killed and self.proc.poll() is None


@dataclass
class Track:
    """One client of the demo: what it asked, what arrived over HTTP, and what happened to it."""

    view: RequestView
    index: int
    messages: list[dict[str, str]]
    expected: str
    token_ends: list[int]  # character offset where each answer token ends
    server_id: str | None = None  # the gateway's request id (x-flo-request-id)
    last_event_id: str | None = None
    received: str = ""
    finish_reason: str | None = None
    outcome: str | None = None
    replay_ok: bool = False
    victim: bool = False
    chars_at_kill: int | None = None
    first_text_after_kill: float | None = None  # monotonic

    @property
    def label(self) -> str:
        return self.view.request_id

    def tokens_in(self, chars: int) -> int:
        return sum(1 for end in self.token_ends if end <= chars)

    def add(self, text: str, event_id: str | None) -> None:
        """Append a text event; its SSE id must name this request and the new offset."""
        self.received += text
        self.last_event_id = event_id
        self.view.chars = len(self.received)
        self.view.tokens = self.tokens_in(len(self.received))
        if event_id != f"{self.server_id}:{len(self.received)}":
            self.view.error = f"event id {event_id!r} is not at offset {len(self.received)}"
        after_kill = self.chars_at_kill is not None and len(self.received) > self.chars_at_kill
        if after_kill and self.first_text_after_kill is None:
            self.first_text_after_kill = time.monotonic()


@dataclass
class Stats:
    takeovers: int = 0
    failovers: int = 0
    resumes: int = 0
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


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str | None, str]]:
    """(SSE ``id`` or None, ``data``) of each event of a text/event-stream, from its lines."""
    event_id, data = None, None
    async for line in lines:
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif line == "" and data is not None:
            yield event_id, data
            event_id, data = None, None


class Demo:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.namespace = args.namespace or f"demo-{uuid.uuid4().hex[:8]}"
        self.redis_url: str = args.redis_url or ""
        self.redis_server: Any = None
        self.redis_label = ""
        self.fake: Any = None
        self.replicas: list[Replica] = []
        self.logdir: str | None = None  # created with the first replica
        self.tracks: list[Track] = []
        self.stats = Stats()
        self.view: View | None = None
        self.history_id = "0-0"
        self.pids: dict[str, int] = {}
        self._clock_offset = 0.0  # Redis clock minus ours, for claim latencies from history timestamps

    # ------------------------------------------------------------ processes

    def start(self) -> None:
        from flo_coord.testing.embedded import RedisServer, start_embedded_redis
        from flo_coord.testing.fakellm import FakeLLMServerThread

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
        for i in range(1, self.args.replicas + 1):
            self._spawn_replica(f"r{i}")

    def _spawn_replica(self, name: str) -> None:
        if self.logdir is None:
            self.logdir = tempfile.mkdtemp(prefix="flo-demo-")
        base = self.fake.base_url
        command = [
            sys.executable, "-m", "flo_coord", "serve",
            "--redis-url", self.redis_url,
            "--namespace", self.namespace,
            "--worker-id", name,
            "--host", "127.0.0.1",
            "--port", "0",
            "--lease-ttl", str(self.args.lease_ttl),
            "--grace", "1",
            "--backend", f"Vllm={base},{VLLM_MODEL}",
            "--backend", f"Ollama={base},{OLLAMA_MODEL},ollama",
            "--exit-with-parent",
            "--log-level", "info",
        ]  # fmt: skip
        # The demo is self-contained: the user's FLO_* settings (a config file, keys...) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(os.path.join(self.logdir, f"{name}.log"), "ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only the demo, which stops them in order
            )
        self.replicas.append(Replica(name, proc))
        self.pids[name] = proc.pid

    def log_tail(self, name: str, lines: int = 8) -> str:
        if self.logdir is None:
            return ""
        try:
            with open(os.path.join(self.logdir, f"{name}.log"), encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Stop everything this demo started. Idempotent; safe after a partial start."""
        for replica in self.replicas:
            if replica.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    replica.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for replica in self.replicas:
            try:
                replica.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                replica.proc.kill()
                replica.proc.wait()
        if self.fake is not None:
            self.fake.stop()
            self.fake = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
        elif self.redis_url:
            self._drop_namespace()

    def finish_logs(self, keep: bool) -> None:
        """Keep the replicas' logs (and say where) or remove them."""
        if self.logdir is None:
            return
        if keep:
            print(f"replica logs kept in {self.logdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)

    def _require_unused_namespace(self) -> None:
        """Against a user's Redis, the demo runs only in a namespace nobody uses (its request ids would collide)."""
        from flo_coord.store import connect

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
            from flo_coord.store import connect

            client = connect(self.redis_url, timeout=3.0)
            try:
                keys = list(client.scan_iter(match=f"{self.namespace}:*", count=1000))
                for i in range(0, len(keys), 500):
                    client.delete(*keys[i : i + 500])
            finally:
                client.close()

    # ------------------------------------------------------------------- run

    def _make_tracks(self) -> None:
        from flo_coord.testing.fakellm import full_answer, render_messages

        for i in range(1, self.args.requests + 1):
            question = f"Question {i}: how does a fenced lease keep stream {i} exactly-once across a crash?"
            messages = [{"role": "user", "content": question}]
            tokens = full_answer(render_messages(messages), self.args.tokens)
            ends = list(itertools.accumulate(len(token) for token in tokens))
            expected = "".join(tokens)
            view = RequestView(f"req-{i:02d}", total_chars=len(expected), total_tokens=len(tokens))
            self.tracks.append(Track(view=view, index=i - 1, messages=messages, expected=expected, token_ends=ends))

    def _make_view(self) -> View:
        tty = sys.stdout.isatty() and not self.args.plain and os.environ.get("TERM") != "dumb"
        fault = " · Vllm streams cut mid-answer" if self.args.backend_fault else ""
        urls = ", ".join(f"{r.name} {r.url.removeprefix('http://')}" for r in self.replicas)
        title = (
            f"flo-coord demo · {self.args.requests} HTTP streaming clients · {self.args.replicas} gateway replicas "
            f"(flo-coord serve: {urls}) · lease {self.args.lease_ttl:g}s\n"
            f"Redis: {self.redis_label} · fake LLM: {self.fake.base_url} (backends Vllm, Ollama){fault}"
        )
        replicas = [WorkerView(r.name, r.proc.pid) for r in self.replicas]
        cls = LiveView if tty else LineView
        return cls(sys.stdout, title, [t.view for t in self.tracks], replicas)

    async def run(self) -> bool:
        import httpx

        from flo_coord.store import AsyncFailoverManager

        self._make_tracks()
        # The clients use only HTTP; this read-only connection feeds the view (owners, takeovers, failovers).
        manager = AsyncFailoverManager(url=self.redis_url, namespace=self.namespace, worker_id="demo-observer")
        timeout = httpx.Timeout(30.0, connect=5.0)
        try:
            async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as http:
                await self._wait_for_replicas()
                self.view = self._make_view()
                started = ", ".join(f"{name} (pid {pid})" for name, pid in self.pids.items())
                self._event(f"started {started}")
                if self.args.backend_fault:
                    await self._inject_fault(http)
                clients = [asyncio.create_task(self._client(http, t)) for t in self.tracks]
                self._event(f"{len(self.tracks)} clients streaming POST /v1/chat/completions, spread over the replicas")
                try:
                    await self._monitor(manager, clients)
                finally:
                    for task in clients:
                        task.cancel()
                    await asyncio.gather(*clients, return_exceptions=True)
                await self._poll_history(manager)
                await self._verify(http, manager)
                self.view.refresh()
        finally:
            if self.view is not None:
                self.view.close()
            await manager.aclose()
        return all(t.view.ok for t in self.tracks)

    async def _wait_for_replicas(self, timeout: float = 30.0) -> None:
        """Until every replica listens (its URL is in its log), or one dies."""
        deadline = time.monotonic() + timeout
        waiting = list(self.replicas)
        while waiting:
            for replica in list(waiting):
                if replica.proc.poll() is not None:
                    raise CommandFailedError(
                        f"replica {replica.name} exited with code {replica.proc.returncode} while starting:\n"
                        f"{self.log_tail(replica.name)}"
                    )
                found = re.search(r"listening on (http://\S+)", self.log_tail(replica.name, 50))
                if found:
                    replica.url = found.group(1)
                    waiting.remove(replica)
            if time.monotonic() > deadline:
                raise CommandFailedError(f"replicas {[r.name for r in waiting]} did not start within {timeout:g}s")
            await asyncio.sleep(0.05)

    async def _inject_fault(self, http: Any) -> None:
        """Cut a quarter of the Vllm streams a third of the way in (through the fake's admin endpoint)."""
        cut_at = max(2, self.args.tokens // 3)
        times = max(1, math.ceil(self.args.requests / 4))
        spec = f"cut:{cut_at}*{times}"
        reply = await http.post(f"{self.fake.base_url}/_faults", json={"model": VLLM_MODEL, "fault": spec})
        reply.raise_for_status()
        self._event(f"fault set: the next {times} Vllm streams are cut after {cut_at} tokens ({spec})")

    # --------------------------------------------------------------- clients

    async def _client(self, http: Any, t: Track) -> None:
        """Stream one chat completion; whenever the connection dies, resume on another live replica."""
        import httpx

        replica = self.replicas[t.index % len(self.replicas)]
        try:
            while True:
                t.view.replica = replica.name
                try:
                    if await self._stream(http, t, replica):
                        break
                    why = "the stream ended without [DONE]"
                except httpx.HTTPError as exc:
                    why = f"{type(exc).__name__}"
                except StreamEndedError as exc:
                    if exc.error.get("code") != "replica_shutting_down":
                        raise
                    why = "the replica is shutting down"
                if t.view.resumes >= MAX_RESUMES:
                    raise CommandFailedError(f"{t.label}: gave up after {MAX_RESUMES} resumes ({why})")
                replica = await self._resume_target(replica, t.index)
                t.view.resumes += 1
                self.stats.resumes += 1
                self._event(
                    f"{t.label}: stream from {t.view.replica} lost at offset {len(t.received)} ({why}); "
                    f"resuming on {replica.name} with Last-Event-ID {t.last_event_id}"
                )
        except (StreamEndedError, CommandFailedError) as exc:
            t.view.error = render.shorten(str(exc), 60)
        finally:
            t.view.done = True

    async def _stream(self, http: Any, t: Track, replica: Replica) -> bool:
        """One HTTP stream of ``t`` from ``replica``: the first POST (with an Idempotency-Key, so a
        retry never starts a second generation), or a resume from ``t.last_event_id``. True at
        ``[DONE]``; False when the stream ended early; raises httpx.HTTPError when the connection dies."""
        headers = {"last-event-id": t.last_event_id} if t.last_event_id else {}
        if t.server_id is None:
            body = {"model": VLLM_MODEL, "messages": t.messages, "stream": True}
            headers["idempotency-key"] = f"{self.namespace}-{t.label}"
            request = http.build_request("POST", f"{replica.url}/v1/chat/completions", json=body, headers=headers)
        else:
            request = http.build_request("GET", f"{replica.url}/v1/requests/{t.server_id}/stream", headers=headers)
        response = await http.send(request, stream=True)
        try:
            if response.status_code != 200:
                await response.aread()
                raise StreamEndedError(response.json().get("error", {"message": f"HTTP {response.status_code}"}))
            t.server_id = response.headers["x-flo-request-id"]
            async for event_id, data in sse_events(response.aiter_lines()):
                if data == "[DONE]":
                    return True
                chunk = json.loads(data)
                if "error" in chunk:
                    raise StreamEndedError(chunk["error"])
                choice = (chunk.get("choices") or [{}])[0]
                if choice.get("finish_reason"):
                    t.finish_reason = choice["finish_reason"]
                text = (choice.get("delta") or {}).get("content")
                if text:
                    t.add(text, event_id)
            return False
        finally:
            await response.aclose()

    async def _resume_target(self, lost: Replica, spread: int) -> Replica:
        """A live replica other than ``lost`` (the ``spread``-th of them, so resumes spread out), waiting
        briefly if none is up; ``lost`` itself only when it is the last one alive."""
        for _ in range(50):
            others = [r for r in self.replicas if r is not lost and r.alive()]
            if others:
                return others[spread % len(others)]
            if lost.alive():
                return lost
            await asyncio.sleep(0.1)
        raise CommandFailedError("no replica left alive to resume on")

    # --------------------------------------------------------------- monitor

    def _event(self, text: str) -> None:
        if self.view is not None:
            self.view.event(text)

    async def _monitor(self, manager: Any, clients: list[asyncio.Task[None]]) -> None:
        deadline = time.monotonic() + self.args.timeout
        while not all(task.done() for task in clients):
            if time.monotonic() > deadline:
                raise CommandFailedError(f"the demo did not finish within {self.args.timeout:g}s")
            await self._poll_contexts(manager)
            await self._poll_history(manager)
            self._check_replicas()
            if self._should_kill():
                await self._kill_busiest(manager)
            assert self.view is not None
            self.view.refresh()
            await asyncio.sleep(TICK)

    async def _poll_contexts(self, manager: Any) -> None:
        live = [t for t in self.tracks if not t.view.done and t.server_id]
        contexts = await asyncio.gather(*(manager.get_context(t.server_id) for t in live))
        for t, ctx in zip(live, contexts, strict=True):
            if ctx is not None:
                t.view.owner, t.view.epoch = ctx.owner, ctx.epoch
                t.view.backend = ctx.current_backend or t.view.backend

    async def _poll_history(self, manager: Any) -> None:
        from flo_coord.models import Takeover

        entries = await manager.history_from(self.history_id, 500)
        by_id = {t.server_id: t for t in self.tracks if t.server_id}
        for entry_id, entry in entries:
            if entry_id == self.history_id:
                continue
            self.history_id = entry_id
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
                    f"{t.label}: {entry.backend} failed on {entry.worker_id} "
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
            f"{entry.new_owner} took over {t.label} from {entry.old_owner} at epoch {entry.epoch}: "
            f"{tokens} tokens ({entry.prefix_chars} chars) carried over"
        )

    def _check_replicas(self) -> None:
        assert self.view is not None
        for w, replica in zip(self.view.workers, self.replicas, strict=True):
            code = replica.proc.poll()
            if code is not None and not w.killed and w.exited is None:
                w.exited = code
                self._event(f"replica {w.worker_id} exited unexpectedly (code {code}); its clients resume elsewhere")

    def _should_kill(self) -> bool:
        if self.args.no_kill or self.stats.killed is not None or self.view is None:
            return False
        return self.view.progress() >= self.args.kill_at

    async def _kill_busiest(self, manager: Any) -> None:
        """SIGKILL the live replica serving the most unfinished streams (it also generates them)."""
        from flo_coord.cli.common import redis_time

        assert self.view is not None
        view = self.view
        alive = [(w, r) for w, r in zip(view.workers, self.replicas, strict=True) if r.alive()]
        if len(alive) < 2:
            return  # nobody would be left to resume on
        busiest, replica = max(alive, key=lambda pair: view.connected(pair[1].name))
        victims = [t for t in self.tracks if not t.view.done and t.view.replica == replica.name]
        if not victims:
            return
        for t in victims:
            t.victim, t.chars_at_kill = True, len(t.received)
        replica.proc.send_signal(signal.SIGKILL)
        replica.killed = busiest.killed = True
        self.stats.kill_mono, self.stats.kill_wall = time.monotonic(), time.time()
        self.stats.killed, self.stats.killed_at, self.stats.victims = replica.name, view.elapsed(), len(victims)
        self._event(f"SIGKILL {replica.name} (pid {busiest.pid}) while it served {len(victims)} streams mid-answer")
        with contextlib.suppress(Exception):
            self._clock_offset = await redis_time(manager) - time.time()

    async def _verify(self, http: Any, manager: Any) -> None:
        """Each answer as received over its streams, and as re-read from offset 0 through a live
        replica, must equal the expected text; its outcome Completed and its finish_reason stop."""

        async def replay(t: Track) -> str:
            again = Track(view=RequestView(t.label, 0, 0), index=t.index, messages=[], expected="", token_ends=[])
            again.server_id = t.server_id
            live = next(r for r in self.replicas if r.alive())
            return again.received if await self._stream(http, again, live) and again.view.error is None else ""

        done = [t for t in self.tracks if t.server_id]
        outcomes = await asyncio.gather(*(manager.outcome(t.server_id) for t in done))
        replays = await asyncio.gather(*(replay(t) for t in done), return_exceptions=True)
        for t, outcome, again in zip(done, outcomes, replays, strict=True):
            t.outcome = outcome.state if outcome is not None else None
            t.replay_ok = again == t.expected
        for t in self.tracks:
            exact = t.received == t.expected and t.replay_ok and t.finish_reason == "stop"
            t.view.ok = t.outcome == "Completed" and exact and not t.view.error
            if not t.view.ok and not t.view.error:
                t.view.error = "answer differs" if t.outcome == "Completed" else f"outcome {t.outcome}"

    # --------------------------------------------------------------- summary

    def latencies(self) -> list[float]:
        kill = self.stats.kill_mono
        return [t.first_text_after_kill - kill for t in self.tracks if kill and t.first_text_after_kill]

    def summary(self, wall: float) -> dict[str, Any]:
        verified = sum(1 for t in self.tracks if t.view.ok)
        latencies, claims = self.latencies(), self.stats.claim_latencies
        return {
            "ok": verified == len(self.tracks),
            "requests": len(self.tracks),
            "verified": verified,
            "wrong": [t.label for t in self.tracks if not t.view.ok],
            "replicas": len(self.replicas),
            "replica_urls": {r.name: r.url for r in self.replicas},
            "killed_replica": self.stats.killed,
            "killed_at": self.stats.killed_at,
            "streams_on_killed_replica": self.stats.victims,
            "takeovers": self.stats.takeovers,
            "resumes": self.stats.resumes,
            "resumed_requests": sum(1 for t in self.tracks if t.view.resumes),
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
        if not s["killed_replica"]
        else f"{s['killed_replica']} SIGKILLed at {s['killed_at']:.1f}s, "
        f"serving {s['streams_on_killed_replica']} streams"
    )
    rows = [
        ("requests", f"{s['requests']} HTTP streaming clients over {s.get('replicas', '?')} flo-coord serve replicas"),
        (
            "verified byte for byte",
            f"{s['verified']}/{s['requests']}" + ("" if s["ok"] else "  ✗ " + ", ".join(s["wrong"])),
        ),
        ("replica killed", killed),
        ("takeovers", s["takeovers"]),
        ("client resumes", f"{s['resumes']} (Last-Event-ID on another replica; {s['resumed_requests']} clients)"),
        ("backend failovers", s["backend_failovers"]),
        (
            "tokens recovered",
            f"{s['tokens_recovered']} tokens ({s['chars_recovered']} chars) carried over by takeovers",
        ),
        (
            "takeover latency",
            f"{lat(s['takeover_latency_p50'], s['takeover_latency_p99'])}  "
            f"(kill → next text at the resumed client; lease {s['lease_ttl']:g}s)",
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
    if args.replicas < 2 and not args.no_kill:
        raise UsageError("the demo kills a replica, so it needs --replicas 2 or more (or --no-kill)")
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
                print("\ninterrupted: stopping the replicas, the fake LLM and Redis", file=sys.stderr)
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
