"""flo-coord serve, end to end: real replica processes, a real redis-server, real HTTP to the
fake LLM server, and the official ``openai`` package as the client."""

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
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from procs import dump_namespace, wait_for

from flo_coord.testing.embedded import RedisServer
from flo_coord.testing.fakellm import FakeLLMServerThread, full_answer_text, render_messages

openai = pytest.importorskip("openai")
KEY = "sk-test-" + uuid.uuid4().hex
TOKENS = 40


class Replica:
    """One ``flo-coord serve`` process on a free port; killed and reaped by ``close``."""

    def __init__(self, redis_url: str, namespace: str, fake_url: str, worker_id: str, *extra: str) -> None:
        self.worker_id = worker_id
        argv = [
            sys.executable, "-m", "flo_coord", "serve", "--redis-url", redis_url, "--namespace", namespace,
            "--worker-id", worker_id, "--port", "0", "--lease-ttl", "1.0", "--reap-interval", "0.2",
            "--backend", f"Vllm={fake_url},vllm-m", "--backend", f"Together={fake_url},together-m",
            "--key-env", "FLO_TEST_GATEWAY_KEY", "--log-level", "warning", *extra,
        ]  # fmt: skip
        env = {**os.environ, "FLO_TEST_GATEWAY_KEY": KEY}
        env.pop("FLO_CONFIG", None)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        self.lines = lines

    def wait_ready(self, timeout: float = 30.0) -> Replica:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.1)
                break
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.worker_id} exited with {self.proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.worker_id} did not start in {timeout}s") from None
        assert "listening on " in line, line
        self.url = line.split("listening on ")[1].split()[0]
        return self

    def client(self, **options: Any) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **options)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {KEY}"}, timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextlib.contextmanager
def replicas(redis: RedisServer, fake: FakeLLMServerThread, n: int, *extra: str) -> Iterator[list[Replica]]:
    namespace = f"gw{uuid.uuid4().hex[:8]}"
    started = [Replica(redis.url, namespace, fake.base_url, f"r{i}-{namespace}", *extra) for i in range(n)]
    try:
        for replica in started:
            replica.wait_ready()
        for replica in started:
            replica.namespace = namespace  # type: ignore[attr-defined]
        yield started
    finally:
        for replica in started:
            replica.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLMServerThread]:
    server = FakeLLMServerThread(token_delay=0.02, n_tokens=TOKENS).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair(redis_server: RedisServer, fake: FakeLLMServerThread) -> Iterator[list[Replica]]:
    with replicas(redis_server, fake, 2) as started:
        yield started


@pytest.fixture(autouse=True)
def _clean_faults(fake: FakeLLMServerThread) -> Iterator[None]:
    yield
    fake.clear_faults()
    fake.set_token_delay(0.02)


def chat_answer(content: str) -> str:
    return full_answer_text(render_messages([{"role": "user", "content": content}]), TOKENS)


def generations(fake: FakeLLMServerThread, needle: str) -> list[dict[str, Any]]:
    """The fake server's requests whose prompt or messages mention ``needle``."""
    return [r for r in fake.requests if needle in json.dumps(r.get("body"))]


class Events:
    """A raw SSE reader (httpx): text deltas with their event ids, then the end."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.iter_lines()
        self.texts: list[str] = []
        self.last_id: str | None = None
        self.done = False
        self.error: dict[str, Any] | None = None

    def next(self) -> dict[str, Any] | None:
        """The next data object (None at ``[DONE]`` or the end)."""
        event_id, data = None, None
        for line in self.lines:
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and data is not None:
                if data == "[DONE]":
                    self.done = True
                    return None
                obj: dict[str, Any] = json.loads(data)
                if "error" in obj:
                    self.error = obj["error"]
                    return None
                text = _delta(obj)
                if text:
                    assert event_id is not None, "a text event without an id"
                    self.texts.append(text)
                if event_id is not None:
                    self.last_id = event_id
                return obj
        return None

    def read(self, texts: int) -> None:
        while len(self.texts) < texts and self.next() is not None:
            pass

    def rest(self) -> str:
        while self.next() is not None:
            pass
        return "".join(self.texts)


def _delta(obj: dict[str, Any]) -> str:
    if not obj.get("choices"):
        return ""
    choice = obj["choices"][0]
    return str(choice.get("delta", {}).get("content") or choice.get("text") or "")


def _chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "vllm-m", "messages": [{"role": "user", "content": content}], "stream": True, **extra}


# ----------------------------------------------------------------------- tests


def test_openai_package_streams_and_fetches_exact_answers_with_finish_reason_and_usage(
    pair: list[Replica], fake: FakeLLMServerThread
) -> None:
    client = pair[0].client()
    tag = uuid.uuid4().hex
    messages = [{"role": "user", "content": f"chat {tag}"}]
    stream = client.chat.completions.create(
        model="vllm-m", messages=messages, stream=True, stream_options={"include_usage": True},
        temperature=0.3, seed=7, stop=["never-here"], top_p=0.9,
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_answer(f"chat {tag}")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # the sampling parameters reached the backend
    (sent,) = generations(fake, f"chat {tag}")
    assert {k: sent["body"][k] for k in ("temperature", "seed", "stop", "top_p")} == {
        "temperature": 0.3, "seed": 7, "stop": ["never-here"], "top_p": 0.9,
    }  # fmt: skip

    completion = "".join(c.choices[0].text for c in client.completions.create(
        model="vllm-m", prompt=f"completion {tag}", stream=True) if c.choices)  # fmt: skip
    assert completion == full_answer_text(f"completion {tag}", TOKENS)

    whole = client.chat.completions.create(model="vllm-m", messages=[{"role": "user", "content": f"whole {tag}"}])
    assert whole.choices[0].message.content == chat_answer(f"whole {tag}")
    assert whole.choices[0].finish_reason == "stop" and whole.usage is not None
    plain = client.completions.create(model="together-m", prompt=f"plain {tag}")
    assert plain.choices[0].text == full_answer_text(f"plain {tag}", TOKENS)
    assert plain.choices[0].finish_reason == "stop"
    status = pair[1].http().get(f"/v1/requests/{plain.id}").json()
    assert status["state"] == "Completed" and status["backend"] == "Together"
    assert status["committed_chars"] == len(plain.choices[0].text)


def test_serving_replica_sigkilled_mid_answer_client_resumes_on_the_other_exactly(
    redis_server: RedisServer, fake: FakeLLMServerThread
) -> None:
    fake.set_token_delay(0.05)
    tag = uuid.uuid4().hex
    with replicas(redis_server, fake, 2) as (a, b):
        body = _chat_body(f"kill {tag}", temperature=0.25, seed=11, stop=["never"])
        with a.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            rid = resp.headers["x-flo-request-id"]
            first = Events(resp)
            first.read(8)
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(10)
            with contextlib.suppress(httpx.HTTPError):
                first.rest()  # whatever was already on the wire
        assert first.last_id is not None and not first.done
        headers = {"last-event-id": first.last_id}
        with b.http() as http, http.stream("GET", f"/v1/requests/{rid}/stream", headers=headers) as resp:
            assert resp.status_code == 200 and resp.headers["x-flo-request-id"] == rid
            second = Events(resp)
            rest = second.rest()
        assert second.done and second.error is None
        assert "".join(first.texts) + rest == chat_answer(f"kill {tag}")
        status = b.http().get(f"/v1/requests/{rid}").json()
        assert status["state"] == "Completed" and status["owner"] == b.worker_id and status["epoch"] >= 2
    # the replica that took over continued with the request's own parameters
    calls = generations(fake, f"kill {tag}")
    assert len(calls) == 2 and calls[1]["messages"][-1]["role"] == "assistant"  # a continuation
    for call in calls:
        assert (call["body"]["temperature"], call["body"]["seed"], call["body"]["stop"]) == (0.25, 11, ["never"])


def test_client_disconnects_and_resumes_later_on_the_other_replica(
    pair: list[Replica], fake: FakeLLMServerThread
) -> None:
    a, b = pair
    tag = uuid.uuid4().hex
    with a.http() as http, http.stream("POST", "/v1/chat/completions", json=_chat_body(f"leave {tag}")) as resp:
        rid = resp.headers["x-flo-request-id"]
        first = Events(resp)
        first.read(5)
    # generation goes on without the client
    wait_for(lambda: b.http().get(f"/v1/requests/{rid}").json()["state"] == "Completed", 20, "completion")
    assert first.last_id is not None
    with (
        b.http() as http,
        http.stream("GET", f"/v1/requests/{rid}/stream", headers={"last-event-id": first.last_id}) as resp,
    ):
        rest = Events(resp).rest()
    assert "".join(first.texts) + rest == chat_answer(f"leave {tag}")
    assert len(generations(fake, f"leave {tag}")) == 1


def test_resuming_past_the_end_of_the_answer_is_a_400_naming_its_length(
    pair: list[Replica], fake: FakeLLMServerThread
) -> None:
    a, b = pair
    tag = uuid.uuid4().hex
    whole = a.client().chat.completions.create(model="vllm-m", messages=[{"role": "user", "content": f"end {tag}"}])
    rid, length = whole.id, len(chat_answer(f"end {tag}"))
    for replica in (a, b):  # the replica that generated it, and one that reads it from Redis
        with replica.http() as http:
            for params, headers, origin in (
                ({"offset": 99999}, {}, "offset"),
                ({}, {"last-event-id": f"{rid}:{length + 1}"}, "Last-Event-ID"),
            ):
                reply = http.get(f"/v1/requests/{rid}/stream", params=params, headers=headers)
                assert reply.status_code == 400, reply.text
                error = reply.json()["error"]
                assert (error["code"], error["param"]) == ("offset_out_of_range", origin)
                assert f"({length} chars)" in error["message"] and f"from 0 to {length}" in error["message"]
            # exactly at the end: the clean ending, no text
            with http.stream("GET", f"/v1/requests/{rid}/stream", params={"offset": length}) as resp:
                events = Events(resp)
                assert resp.status_code == 200 and events.rest() == "" and events.done
    # a request still generating: the offset is waited for (follow_wait, 5 s) while the text grows
    fake.set_token_delay(0.05)
    with a.http() as http, http.stream("POST", "/v1/chat/completions", json=_chat_body(f"grow {tag}")) as resp:
        rid = resp.headers["x-flo-request-id"]
        own = Events(resp)
        own.read(1)
        answer = chat_answer(f"grow {tag}")
        ahead = len(answer) - 10  # not committed yet: about 35 tokens (~2 s) away
        for replica in (a, b):
            with replica.http() as other, other.stream("GET", f"/v1/requests/{rid}/stream?offset={ahead}") as late:
                assert late.status_code == 200 and Events(late).rest() == answer[ahead:]
        assert own.rest() == answer
    # ... and refused after follow_wait when the text never reaches it
    fake.set_token_delay(0.5)
    with a.http() as http, http.stream("POST", "/v1/chat/completions", json=_chat_body(f"slow {tag}")) as resp:
        rid = resp.headers["x-flo-request-id"]
        Events(resp).read(1)
        started = time.monotonic()
        reply = b.http().get(f"/v1/requests/{rid}/stream", params={"offset": 99999})
        assert reply.status_code == 400 and 4.5 < time.monotonic() - started < 10
        error = reply.json()["error"]
        assert error["code"] == "offset_out_of_range" and "after waiting 5s" in error["message"]


def test_idempotency_key_attaches_to_the_first_generation_and_refuses_another_body(
    pair: list[Replica], fake: FakeLLMServerThread
) -> None:
    a, b = pair
    tag = uuid.uuid4().hex
    body = _chat_body(f"idem {tag}")
    key = {"idempotency-key": f"k-{tag}"}
    with a.http() as http, http.stream("POST", "/v1/chat/completions", json=body, headers=key) as resp:
        rid = resp.headers["x-flo-request-id"]
        first = Events(resp)
        first.read(4)
    assert first.last_id is not None
    retry = {**key, "last-event-id": first.last_id}
    with b.http() as http, http.stream("POST", "/v1/chat/completions", json=body, headers=retry) as resp:
        assert resp.headers["x-flo-request-id"] == rid
        rest = Events(resp).rest()
    assert "".join(first.texts) + rest == chat_answer(f"idem {tag}")
    # the openai package retrying the same POST gets the whole answer, still from the one generation
    again = list(b.client().chat.completions.create(
        model="vllm-m", messages=body["messages"], stream=True, extra_headers=key
    ))  # fmt: skip
    assert {chunk.id for chunk in again} == {rid}
    assert "".join(c.choices[0].delta.content or "" for c in again if c.choices) == chat_answer(f"idem {tag}")
    assert len(generations(fake, f"idem {tag}")) == 1
    other = b.http().post("/v1/chat/completions", json=_chat_body(f"other {tag}"), headers=key)
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
    assert generations(fake, f"other {tag}") == []


def test_cancel_from_the_replica_that_does_not_own_the_request_stops_generation(
    pair: list[Replica], fake: FakeLLMServerThread
) -> None:
    a, b = pair
    fake.set_token_delay(0.1)
    tag = uuid.uuid4().hex
    with a.http() as http, http.stream("POST", "/v1/chat/completions", json=_chat_body(f"cancel {tag}")) as resp:
        rid = resp.headers["x-flo-request-id"]
        events = Events(resp)
        events.read(3)
        asked = time.monotonic()
        reply = b.http().delete(f"/v1/requests/{rid}")
        assert reply.status_code == 202 and reply.json()["owner"] == a.worker_id
        assert reply.json()["cancelled_here"] is False
        events.rest()
        took = time.monotonic() - asked
    assert events.error is not None and not events.done
    assert (events.error["code"], events.error["type"]) == ("cancelled", "invalid_request_error")
    assert took < 2.0, took
    assert len(generations(fake, f"cancel {tag}")) == 1
    wait_for(lambda: generations(fake, f"cancel {tag}")[0]["outcome"] != "started", 5, "the backend call to end")
    assert generations(fake, f"cancel {tag}")[0]["tokens_sent"] < TOKENS
    status = b.http().get(f"/v1/requests/{rid}").json()
    assert status["state"] == "Failed" and "cancelled" in status["error"]
    assert events.error["message"] == f"request {rid!r} failed: {status['error']}"  # one wording
    assert b.http().delete(f"/v1/requests/{rid}").status_code == 409
    # resuming it later, on the replica that did not run it (the outcome read from Redis): the same error
    for replica in (a, b):
        with replica.http() as http, http.stream("GET", f"/v1/requests/{rid}/stream") as resp:
            again = Events(resp)
            again.rest()
        assert again.error == events.error and "".join(again.texts) == "".join(events.texts)


def test_backend_failure_mid_stream_with_a_fallback_gives_the_whole_answer(
    pair: list[Replica], fake: FakeLLMServerThread
) -> None:
    fake.set_fault("vllm-m", "die_after:6")
    tag = uuid.uuid4().hex
    stream = pair[0].client().completions.create(model="vllm-m", prompt=f"fallback {tag}", stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == full_answer_text(f"fallback {tag}", TOKENS)
    assert [r["model"] for r in generations(fake, f"fallback {tag}")] == ["vllm-m", "together-m"]


def test_backend_failure_mid_stream_without_a_fallback_is_an_error_event_not_a_clean_end(
    pair: list[Replica], fake: FakeLLMServerThread
) -> None:
    fake.set_fault("*", "die_after:6")
    tag = uuid.uuid4().hex
    received = []
    stream = pair[0].client().completions.create(model="vllm-m", prompt=f"nofallback {tag}", stream=True)
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk.choices[0].text if chunk.choices else "")
            assert chunk.choices[0].finish_reason is None  # never a clean end
    answer = full_answer_text(f"nofallback {tag}", TOKENS)
    assert answer.startswith("".join(received)) and len("".join(received)) < len(answer)


@pytest.mark.parametrize(
    ("body", "headers", "status", "param"),
    [
        (b'{"model": "vllm-m", "messages": [', {}, 400, None),
        (json.dumps(_chat_body("x", model="no-such-model")).encode(), {}, 404, "model"),
        (json.dumps(_chat_body("x", n=2)).encode(), {}, 400, "n"),
        (json.dumps(_chat_body("x", tools=[{"type": "function"}])).encode(), {}, 400, "tools"),
        (json.dumps(_chat_body("x", temperature="hot")).encode(), {}, 400, "temperature"),
        (json.dumps(_chat_body("x" * (2 << 20))).encode(), {}, 413, None),
        (json.dumps(_chat_body("x")).encode(), {"authorization": ""}, 401, None),
        (json.dumps(_chat_body("x")).encode(), {"authorization": "Bearer wrong"}, 401, None),
    ],
    ids=["bad-json", "unknown-model", "n2", "tools", "bad-type", "oversized", "missing-key", "wrong-key"],
)
def test_bad_requests_get_their_status_and_openai_error_shape_and_change_nothing(
    pair: list[Replica], redis_server: RedisServer, body: bytes, headers: dict[str, str], status: int, param: Any
) -> None:
    import redis

    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    namespace = pair[0].namespace  # type: ignore[attr-defined]
    wait_for(lambda: not client.exists(f"{namespace}:active") or not client.zcard(f"{namespace}:active"), 20, "idle")
    before = dump_namespace(client, namespace)
    with pair[0].http() as http:
        reply = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json", **headers})
    assert reply.status_code == status
    assert reply.headers["x-flo-request-id"]
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert dump_namespace(client, namespace) == before
    assert not any(KEY.encode() in repr(value).encode() for value in before.values())


def test_models_health_readiness_and_metrics(pair: list[Replica]) -> None:
    with pair[0].http() as http:
        assert {m["id"] for m in http.get("/v1/models").json()["data"]} == {"vllm-m", "together-m"}
        assert http.get("/readyz").json()["status"] == "ready"
        assert "flo_gateway_requests_total" in http.get("/metrics").text
    assert httpx.get(f"{pair[0].url}/healthz").status_code == 200  # no key needed
    assert httpx.get(f"{pair[0].url}/v1/models").status_code == 401


def test_unknown_routes_and_methods_get_openai_error_json(pair: list[Replica]) -> None:
    with pair[0].http() as http:
        for method, path, status, code in (
            ("GET", "/nope", 404, "not_found"),
            ("POST", "/v1/embeddings", 404, "not_found"),
            ("PUT", "/v1/models", 405, "method_not_allowed"),
            ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ):
            reply = http.request(method, path)
            assert reply.status_code == status, (method, path)
            assert reply.headers["content-type"] == "application/json"
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == code and error["type"] == "invalid_request_error" and path in error["message"]
        assert "GET" in http.put("/v1/models").headers["allow"]


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["serve"], {}, "no backends configured"),
        (
            ["serve", "--backend", "Vllm=http://h:1,m", "--key-env", "FLO_TEST_UNSET_KEY"],
            {},
            "error: --key-env names $FLO_TEST_UNSET_KEY, which is not set",  # the flag, not [gateway] keys_env
        ),
        (["serve", "--backend", "Vllm=http://h:1,m", "--redis-url", "nope://x"], {}, "bad Redis URL"),
        (["serve", "--port", "70000"], {}, "TCP port"),
        (["serve", "--backend", "Vllm=http://h:1,m"], {"FLO_GATEWAY_PORT": "http"}, "invalid configuration"),
    ],
)
def test_serve_usage_mistakes_are_one_line_errors(argv: list[str], env: dict[str, str], message: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    done = subprocess.run(
        [sys.executable, "-m", "flo_coord", *argv], capture_output=True, text=True, env={**clean, **env}, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_port_taken_between_the_check_and_uvicorns_bind_is_still_one_line_and_exit_2(
    redis_server: RedisServer, fake: FakeLLMServerThread, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import socket

    from flo_coord.cli import gateway as serve_command
    from flo_coord.cli import main

    real_check = serve_command.check_port
    checks: list[int] = []

    def taken_after_the_first_check(host: str, port: int) -> None:
        checks.append(port)
        if len(checks) > 1:  # the first check "passed": another process took the port right after it
            real_check(host, port)

    monkeypatch.setattr(serve_command, "check_port", taken_after_the_first_check)
    for name in [k for k in os.environ if k.startswith("FLO_")]:
        monkeypatch.delenv(name)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv = ["serve", "--redis-url", redis_server.url, "--namespace", f"gw{uuid.uuid4().hex[:8]}",
                "--port", str(port), "--backend", f"Vllm={fake.base_url},vllm-m"]  # fmt: skip
        assert main(argv) == 2
    assert checks == [port, port]
    err = capsys.readouterr().err  # uvicorn's own log line of the failed bind, then ours; no traceback
    assert err.strip().splitlines()[-1] == f"flo-coord serve: error: port {port} on 127.0.0.1 is in use", err
    assert "Traceback" not in err and "never retrieved" not in err


def test_serve_help_says_what_it_takes_and_the_worker_id_it_picks(
    redis_server: RedisServer, fake: FakeLLMServerThread
) -> None:
    import re
    import socket

    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    run = [sys.executable, "-m", "flo_coord", "serve"]
    shown = subprocess.run([*run, "--help"], capture_output=True, text=True, env=clean, timeout=60).stdout
    words = " ".join(shown.split())
    assert "does not take requests from the Redis queue that 'flo-coord submit' writes to" in words
    assert "default <host>-<pid>-<random>" in words
    argv = ["--redis-url", redis_server.url, "--port", "0", "--backend", f"Vllm={fake.base_url},vllm-m"]
    proc = subprocess.Popen([*run, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=clean)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        worker_id = line.rsplit(" as ", 1)[1].strip()
        assert re.fullmatch(rf"{re.escape(socket.gethostname()[:40])}-{proc.pid}-[0-9a-f]{{6}}", worker_id), line
    finally:
        proc.kill()
        proc.wait(10)


def test_serve_on_a_port_in_use_is_a_one_line_error_before_waiting_for_redis() -> None:
    import socket

    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv = ["serve", "--backend", "Vllm=http://h:1,m", "--port", str(port), "--redis-url", "redis://127.0.0.1:1"]
        done = subprocess.run(
            [sys.executable, "-m", "flo_coord", *argv], capture_output=True, text=True, env=clean, timeout=60
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"flo-coord serve: error: port {port} on 127.0.0.1 is in use"]


def test_on_disconnect_cancel_ends_a_request_whose_client_left_and_did_not_come_back(
    redis_server: RedisServer, fake: FakeLLMServerThread
) -> None:
    fake.set_token_delay(0.1)
    tag = uuid.uuid4().hex
    with replicas(redis_server, fake, 1, "--on-disconnect", "cancel", "--disconnect-grace", "0.3") as (a,):
        with a.http() as http, http.stream("POST", "/v1/chat/completions", json=_chat_body(f"gone {tag}")) as resp:
            rid = resp.headers["x-flo-request-id"]
            Events(resp).read(2)
        status = wait_for(
            lambda: (s := a.http().get(f"/v1/requests/{rid}").json())["state"] in ("Failed", "Completed") and s,
            10,
            "the request to end",
        )
    assert status["state"] == "Failed" and "cancelled" in status["error"]
    assert generations(fake, f"gone {tag}")[0]["tokens_sent"] < TOKENS


def test_sigterm_hands_requests_back_and_ends_local_streams_with_an_error_event(
    redis_server: RedisServer, fake: FakeLLMServerThread
) -> None:
    fake.set_token_delay(0.05)
    tag = uuid.uuid4().hex
    with replicas(redis_server, fake, 2, "--grace", "0.3") as (a, b):
        with a.http() as http, http.stream("POST", "/v1/chat/completions", json=_chat_body(f"term {tag}")) as resp:
            rid = resp.headers["x-flo-request-id"]
            first = Events(resp)
            first.read(5)
            a.proc.send_signal(signal.SIGTERM)
            first.rest()
        assert first.error is not None and first.error["code"] == "replica_shutting_down" and not first.done
        assert a.proc.wait(15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
        with (
            b.http() as http,
            http.stream("GET", f"/v1/requests/{rid}/stream", headers={"last-event-id": str(first.last_id)}) as resp,
        ):
            rest = Events(resp).rest()
        assert "".join(first.texts) + rest == chat_answer(f"term {tag}")


def test_every_backend_rate_limited_is_a_429_and_none_answering_a_502(
    redis_server: RedisServer, fake: FakeLLMServerThread
) -> None:
    # replicas of its own: the failures open the namespace's circuit breakers
    with replicas(redis_server, fake, 1) as (a,):
        client = a.client()
        fake.set_fault("*", "rate429:0*100")
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="vllm-m", messages=[{"role": "user", "content": "limits"}])
        assert limited.value.status_code == 429 and limited.value.response.headers["x-flo-request-id"]
        fake.set_fault("*", "http5xx:100:500")
        with pytest.raises(openai.APIStatusError) as failed:
            list(client.chat.completions.create(
                model="vllm-m", messages=[{"role": "user", "content": "down"}], stream=True))  # fmt: skip
        assert failed.value.status_code == 502


def test_toml_model_groups_and_hashed_keys(redis_server: RedisServer, fake: FakeLLMServerThread, tmp_path: Any) -> None:
    import hashlib

    other_key = "sk-hashed-" + uuid.uuid4().hex
    config = tmp_path / "flo.toml"
    config.write_text(
        "[gateway]\n"
        f'key_hashes = ["sha256:{hashlib.sha256(other_key.encode()).hexdigest()}"]\n'
        + _deployments(fake)
        + '[[models]]\nname = "team-model"\ndeployments = ["Together", { name = "Vllm", tier = 2 }]\n'
    )
    tag = uuid.uuid4().hex
    with replicas(redis_server, fake, 1, "--config", str(config)) as (a,):
        client = openai.OpenAI(base_url=f"{a.url}/v1", api_key=other_key, max_retries=0)
        assert [m.id for m in client.models.list()] == ["team-model"]
        answer = client.completions.create(model="team-model", prompt=f"group {tag}")
        assert answer.choices[0].text == full_answer_text(f"group {tag}", TOKENS)
        assert [r["model"] for r in generations(fake, f"group {tag}")] == ["together-m"]  # the group's first
        assert a.client().models.list().data  # the key from --key-env works too
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="vllm-m", prompt="not in the mapping")


def _deployments(fake: FakeLLMServerThread) -> str:
    """The replicas' --backend flags as [[backends]] (a file's [[models]] name the file's deployments)."""
    return "".join(
        f'[[backends]]\nname = "{name}"\nbase_url = "{fake.base_url}"\nmodel = "{model}"\n'
        for name, model in (("Vllm", "vllm-m"), ("Together", "together-m"))
    )


def test_a_client_that_reads_nothing_does_not_hold_up_its_generation(
    pair: list[Replica], fake: FakeLLMServerThread
) -> None:
    a, b = pair
    tag = uuid.uuid4().hex
    with a.http() as http, http.stream("POST", "/v1/chat/completions", json=_chat_body(f"slow {tag}")) as resp:
        rid = resp.headers["x-flo-request-id"]
        # not reading: the answer is generated (and committed) at the backend's pace all the same
        wait_for(lambda: b.http().get(f"/v1/requests/{rid}").json()["state"] == "Completed", 10, "completion")
        quick = b.client().chat.completions.create(model="vllm-m", messages=[{"role": "user", "content": f"o {tag}"}])
        assert quick.choices[0].message.content == chat_answer(f"o {tag}")
        assert Events(resp).rest() == chat_answer(f"slow {tag}")  # and the slow reader still gets all of it


def test_a_model_group_fails_over_only_within_its_own_backends(
    redis_server: RedisServer, fake: FakeLLMServerThread, tmp_path: Any
) -> None:
    config = tmp_path / "flo.toml"
    config.write_text(
        _deployments(fake)
        + '[[models]]\nname = "solo"\ndeployments = ["Vllm"]\n'
        + '[[models]]\nname = "pair"\ndeployments = ["Together", { name = "Vllm", tier = 2 }]\n'
        + '[[models]]\nname = "local"\ndeployments = ["Vllm"]\nfallbacks = ["pair"]\nprivacy = "Sovereign"\n'
    )
    fake.set_fault("together-m", "die_after:4")
    tag = uuid.uuid4().hex
    with replicas(redis_server, fake, 1, "--config", str(config)) as (a,):
        client = a.client()
        text = "".join(c.choices[0].text for c in client.completions.create(
            model="pair", prompt=f"pair {tag}", stream=True) if c.choices)  # fmt: skip
        assert text == full_answer_text(f"pair {tag}", TOKENS)
        assert [r["model"] for r in generations(fake, f"pair {tag}")] == ["together-m", "vllm-m"]
        fake.set_fault("vllm-m", "die_after:4")
        with pytest.raises(openai.APIError):
            list(client.completions.create(model="solo", prompt=f"solo {tag}", stream=True))
        assert {r["model"] for r in generations(fake, f"solo {tag}")} == {"vllm-m"}  # retried, never Together
        # a Sovereign group whose only local deployment fails: its fallback's remote one is never asked
        with pytest.raises(openai.InternalServerError) as private:
            client.completions.create(model="local", prompt=f"local {tag}")
        assert private.value.status_code == 503 and private.value.body["code"] == "privacy_tier_unavailable"
        assert "Sovereign" in private.value.body["message"] and "Together" in private.value.body["message"]
        assert {r["model"] for r in generations(fake, f"local {tag}")} <= {"vllm-m"}


def test_a_request_kind_no_deployment_of_the_model_serves_is_a_400_that_stores_nothing(
    redis_server: RedisServer, fake: FakeLLMServerThread, tmp_path: Any
) -> None:
    """The Messages API has no prompt form: /v1/completions on an Anthropic-only group is the client's mistake."""
    config = tmp_path / "flo.toml"
    config.write_text('[[models]]\nname = "claude-only"\ndeployments = ["anth"]\n', encoding="utf-8")
    extra = ("--backend", f"anth={fake.base_url},claude-m,anthropic,Anthropic", "--config", str(config))
    with replicas(redis_server, fake, 1, *extra) as (replica,):
        keys = lambda: set(redis_server.client().keys(f"{replica.namespace}:*"))  # type: ignore[attr-defined]  # noqa: E731
        before = keys()
        reply = replica.http().post("/v1/completions", json={"model": "claude-only", "prompt": "hi"})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == "model" and "text completions" in error["message"]
        assert keys() == before
        chat = replica.http().post("/v1/chat/completions", json={**_chat_body("hi"), "model": "claude-only"})
        assert chat.status_code == 200, chat.text


def test_a_request_started_outside_the_gateway_streams_through_it(
    pair: list[Replica], redis_server: RedisServer
) -> None:
    """A worker's request (``flo-coord submit``, the Python API) has no presentation record: still resumable."""
    from flo_coord import FailoverManager

    a, b = pair
    rid, text = f"queued-{uuid.uuid4().hex[:8]}", "committed by a worker, "
    namespace = a.namespace  # type: ignore[attr-defined]
    with FailoverManager(url=redis_server.url, namespace=namespace, worker_id="outside-w") as manager:
        manager.start_tracking(rid, None, messages=[{"role": "user", "content": "hi"}])
        manager.append_tokens(rid, text)
        with a.http() as http, http.stream("GET", f"/v1/requests/{rid}/stream?offset=10") as resp:
            assert resp.status_code == 200, resp.read()
            live = Events(resp)
            live.read(1)
            assert "".join(live.texts) == text[10:]
            manager.append_tokens(rid, "then the rest")
            manager.complete(rid)
            rest = live.rest()
        assert live.done and rest == text[10:] + "then the rest"
    # after it finished, from the other replica, from the start
    with b.http() as http, http.stream("GET", f"/v1/requests/{rid}/stream") as resp:
        assert resp.status_code == 200
        again = Events(resp)
        assert again.rest() == text + "then the rest" and again.done
    missing = b.http().get(f"/v1/requests/never-{uuid.uuid4().hex[:8]}/stream")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
