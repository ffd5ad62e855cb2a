"""Observability: the worker's Prometheus metrics and the structured log lines."""

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
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
from conftest import require_redis_server

from flo_coord import FailoverAttempt, FailoverResult, LeaseLostError, ServingBackend, logs
from flo_coord.metrics import METRICS, MetricsUnavailableError, WorkerMetrics
from flo_coord.store.facade import AsyncFailoverManager
from flo_coord.testing.embedded import RedisServer, free_port
from flo_coord.testing.fakellm import FakeLLMServerThread, full_answer_text

CLI = [sys.executable, "-m", "flo_coord"]


def _sample(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in metrics")


def observed(metrics: WorkerMetrics, **kwargs: Any) -> AsyncFailoverManager:
    """A manager that reports to ``metrics`` (as ``worker --metrics-port`` builds it)."""
    manager = AsyncFailoverManager(observer=metrics, **kwargs)
    metrics.track_active(manager)
    return manager


def test_observed_manager_counts_what_a_coordinator_does() -> None:
    server = fakeredis.FakeServer()
    metrics = WorkerMetrics()

    async def scenario() -> None:
        kw = {"namespace": f"m{uuid.uuid4().hex[:6]}"}
        first = observed(metrics, redis=fakeredis.FakeAsyncRedis(server=server), worker_id="a", lease_ttl=0.2, **kw)
        await first.start_tracking("r1", "prompt", "Vllm")
        await first.append_tokens("r1", "Hello")
        await first.append_tokens("r1", " world")
        assert await first.heartbeat() == 1
        await first.record_attempt(
            FailoverAttempt(
                backend=ServingBackend.Vllm, started_at=time.time(), result=FailoverResult.BackendError("cut")
            )
        )
        text = metrics.render().decode()
        assert _sample(text, "flo_active_requests") == 1
        await asyncio.sleep(0.3)  # a's lease runs out
        second_metrics = WorkerMetrics()
        second = observed(
            second_metrics, redis=fakeredis.FakeAsyncRedis(server=server), worker_id="b", lease_ttl=5, **kw
        )
        (ctx,) = await second.claim_orphans()
        assert ctx.generated_prefix == "Hello world"
        with pytest.raises(LeaseLostError):
            await first.append_tokens("r1", "!")
        assert await second.complete("r1")
        own = second_metrics.render().decode()
        assert _sample(own, "flo_takeovers_total") == 1
        assert _sample(own, "flo_takeover_prefix_chars_total") == len("Hello world")
        assert _sample(own, "flo_requests_finished_total", '{state="completed"}') == 1

    asyncio.run(scenario())
    text = metrics.render().decode()
    assert _sample(text, "flo_requests_started_total") == 1
    assert _sample(text, "flo_append_latency_seconds_count") == 2
    assert _sample(text, "flo_committed_chars_total") == len("Hello world")
    assert _sample(text, "flo_lease_renewals_total") == 1
    assert _sample(text, "flo_lease_lost_total") == 1
    assert _sample(text, "flo_failover_attempts_total", '{backend="Vllm",result="BackendError"}') == 1
    for name, _, _ in METRICS:
        assert name in text


def test_metrics_need_prometheus_client_only_when_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsUnavailableError, match=r"flo-coord\[metrics\]"):
        WorkerMetrics()
    # the worker command says what to install, in one line, with exit code 2
    (tmp_path / "prometheus_client.py").write_text("raise ImportError('not installed')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run(
        [*CLI, "worker", "--backend", "Vllm=http://127.0.0.1:1,m", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 2 and "pip install 'flo-coord[metrics]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_worker_serves_metrics_after_a_request(tmp_path: Path) -> None:
    require_redis_server()
    port = free_port()
    namespace = f"met{uuid.uuid4().hex[:6]}"
    log = tmp_path / "worker.log"
    with RedisServer() as server, FakeLLMServerThread(token_delay=0.005) as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
        env.update(FLO_REDIS_URL=server.url, FLO_NAMESPACE=namespace, FLO_METRICS_PORT=str(port), FLO_LOG_FORMAT="json")
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                [*CLI, "worker", "--worker-id", "met-1", "--backend", f"Vllm={fake.base_url},m", "--exit-with-parent"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            done = subprocess.run(
                [*CLI, "submit", "metrics please"], capture_output=True, text=True, env=env, timeout=60
            )
            assert done.returncode == 0, (done.stderr, log.read_text())
            assert done.stdout == full_answer_text("metrics please") + "\n"
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        finally:
            worker.terminate()
            assert worker.wait(15) == 0
    for name, _, _ in METRICS:
        assert name in text, name
    assert _sample(text, "flo_failover_attempts_total", '{backend="Vllm",result="Success"}') == 1
    assert _sample(text, "flo_requests_finished_total", '{state="completed"}') == 1
    assert _sample(text, "flo_append_latency_seconds_count") >= 1
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    about = [r for r in records if "request_id" in r]
    assert about and all(r["worker_id"] == "met-1" and "epoch" in r for r in about)


def test_log_lines_carry_request_fields_from_extras_context_and_process() -> None:
    out = io.StringIO()
    logs.configure("json", "INFO", stream=out, worker_id="w9")
    try:
        log = logging.getLogger("flo_coord.test")
        log.info("plain")
        with logs.bound(request_id="r1", epoch=3):
            log.info("inside %s", "context")
        logs.request_logger(log, "r2", 4).warning("adapter")
        log.info("extra", extra={"request_id": "r3", "epoch": 5})
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r.get("request_id"), r.get("epoch"), r["worker_id"]) for r in lines] == [
        (None, None, "w9"),
        ("r1", 3, "w9"),
        ("r2", 4, "w9"),
        ("r3", 5, "w9"),
    ]
    assert lines[1]["msg"] == "inside context" and lines[2]["level"] == "warning"

    out = io.StringIO()
    logs.configure("kv", "INFO", stream=out, worker_id="w9")
    try:
        with logs.bound(request_id="r1", epoch=2):
            logging.getLogger("flo_coord.test").info('a "quoted" message')
    finally:
        logging.getLogger().handlers.clear()
    line = out.getvalue().strip()
    assert "worker_id=w9 request_id=r1 epoch=2 " in line
    assert line.endswith('msg="a \\"quoted\\" message"')
