"""Cancellation of requests owned by ``flo-coord worker`` processes (not only gateway replicas).

Real processes on a real redis-server, real HTTP to the fake LLM server:

- a worker process owns a request submitted through the queue (``flo-coord submit``); a
  cancel from elsewhere (``Coordinator.cancel`` in this process, or ``DELETE`` on a
  ``flo-coord serve`` replica that does not own it) ends it within ~1.5 s as Failed /
  "Cancelled", the backend call ends early (the fake LLM's request log), and a follower
  gets RequestCancelledError;
- a request flagged while its owner is dead (SIGKILL) is ended as cancelled by the worker
  whose reaper takes it over, without a second backend call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import wait_for
from test_gateway import Replica

from flo_coord import BackendSpec, Coordinator, FailoverManager, RequestCancelledError
from flo_coord.testing.embedded import RedisServer
from flo_coord.testing.fakellm import FakeLLMServerThread

pytestmark = pytest.mark.timeout(120)
TOKENS = 60  # at 0.05 s a token, an uncancelled answer takes 3 s


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLMServerThread]:
    server = FakeLLMServerThread(token_delay=0.05, n_tokens=TOKENS).start()
    yield server
    server.stop()


def _env(redis: RedisServer, namespace: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    env.update(FLO_REDIS_URL=redis.url, FLO_NAMESPACE=namespace)
    return env


@contextlib.contextmanager
def worker(redis: RedisServer, fake: FakeLLMServerThread, namespace: str, worker_id: str, log: Path) -> Iterator[Any]:
    """One ``flo-coord worker`` process (lease 1 s); killed and reaped on exit."""
    argv = [sys.executable, "-m", "flo_coord", "worker", "--worker-id", worker_id, "--lease-ttl", "1",
            "--backend", f"Vllm={fake.base_url},vllm-m", "--exit-with-parent", "--log-level", "info"]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(redis, namespace))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def submit(redis: RedisServer, namespace: str, prompt: str) -> str:
    rid = f"c-{uuid.uuid4().hex[:10]}"
    done = subprocess.run(
        [sys.executable, "-m", "flo_coord", "submit", prompt, "--request-id", rid, "--no-follow"],
        capture_output=True, text=True, timeout=60, env=_env(redis, namespace),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return rid


def owned_and_streaming(manager: FailoverManager, rid: str, owner: str) -> None:
    """Wait until ``owner`` holds ``rid`` and has committed part of the answer."""

    def check() -> bool:
        ctx = manager.get_context(rid)
        return ctx is not None and ctx.owner == owner and len(ctx.generated_prefix) > 10

    wait_for(check, 30, f"{owner} to stream {rid}")


def backend_calls(fake: FakeLLMServerThread, prompt: str) -> list[dict[str, Any]]:
    return [r for r in fake.requests if r.get("prompt") and prompt in r["prompt"]]


def ended_early(fake: FakeLLMServerThread, prompt: str) -> None:
    """The one backend call of ``prompt`` was closed before the whole answer was sent."""
    calls = backend_calls(fake, prompt)
    assert len(calls) == 1, calls
    wait_for(lambda: calls[0]["outcome"] != "started", 5, "the backend call to end")
    assert calls[0]["outcome"] == "client_disconnected" and calls[0]["tokens_sent"] < TOKENS, calls[0]


def client(redis: RedisServer, namespace: str) -> Coordinator:
    """A Coordinator of this process that only cancels and follows (never started: it generates nothing)."""
    return Coordinator(
        [BackendSpec(name="Vllm", base_url="http://127.0.0.1:1", model="unused")], url=redis.url, namespace=namespace
    )


class Follower(threading.Thread):
    """``Coordinator.follow`` in a thread of its own; ``error`` is what ended it."""

    def __init__(self, redis: RedisServer, namespace: str, rid: str) -> None:
        super().__init__(daemon=True)
        self.redis, self.namespace, self.rid = redis, namespace, rid
        self.error: BaseException | None = None
        self.text = ""

    def run(self) -> None:
        asyncio.run(self._follow())

    async def _follow(self) -> None:
        coordinator = client(self.redis, self.namespace)
        try:
            async for chunk in coordinator.follow(self.rid, wait=10):
                self.text += chunk
        except Exception as exc:
            self.error = exc
        finally:
            await coordinator.aclose()


def cancelled_within(manager: FailoverManager, rid: str, asked: float, limit: float) -> Any:
    outcome = wait_for(lambda: manager.outcome(rid), 10, f"{rid} to end")
    took = time.monotonic() - asked
    assert outcome.state == "Failed" and outcome.error_kind == "Cancelled", outcome
    assert outcome.error == "cancelled by the caller"
    assert took < limit, f"cancel took {took:.2f}s"
    return outcome


def test_coordinator_cancel_stops_a_request_a_worker_process_owns(
    redis_server: RedisServer, fake: FakeLLMServerThread, tmp_path: Path
) -> None:
    namespace = f"cw{uuid.uuid4().hex[:8]}"
    manager = FailoverManager(redis=redis_server.client(), namespace=namespace, worker_id="observer")
    prompt = f"cancel me {uuid.uuid4().hex}"
    with worker(redis_server, fake, namespace, "w1", tmp_path / "w1.log") as proc:
        rid = submit(redis_server, namespace, prompt)
        owned_and_streaming(manager, rid, "w1")
        follower = Follower(redis_server, namespace, rid)
        follower.start()
        asked = time.monotonic()
        assert asyncio.run(_cancel(redis_server, namespace, rid)) == ("OK", "w1", False)  # runs elsewhere
        outcome = cancelled_within(manager, rid, asked, 1.5)
        assert outcome.owner == "w1"
        follower.join(10)
        assert isinstance(follower.error, RequestCancelledError), follower.error
        assert "cancelled by the caller" in str(follower.error)
        assert follower.text  # part of the answer, then the typed error
        ended_early(fake, prompt)
        # the worker goes on: the next request is answered whole
        fake.set_token_delay(0.005)
        try:
            after = submit(redis_server, namespace, f"after {prompt}")
            done = wait_for(lambda: manager.outcome(after), 30, "the next request")
            assert done.state == "Completed" and proc.poll() is None
        finally:
            fake.set_token_delay(0.05)
        # a second cancel of the ended request changes nothing
        assert asyncio.run(_cancel(redis_server, namespace, rid))[:2] == ("DONE", "Failed")
    manager.close()


def test_delete_on_a_serve_replica_stops_a_request_a_worker_process_owns(
    redis_server: RedisServer, fake: FakeLLMServerThread, tmp_path: Path
) -> None:
    namespace = f"cw{uuid.uuid4().hex[:8]}"
    manager = FailoverManager(redis=redis_server.client(), namespace=namespace, worker_id="observer")
    prompt = f"delete me {uuid.uuid4().hex}"
    replica = Replica(redis_server.url, namespace, fake.base_url, "gw1")
    try:
        replica.wait_ready()
        with worker(redis_server, fake, namespace, "w1", tmp_path / "w1.log"):
            rid = submit(redis_server, namespace, prompt)
            owned_and_streaming(manager, rid, "w1")
            follower = Follower(redis_server, namespace, rid)
            follower.start()
            asked = time.monotonic()
            with replica.http() as http:
                reply = http.delete(f"/v1/requests/{rid}")
                assert reply.status_code == 202, reply.text
                assert reply.json()["owner"] == "w1" and reply.json()["cancelled_here"] is False
                cancelled_within(manager, rid, asked, 1.5)
                status = http.get(f"/v1/requests/{rid}").json()
                assert status["state"] == "Failed" and "cancelled" in status["error"]
                assert http.delete(f"/v1/requests/{rid}").status_code == 409
            follower.join(10)
            assert isinstance(follower.error, RequestCancelledError), follower.error
            ended_early(fake, prompt)
    finally:
        replica.close()
        manager.close()


def test_a_flagged_request_taken_over_by_a_reaper_is_ended_cancelled_not_generated(
    redis_server: RedisServer, fake: FakeLLMServerThread, tmp_path: Path
) -> None:
    namespace = f"cw{uuid.uuid4().hex[:8]}"
    manager = FailoverManager(redis=redis_server.client(), namespace=namespace, worker_id="observer")
    prompt = f"orphan {uuid.uuid4().hex}"
    with worker(redis_server, fake, namespace, "dead", tmp_path / "dead.log") as owner:
        rid = submit(redis_server, namespace, prompt)
        owned_and_streaming(manager, rid, "dead")
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        status, who = asyncio.run(_cancel(redis_server, namespace, rid))[:2]
        assert (status, who) == ("OK", "dead")  # flagged while its owner is dead
    assert manager.outcome(rid) is None  # nobody ended it yet: it waits for a takeover
    with worker(redis_server, fake, namespace, "heir", tmp_path / "heir.log"):
        outcome = wait_for(lambda: manager.outcome(rid), 30, "the takeover")
    assert outcome.state == "Failed" and outcome.error_kind == "Cancelled", outcome
    assert outcome.owner == "heir" and outcome.epoch == 2
    assert len(backend_calls(fake, prompt)) == 1  # only the dead owner's call: the heir did not generate
    manager.close()


async def _cancel(redis: RedisServer, namespace: str, rid: str) -> tuple[str, str | None, bool]:
    coordinator = client(redis, namespace)
    try:
        return await coordinator.cancel(rid)
    finally:
        await coordinator.aclose()


async def test_a_stream_caller_on_the_owner_gets_request_cancelled_error(
    redis_server: RedisServer, fake: FakeLLMServerThread
) -> None:
    """In one process: the Coordinator generating a request for a ``stream()`` caller is
    cancelled from another Coordinator (its watcher) and from itself (at once); the caller
    gets RequestCancelledError, not a CancelledError of its own task, and goes on."""
    namespace = f"cw{uuid.uuid4().hex[:8]}"
    spec = BackendSpec(name="Vllm", base_url=fake.base_url, model="vllm-m")
    async with Coordinator([spec], url=redis_server.url, namespace=namespace, worker_id="owner") as owner:
        other = client(redis_server, namespace)
        try:
            for canceller, here in ((other, False), (owner, True)):
                rid = f"s-{uuid.uuid4().hex[:8]}"
                stream = owner.stream(rid, f"stream {rid}", primary="Vllm")
                chunks = 0
                with pytest.raises(RequestCancelledError, match="cancelled by the caller"):
                    async for _ in stream:
                        chunks += 1
                        if chunks == 3:
                            asked = time.monotonic()
                            assert await canceller.cancel(rid) == ("OK", "owner", here)
                assert time.monotonic() - asked < 1.5
                outcome = await owner.outcome(rid)
                assert outcome is not None and outcome.error_kind == "Cancelled" and outcome.owner == "owner"
                ended_early(fake, f"stream {rid}")
        finally:
            await other.aclose()
