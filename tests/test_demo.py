"""flo-coord demo end to end: gateway replicas (flo-coord serve) with HTTP streaming clients, one
replica SIGKILLed mid-answer, a backend cut mid-answer, clients resuming on other replicas with
Last-Event-ID, every answer verified, and nothing left running afterwards (also after Ctrl-C)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_redis_server

from flo_coord.cli.demo import percentile, summary_table
from flo_coord.testing.embedded import RedisServer

CLI = [sys.executable, "-m", "flo_coord"]
FAST = ["--token-delay", "0.05", "--tokens", "40", "--lease-ttl", "1", "--plain"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by anyone) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_kills_a_replica_its_clients_resume_elsewhere_and_every_answer_is_verified(tmp_path: Path) -> None:
    require_redis_server()
    summary_file = tmp_path / "summary.json"
    done = subprocess.run(
        [*CLI, "demo", "--requests", "6", *FAST, "--summary-json", str(summary_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    summary = json.loads(summary_file.read_text())
    assert summary["ok"] and summary["verified"] == summary["requests"] == 6
    assert summary["replicas"] == 3 and summary["killed_replica"] in {"r1", "r2", "r3"}
    killed = summary["killed_replica"]
    assert summary["streams_on_killed_replica"] >= 1 and summary["takeovers"] >= 1
    # every stream of the killed replica resumed, over HTTP, on another replica
    assert summary["resumes"] >= summary["streams_on_killed_replica"]
    assert summary["resumed_requests"] == summary["streams_on_killed_replica"]
    assert summary["backend_failovers"] >= 1  # the backend cut is on by default
    assert summary["tokens_recovered"] > 0 and summary["chars_recovered"] > 0
    assert 0 < summary["takeover_latency_p50"] <= summary["takeover_latency_p99"] < 10
    # the line view (stdout is a pipe): the kill, the resumes with Last-Event-ID, the takeovers, the failovers
    line = rf"stream from {killed} lost at offset (\d+) .*; resuming on (r\d) with Last-Event-ID (\S+):(\d+)"
    resumes = re.findall(line, done.stdout)
    assert len(resumes) == summary["resumes"]
    for offset, target, _, event_offset in resumes:
        assert target != killed and int(offset) == int(event_offset) > 0
    assert "SIGKILL" in done.stdout and "took over" in done.stdout and "failing over" in done.stdout
    assert "verified byte for byte  6/6" in done.stdout and "PASS" in done.stdout
    # the replicas listened on loopback ports
    assert all(re.fullmatch(r"http://127\.0\.0\.1:\d+", url) for url in summary["replica_urls"].values())
    # everything it started is gone: redis-server and the three replicas, and their logs
    assert set(summary["pids"]) == {"redis-server", "r1", "r2", "r3"}
    assert not [name for name, pid in summary["pids"].items() if _alive(pid)]
    assert not os.path.exists(summary["logs"])


def test_a_short_answer_fails_the_verification() -> None:
    """The check can fail: a backend that ends every answer early (finish_reason "length") is caught."""
    import asyncio

    from flo_coord.cli.demo import VLLM_MODEL, Demo
    from flo_coord.cli.parser import build_parser

    require_redis_server()
    args = build_parser().parse_args(["demo", "--requests", "2", "--no-kill", "--no-backend-fault", "--tokens", "8",
                                      "--token-delay", "0.01", "--plain"])  # fmt: skip
    demo = Demo(args)
    try:
        demo.start()
        demo.fake.set_fault(VLLM_MODEL, "finish:length:3")
        assert asyncio.run(demo.run()) is False
    finally:
        demo.cleanup()
        demo.finish_logs(keep=False)
    summary = demo.summary(1.0)
    assert not summary["ok"] and summary["verified"] == 0 and summary["wrong"] == ["req-01", "req-02"]
    assert all(0 < len(t.received) < len(t.expected) and t.finish_reason == "length" for t in demo.tracks)


def test_demo_against_a_given_redis_uses_and_removes_its_own_namespace(tmp_path: Path) -> None:
    require_redis_server()
    with RedisServer() as server:
        client = server.client()
        client.set("someone-else:key", "kept")
        done = subprocess.run(
            [*CLI, "demo", "--redis-url", server.url, "--requests", "3", "--no-kill", "--tokens", "12",
             "--no-backend-fault", "--token-delay", "0.01", "--plain", "--summary-json", str(tmp_path / "s.json")],
            capture_output=True, text=True, timeout=120, env=_env(),
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout, done.stderr)
        summary = json.loads((tmp_path / "s.json").read_text())
        assert summary["verified"] == 3 and summary["killed_replica"] is None and summary["resumes"] == 0
        assert summary["namespace"].startswith("demo-")
        assert "redis-server" not in summary["pids"]  # not ours to start or stop
        assert client.get("someone-else:key") == b"kept"
        assert not list(client.scan_iter(match=f"{summary['namespace']}:*"))
        # a namespace in use is refused before anything starts
        refused = subprocess.run(
            [*CLI, "demo", "--redis-url", server.url, "--namespace", "someone-else"],
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert refused.returncode == 2 and "already holds keys" in refused.stderr


def test_demo_falls_back_to_fakeredis_without_a_redis_server_binary(tmp_path: Path) -> None:
    env = {**_env(), "FLO_REDIS_SERVER": str(tmp_path / "no-such-redis-server")}
    done = subprocess.run(
        [*CLI, "demo", "--requests", "3", "--tokens", "24", "--token-delay", "0.05", "--lease-ttl", "1", "--plain",
         "--summary-json", str(tmp_path / "s.json")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout, done.stderr)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert "fakeredis" in summary["redis"] and summary["verified"] == 3 and summary["takeovers"] >= 1
    assert summary["resumes"] >= 1
    assert not [name for name, pid in summary["pids"].items() if _alive(pid)]


def test_ctrl_c_stops_everything_the_demo_started() -> None:
    require_redis_server()
    proc = subprocess.Popen(
        [*CLI, "demo", "--requests", "4", "--token-delay", "0.5", "--no-kill", "--plain"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        pids: dict[str, int] = {}
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            if "started " in line:
                pids = {name: int(pid) for name, pid in re.findall(r"([\w-]+) \(pid (\d+)\)", line)}
            if "clients streaming" in line:
                break
            assert time.monotonic() < deadline
        assert set(pids) == {"redis-server", "r1", "r2", "r3"}
        time.sleep(0.5)  # mid-stream
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert "logs kept" not in stderr  # an interruption is no failure to diagnose
    assert not [name for name, pid in pids.items() if _alive(pid)]


def test_percentiles_and_a_failing_summary() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    text = summary_table({
        "ok": False, "requests": 2, "verified": 1, "wrong": ["req-02"], "killed_replica": None, "killed_at": None,
        "streams_on_killed_replica": 0, "takeovers": 0, "resumes": 0, "resumed_requests": 0, "backend_failovers": 0,
        "tokens_recovered": 0,
        "chars_recovered": 0, "takeover_latency_p50": None, "takeover_latency_p99": None, "claim_latency_p50": None,
        "claim_latency_p99": None, "lease_ttl": 1.0, "wall_seconds": 1.0,
    })  # fmt: skip
    assert "1/2" in text and "req-02" in text and "FAIL" in text


def test_live_view_redraws_in_place_without_wrapping(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import os as _os

    from flo_coord.cli import progress

    monkeypatch.setattr(progress.shutil, "get_terminal_size", lambda fallback=None: _os.terminal_size((100, 30)))
    requests = [progress.RequestView(f"req-{i}", total_chars=100, total_tokens=10) for i in range(3)]
    workers = [progress.WorkerView("w1", 1), progress.WorkerView("w2", 2)]
    out = io.StringIO()
    view = progress.LiveView(out, "a title that is far too long to fit on one line of this narrow terminal " * 2,
                             requests, workers)  # fmt: skip
    requests[0].chars, requests[0].owner, requests[0].epoch = 50, "w1", 1
    view.refresh()
    workers[0].killed = True
    requests[0].takeovers, requests[0].owner = 1, "w2"
    view.event("w2 took over req-0")
    view.refresh()
    view.close()
    frames = re.split(r"\x1b\[\d+F", out.getvalue())
    assert len(frames) == 3  # first draw, then two redraws moving the cursor back up
    plain = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in frames[-1].split("\n")]
    assert max(len(line) for line in plain) <= 99  # never wraps, whatever the title
    assert any("SIGKILLed" in line for line in plain) and any("taken over" in line for line in plain)
    assert out.getvalue().endswith("\x1b[?25h")  # the cursor is shown again
