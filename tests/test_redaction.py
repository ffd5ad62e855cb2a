"""Secrets never leave: API keys and URL credentials are redacted wherever they appear.

One function (flo_coord.redact.redact_secrets) is used by the log formatters, the history
and failure-reason recording path and the CLI; these tests go through each of those paths
against a real redis-server and the real CLI.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from conftest import require_redis_server

from flo_coord import FailoverAttempt, FailoverManager, FailoverResult, ServingBackend, logs
from flo_coord.redact import redact_secrets, register_secret
from flo_coord.testing.embedded import RedisServer

KEY = "sk-test-" + "Z9" * 12
ECHO = (
    f'{{"error": {{"message": "Incorrect API key provided: {KEY}", "param": "api_key={KEY}", '
    f'"headers": {{"Authorization": "Bearer {KEY}"}}, "proxy": "http://bob:hunter2pw@proxy:3128"}}}}'
)


def test_every_shape_of_credential_is_masked_and_json_stays_json() -> None:
    out = redact_secrets(ECHO)
    assert KEY not in out and "hunter2pw" not in out and "bob:***@proxy" in out
    assert json.loads(out)["error"]["headers"]["Authorization"] == "Bearer ***"
    register_secret("plain-registered-secret")
    assert redact_secrets("x plain-registered-secret y") == "x *** y"
    assert redact_secrets("redis://worker:pw@10.0.0.1:6379/0") == "redis://worker:***@10.0.0.1:6379/0"
    assert redact_secrets("nothing to hide here: 42 tokens") == "nothing to hide here: 42 tokens"


def test_log_lines_never_carry_a_secret() -> None:
    for fmt in ("kv", "json"):
        stream = io.StringIO()
        handler = logs.configure(fmt, "INFO", stream=stream)
        try:
            log = logging.getLogger("flo_coord.test")
            log.warning("backend said %s", ECHO)
            log.info("backends: Vllm=http://user:topsecret@llm:8000 (m)")
            try:
                raise RuntimeError(f"boom with {KEY}")
            except RuntimeError:
                log.exception("failed")
        finally:
            logging.getLogger().removeHandler(handler)
        text = stream.getvalue()
        assert KEY not in text and "topsecret" not in text and "hunter2pw" not in text, text
        assert "user:***@llm" in text


@pytest.fixture(scope="module")
def server():
    require_redis_server()
    with RedisServer() as srv:
        yield srv


def test_stored_errors_history_and_cli_output_are_redacted(server: RedisServer) -> None:
    namespace = f"red{uuid.uuid4().hex[:6]}"
    with FailoverManager(url=server.url, namespace=namespace, worker_id="w1") as manager:
        manager.start_tracking("r1", "prompt", ServingBackend.Vllm)
        manager.record_attempt(
            FailoverAttempt(
                request_id="r1",
                backend=ServingBackend.Vllm,
                started_at=time.time(),
                result=FailoverResult.BackendError(f"in-stream error (HTTP 200): {ECHO}"),
            )
        )
        assert manager.fail("r1", f"every backend failed: {ECHO}")
        outcome = manager.outcome("r1")
        assert outcome is not None and KEY not in (outcome.error or "") and "***" in (outcome.error or "")
        assert all(KEY not in json.dumps(str(e)) for e in manager.history())
    raw = server.client()
    stored = [v for _, fields in raw.xrange(f"{namespace}:history") for v in fields.values()]
    stored += list(raw.hgetall(f"{namespace}:{{r1}}:result").values())
    assert stored and not any(KEY.encode() in v or b"hunter2pw" in v for v in stored)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    env.update(FLO_REDIS_URL=server.url, FLO_NAMESPACE=namespace)
    for argv in (["history", "--json"], ["history"], ["inspect", "r1", "--json"], ["inspect", "r1", "--full"]):
        done = subprocess.run([sys.executable, "-m", "flo_coord", *argv], capture_output=True, text=True, env=env,
                              timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert KEY not in done.stdout + done.stderr and "hunter2pw" not in done.stdout, argv
    # a foreign entry written straight into the history (not through flo_coord) is masked on output
    result = {"kind": "BackendError", "message": ECHO}
    foreign = {"kind": "attempt", "backend": "Vllm", "started_at": 1.0, "result": result}
    raw.xadd(f"{namespace}:history", {"e": json.dumps(foreign)})
    done = subprocess.run([sys.executable, "-m", "flo_coord", "history", "--json"], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert done.returncode == 0 and KEY not in done.stdout, done.stdout


def test_a_bad_redis_url_is_shown_without_its_password() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    done = subprocess.run(
        [sys.executable, "-m", "flo_coord", "stats", "--redis-url", "redis://admin:p4ssw0rd@127.0.0.1:1/0"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "p4ssw0rd" not in done.stderr and "admin:***@" in done.stderr


class EchoingBackend:
    """An OpenAI-style server that answers 200, streams one token, then an in-stream error
    object that echoes the caller's Authorization header (as some providers do)."""

    def __init__(self) -> None:
        self.server: Any = None
        self.port = 0

    async def __aenter__(self) -> EchoingBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
        await reader.readexactly(length)
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        token = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
        error = {"error": {"message": f"upstream rejected credentials {auth} (key {auth.split()[-1]})", "code": 401}}
        body = f"data: {json.dumps(token)}\n\ndata: {json.dumps(error)}\n\n".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()


async def test_a_key_echoed_by_the_backend_in_a_200_stream_is_never_stored_or_logged(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flo_coord import FailoverConfig, FloCoordError
    from flo_coord.execution.backends import BackendSpec
    from flo_coord.execution.coordinator import Coordinator

    secret = f"prov-{uuid.uuid4().hex}"  # no well-known key shape: only registration can catch it
    monkeypatch.setenv("FLO_TEST_ECHO_KEY", secret)
    namespace = f"echo{uuid.uuid4().hex[:6]}"
    stream = io.StringIO()
    handler = logs.configure("kv", "INFO", stream=stream)
    try:
        async with EchoingBackend() as backend:
            spec = BackendSpec(name="Vllm", base_url=f"http://u:basicpw@127.0.0.1:{backend.port}", model="m",
                               api_key_env="FLO_TEST_ECHO_KEY")  # fmt: skip
            coordinator = Coordinator(
                [spec], url=server.url, namespace=namespace,
                config=FailoverConfig(fallback_order=[ServingBackend.Vllm], max_retries=1),
            )  # fmt: skip
            try:
                with pytest.raises(FloCoordError):
                    async for _ in coordinator.stream("echo-1", "hello"):
                        pass
                outcome = await coordinator.manager.outcome("echo-1")
                history = await coordinator.manager.history()
            finally:
                await coordinator.aclose()
    finally:
        logging.getLogger().removeHandler(handler)
    raw = server.client()
    stored = [v for _, fields in raw.xrange(f"{namespace}:history") for v in fields.values()]
    stored += list(raw.hgetall(f"{namespace}:{{echo-1}}:result").values())
    assert any(b"upstream rejected" in v for v in stored)  # the error itself is kept...
    for blob in [*stored, str(outcome).encode(), str(history).encode(), stream.getvalue().encode()]:
        assert secret.encode() not in blob and b"basicpw" not in blob  # ...without the key
