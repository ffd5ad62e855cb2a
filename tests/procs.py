"""Worker child processes for the multi-process tests.

The parent side is ``Child`` / ``spawn`` / ``children``: each child is this file run by
``python tests/procs.py '<json params>'``, with its own ``FailoverManager`` (own worker
id) on a real redis-server. The parent sends one JSON command per line on the child's
stdin; the child answers each with one JSON line on stdout, only after Redis has
answered (so an ``append`` reply is the child's acknowledgement of that append). A
``FloCoordError`` is reported as ``{"error": <class name>, ...attributes}``.

Every child is killed and reaped by ``Child.close`` (``children`` does it in a finally
block), and a child exits by itself when its stdin closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.abspath(__file__)

# ------------------------------------------------------------------ parent side


class ChildError(AssertionError):
    """A child died or did not answer in time."""


class Child:
    """One worker process and a line reader on its stdout."""

    def __init__(self, url: str, namespace: str, worker_id: str, **options: Any) -> None:
        params = {"url": url, "namespace": namespace, "worker_id": worker_id, **options}
        self.worker_id = worker_id
        self.proc = subprocess.Popen(
            [sys.executable, HERE, json.dumps(params)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"child-{worker_id}", daemon=True)
        self._reader.start()
        self.ready: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        if self.ready is None:
            self.ready = self.recv(timeout)
        return self.ready

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 20.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"worker {self.worker_id} sent nothing in {timeout}s") from None
        if line is None:
            raise ChildError(f"worker {self.worker_id} exited (code {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, op: str, timeout: float = 20.0, **args: Any) -> dict[str, Any]:
        """Send one command and wait for its reply."""
        self.wait_ready(timeout)
        self.send(op, **args)
        return self.recv(timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        """Kill (SIGCONT first, in case it is stopped) and reap. Idempotent."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def children(url: str, namespace: str, worker_ids: list[str], **options: Any) -> Iterator[list[Child]]:
    """Start one child per worker id (all at once), wait until each is ready; always reap them."""
    started: list[Child] = []
    try:
        for worker_id in worker_ids:
            started.append(Child(url, namespace, worker_id, **options))
        for child in started:
            child.wait_ready()
        yield started
    finally:
        for child in started:
            child.close()


def call_all(workers: list[Child], op: str, timeout: float = 60.0, **args: Any) -> list[dict[str, Any]]:
    """Send one command to every child first (so they run it concurrently), then collect the replies."""
    for worker in workers:
        worker.send(op, **args)
    return [worker.recv(timeout) for worker in workers]


def dump_namespace(client: Any, namespace: str) -> dict[bytes, Any]:
    """Every key of a namespace with its type and full value (TTLs left out), to compare
    Redis before and after a call that must change nothing."""
    dump: dict[bytes, Any] = {}
    for key in sorted(client.scan_iter(match=f"{namespace}:*", count=1000)):
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "hash":
            value = sorted(client.hgetall(key).items())
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = client.xrange(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(client.smembers(key))
        else:  # the key expired between SCAN and TYPE
            continue
        dump[key] = (kind, value)
    return dump


# -------------------------------------------------------------------- child side


def _error(exc: Exception) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    for name in ("current_owner", "current_epoch", "held_epoch", "completed"):
        if hasattr(exc, name):
            reply[name] = getattr(exc, name)
    return reply


def _ack(ack: Any) -> dict[str, Any] | None:
    if ack is None:
        return None
    return {"applied": ack.applied, "seq": ack.seq, "length": ack.length, "token_count": ack.token_count}


def _serve(params: dict[str, Any]) -> None:
    from flo_coord import FailoverAttempt, FailoverManager, FailoverResult, FloCoordError, ServingBackend

    manager = FailoverManager(
        url=params["url"],
        namespace=params["namespace"],
        worker_id=params["worker_id"],
        lease_ttl=params.get("lease_ttl", 5.0),
    )
    heartbeat: Any = None
    if params.get("heartbeat"):
        heartbeat = manager.start_heartbeat(params.get("heartbeat_interval"))

    def handle(cmd: dict[str, Any]) -> Any:
        op = cmd["op"]
        if op == "start":
            ctx = manager.start_tracking(cmd["rid"], cmd.get("prompt", "prompt"))
            return {"owner": ctx.owner, "epoch": ctx.epoch}
        if op == "append":
            return _ack(manager.append_tokens(cmd["rid"], cmd["text"], seq=cmd.get("seq")))
        if op == "complete":
            return manager.complete(cmd["rid"])
        if op == "heartbeat":
            return manager.heartbeat()
        if op == "track_many":
            for rid in cmd["rids"]:
                manager.start_tracking(rid, "prompt")
            return len(cmd["rids"])
        if op == "append_many":
            # round-robin over this child's requests: chunk i of request r is "<tag>:<r>:<i> "
            for i in range(cmd["n"]):
                for rid in cmd["rids"]:
                    manager.append_tokens(rid, f"{cmd['tag']}:{rid}:{i} ")
            return cmd["n"] * len(cmd["rids"])
        if op == "record":
            for _ in range(cmd["n"]):
                manager.record_attempt(
                    FailoverAttempt(backend=ServingBackend.Groq, started_at=time.time(), result=FailoverResult.Success)
                )
            return cmd["n"]
        if op == "race_claim":
            won: list[list[Any]] = []
            while True:
                claimed = manager.claim_orphans(cmd.get("limit", 100))
                won.extend([c.request_id, c.epoch] for c in claimed)
                if not claimed and not manager.orphans():
                    return won
        raise ValueError(f"unknown op {op!r}")

    print(json.dumps({"ready": manager.worker_id, "pid": os.getpid()}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "exit":
                break
            try:
                reply: dict[str, Any] = {"ok": handle(cmd)}
            except FloCoordError as exc:
                reply = _error(exc)
            print(json.dumps(reply), flush=True)
    finally:
        if heartbeat is not None:
            heartbeat.stop()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, pause: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(pause)
