"""The gateway (``flo-coord serve``) runs under the documented worker ACL (docs/OPERATING.md).

Two replicas log in as a user with exactly ``test_acl.WORKER_RULES``: a stream, its
takeover after a SIGKILL and the resume on the other replica, an idempotent retry, a
cancel from the other replica, request status and readiness all work; the library was
installed by the admin beforehand (``flo-coord install-functions``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from conftest import require_redis_server
from test_acl import WORKER_RULES, setuser, user_url
from test_gateway import TOKENS, Events, Replica, _chat_body, chat_answer

from flo_coord.testing.embedded import RedisServer
from flo_coord.testing.fakellm import FakeLLMServerThread

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def worker_user() -> Iterator[tuple[RedisServer, str, str]]:
    """A redis-server with the library installed by the admin and a worker user of one namespace."""
    require_redis_server()
    with RedisServer() as server:
        namespace = f"gwacl{uuid.uuid4().hex[:6]}"
        setuser(server.client(), "gw-worker", "gpw", namespace, WORKER_RULES)
        install = subprocess.run(
            [sys.executable, "-m", "flo_coord", "install-functions", "--redis-url", server.url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert install.returncode == 0, install.stderr
        yield server, namespace, user_url(server, "gw-worker", "gpw")


def test_two_replicas_under_the_worker_acl_stream_resume_retry_and_cancel(
    worker_user: tuple[RedisServer, str, str],
) -> None:
    _, namespace, url = worker_user
    tag = uuid.uuid4().hex
    with FakeLLMServerThread(token_delay=0.05, n_tokens=TOKENS) as fake:
        a = Replica(url, namespace, fake.base_url, "acl-a").wait_ready()
        b = Replica(url, namespace, fake.base_url, "acl-b").wait_ready()
        try:
            assert b.http().get("/readyz").status_code == 200
            # a stream, its replica SIGKILLed, the rest from the other replica with Last-Event-ID
            body, key = _chat_body(f"acl {tag}"), {"idempotency-key": f"acl-{tag}"}
            with a.http() as http, http.stream("POST", "/v1/chat/completions", json=body, headers=key) as resp:
                assert resp.status_code == 200
                rid = resp.headers["x-flo-request-id"]
                first = Events(resp)
                first.read(6)
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait(10)
                with pytest.raises(httpx.HTTPError):
                    first.rest()
            assert first.last_id is not None
            retry = {**key, "last-event-id": first.last_id}  # the same POST again: attaches, no second start
            with b.http() as http, http.stream("POST", "/v1/chat/completions", json=body, headers=retry) as resp:
                assert resp.status_code == 200 and resp.headers["x-flo-request-id"] == rid
                rest = Events(resp).rest()
            assert "".join(first.texts) + rest == chat_answer(f"acl {tag}")
            status = b.http().get(f"/v1/requests/{rid}").json()
            assert status["state"] == "Completed" and status["owner"] == "acl-b" and status["epoch"] >= 2
            # a cancel (its own script) works for the worker user too
            with b.http() as http, http.stream("POST", "/v1/chat/completions", json=_chat_body(f"x {tag}")) as resp:
                other = resp.headers["x-flo-request-id"]
                events = Events(resp)
                events.read(2)
                assert b.http().delete(f"/v1/requests/{other}").status_code == 202
                started = time.monotonic()
                events.rest()
            assert events.error is not None and "cancelled" in events.error["message"]
            assert time.monotonic() - started < 3
        finally:
            a.close()
            b.close()
