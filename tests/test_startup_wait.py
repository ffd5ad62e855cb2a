"""Issue 10: a worker (and a gateway replica) started while Redis is down waits for it, with the
outage backoff, instead of exiting; it then serves requests; SIGTERM while waiting exits cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import require_redis_server

from flo_coord.testing.embedded import RedisServer, free_port
from flo_coord.testing.fakellm import FakeLLMServerThread, full_answer_text, render_messages

TOKENS = 12


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _wait_for(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{text}"
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not seen within {timeout}s:\n{path.read_text(errors='replace')}")


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flo_coord", *argv], stdout=out, stderr=subprocess.STDOUT, env=_env()
        )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def fake() -> FakeLLMServerThread:
    server = FakeLLMServerThread(token_delay=0.01, n_tokens=TOKENS).start()
    yield server  # type: ignore[misc]
    server.stop()


def test_worker_started_while_redis_is_down_waits_then_serves_a_request(
    tmp_path: Path, fake: FakeLLMServerThread
) -> None:
    require_redis_server()
    port, namespace = free_port(), f"wait{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:{port}/0"
    log = tmp_path / "worker.log"
    worker = _start(["worker", "--redis-url", url, "--namespace", namespace, "--worker-id", "patient",
                     "--backend", f"Vllm={fake.base_url},m", "--grace", "1", "--log-level", "info"], log)  # fmt: skip
    try:
        _wait_for(log, "waiting for it", worker)
        time.sleep(1.5)  # a few backoff rounds: it is still waiting, not gone
        assert worker.poll() is None
        with RedisServer(port=port):
            _wait_for(log, "ready: worker patient", worker)
            done = subprocess.run(
                [sys.executable, "-m", "flo_coord", "submit", "a question after the outage", "--redis-url", url,
                 "--namespace", namespace, "--wait", "30"],
                capture_output=True, text=True, timeout=60, env=_env(),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == full_answer_text("a question after the outage", TOKENS)
            assert _stop(worker) == 0
        text = log.read_text()
        assert text.count("is unreachable") == 1 and "answers again" in text  # logged once, not per retry
        assert "Traceback" not in text
    finally:
        _stop(worker)


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_sigterm_while_waiting_for_redis_exits_cleanly(tmp_path: Path, command: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    log = tmp_path / f"{command}.log"
    proc = _start([command, "--redis-url", url, "--backend", "Vllm=http://127.0.0.1:9,m", "--log-level", "info"], log)
    try:
        _wait_for(log, "waiting for it", proc)
        started = time.monotonic()
        assert _stop(proc) == 0
        assert time.monotonic() - started < 5
        text = log.read_text()
        assert "stopped while waiting for Redis" in text and "Traceback" not in text
    finally:
        _stop(proc)


def test_gateway_started_while_redis_is_down_waits_then_answers(tmp_path: Path, fake: FakeLLMServerThread) -> None:
    require_redis_server()
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _start(["serve", "--redis-url", f"redis://127.0.0.1:{port}/0", "--namespace", f"w{uuid.uuid4().hex[:8]}",
                   "--port", "0", "--backend", f"Vllm={fake.base_url},m", "--grace", "1", "--log-level", "info"],
                  log)  # fmt: skip
    try:
        _wait_for(log, "waiting for it", proc)
        with RedisServer(port=port):
            text = _wait_for(log, "listening on http://", proc)
            base = text.split("listening on ")[1].split()[0]
            messages = [{"role": "user", "content": "after the outage"}]
            reply = httpx.post(f"{base}/v1/chat/completions", json={"model": "m", "messages": messages}, timeout=30)
            assert reply.status_code == 200, reply.text
            content = reply.json()["choices"][0]["message"]["content"]
            assert content == full_answer_text(render_messages(messages), TOKENS)
            _stop(proc)
    finally:
        _stop(proc)
