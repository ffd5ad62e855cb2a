"""The flo-coord command: help, user mistakes, configuration precedence, and every client
subcommand against a real redis-server with a worker subprocess and the fake LLM."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import require_redis_server

from flo_coord.cli import main
from flo_coord.cli.common import load
from flo_coord.cli.parser import build_parser
from flo_coord.testing.embedded import RedisServer, free_port
from flo_coord.testing.fakellm import FakeLLMServerThread, full_answer_text

COMMANDS = [
    "demo",
    "worker",
    "serve",
    "submit",
    "follow",
    "inspect",
    "stats",
    "history",
    "top",
    "reap",
    "install-functions",
    "serve-fake-llm",
    "import-litellm",
    "bench",
]
CLI = [sys.executable, "-m", "flo_coord"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    env.update(extra)
    return env


def run_cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env or _env(), **kw)


def run_all(argvs: list[list[str]], env: dict[str, str] | None = None) -> list[tuple[int, str, str]]:
    """Run several CLI invocations at once (each is a fresh interpreter)."""
    procs = [
        subprocess.Popen([*CLI, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or _env())
        for a in argvs
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        out.append((p.returncode, stdout, stderr))
    return out


# ------------------------------------------------------------------ help & mistakes


def test_every_subcommand_has_help_and_the_parser_knows_them_all() -> None:
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert known == set(COMMANDS)
    results = run_all([["--help"], ["--version"]] + [[c, "--help"] for c in COMMANDS])
    for argv, (code, stdout, stderr) in zip(
        [["--help"], ["--version"]] + [[c] for c in COMMANDS], results, strict=True
    ):
        assert code == 0, (argv, stderr)
        assert stdout.strip(), argv
        assert "Traceback" not in stderr
    assert "flo-coord" in results[1][1]


DEAD_REDIS = "redis://127.0.0.1:1/0"
MISTAKES: list[tuple[list[str], dict[str, str], str]] = [
    (["stats", "--redis-url", DEAD_REDIS], {}, "--redis-url"),
    (["top", "--once"], {"FLO_REDIS_URL": DEAD_REDIS}, "127.0.0.1:1"),
    (["inspect", "r1", "--redis-url", "nope://x"], {}, "bad Redis URL"),
    (["worker"], {}, "no backends configured"),
    (["worker", "--backend", "Vllm"], {}, "NAME=URL,MODEL"),
    (["worker", "--backend", "Nope=http://h:1,m"], {}, "unknown backend"),
    (["worker", "--backend", "Vllm=http://h:1,m"], {"FLO_CONCURRENCY": "many"}, "FLO_CONCURRENCY"),
    # an unreachable Redis is waited for (tests/test_startup_wait.py); a bad URL is a usage mistake
    (["worker", "--backend", "Vllm=http://h:1,m", "--redis-url", "nope://x"], {}, "bad Redis URL"),
    (["worker", "--lease-ttl", "-1"], {}, "--lease-ttl"),
    (["submit"], {}, "no prompt"),
    (["follow"], {}, "REQUEST_ID"),
    (["stats", "--config", "/nonexistent/flo.toml"], {}, "does not exist"),
    (["stats"], {"FLO_CONFIG": "/nonexistent/flo.toml"}, "does not exist"),
    (["history", "-n", "lots"], {}, "whole number"),
    (["history", "-n", "1000"], {}, "keeps only the newest 100 entries"),
    (["demo", "--requests", "0"], {}, "--requests"),
    (["demo", "--replicas", "1"], {}, "--replicas 2"),
    (["demo", "--kill-at", "1.5"], {}, "between 0 and 1"),
    (["worker", "--backend", "Vllm=http://h:1,m,grpc"], {}, "KIND must be"),
    (["serve-fake-llm", "--fault", "m=explode"], {}, "bad fault"),
    (["serve-fake-llm", "--fault", "nomodel"], {}, "MODEL=SPEC"),
    (["nonsense"], {}, "invalid choice"),
    # a bad flag of a subcommand points at that subcommand's own help
    (["submit", "hi", "--bogus"], {}, "see 'flo-coord submit --help'"),
    (["top", "--once", "--nope", "1"], {}, "see 'flo-coord top --help'"),
    (["submit", "--message", "robot=hi"], {}, "ROLE=TEXT"),
    (["submit", "--message", "user="], {}, "ROLE=TEXT"),
    (["submit", "a prompt", "--message", "user=hi"], {}, "not both"),
    (["submit", "--message", "user=hi", "--messages-file", "m.json"], {}, "not both"),
    (["submit", "--messages-file", "/nonexistent/m.json"], {}, "cannot read --messages-file"),
]


def test_user_mistakes_exit_2_with_one_line_and_no_traceback() -> None:
    procs = []
    for argv, env, _ in MISTAKES:
        procs.append(
            subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))
        )
    for (argv, _, expected), proc in zip(MISTAKES, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2, (argv, stdout, stderr)
        assert "Traceback" not in stderr, argv
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, (argv, stderr)
        assert lines[0].startswith("flo-coord"), lines
        assert expected in lines[0], (argv, lines[0])


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json", "is not JSON"),
        ("[]", "must hold a JSON list"),
        ('{"model": "m"}', "must hold a JSON list"),
        ('[{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]', "message 1 must be"),
        ('[{"role": "user", "content": 3}]', "message 0 must be"),
        ('[{"role": "user", "content": "hi", "tool_calls": []}]', "message 0 must be"),
    ],
)
def test_a_bad_messages_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    path = tmp_path / "m.json"
    path.write_text(content)
    assert main(["submit", "--messages-file", str(path), "--redis-url", DEAD_REDIS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flo-coord submit: error: ") and expected in err[0], err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


# ---------------------------------------------------------------- configuration


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "flo.toml"
    config.write_text(
        '[redis]\nurl = "redis://file:1/0"\nnamespace = "file-ns"\n[ownership]\nlease_ttl = 7.0\nretention = 60.0\n'
        '[failover]\nfallback_order = ["Ollama", "Vllm"]\n'
        '[[backends]]\nname = "Ollama"\nkind = "ollama"\nbase_url = "http://o:1"\nmodel = "m"\n'
    )
    args = SimpleNamespace(config=str(config), redis_url=None, namespace=None, lease_ttl=None, backend=None)
    for name in ("FLO_REDIS_URL", "FLO_NAMESPACE", "FLO_LEASE_TTL", "FLO_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    s = load(args)
    assert (s.redis.url, s.redis.namespace, s.ownership.lease_ttl, s.ownership.retention) == (
        "redis://file:1/0",
        "file-ns",
        7.0,
        60.0,
    )
    assert [b.name for b in s.backends] == ["Ollama"]
    monkeypatch.setenv("FLO_NAMESPACE", "env-ns")
    monkeypatch.setenv("FLO_LEASE_TTL", "3.5")
    s = load(args)
    assert (s.redis.url, s.redis.namespace, s.ownership.lease_ttl) == ("redis://file:1/0", "env-ns", 3.5)
    args.namespace, args.lease_ttl, args.redis_url = "flag-ns", 1.25, "redis://flag:2/0"
    args.backend = ["Vllm=http://v:1,llama", "Groq=http://g:1,mix"]
    s = load(args)
    assert (s.redis.url, s.redis.namespace, s.ownership.lease_ttl) == ("redis://flag:2/0", "flag-ns", 1.25)
    assert [b.name for b in s.backends] == ["Vllm", "Groq"]  # flags replace the file's backends...
    assert [b.value for b in s.failover.fallback_order][:3] == ["Vllm", "Groq", "Ollama"]  # ...and lead the order
    monkeypatch.setenv("FLO_CONFIG", str(config))
    s = load(SimpleNamespace(config=None, redis_url=None, namespace=None, lease_ttl=None, backend=None))
    assert s.redis.url == "redis://file:1/0"  # FLO_CONFIG names the file when --config is absent
    monkeypatch.delenv("FLO_CONFIG")
    monkeypatch.delenv("FLO_NAMESPACE")
    monkeypatch.delenv("FLO_LEASE_TTL")
    s = load(SimpleNamespace(config=None, redis_url=None, namespace=None, lease_ttl=None, backend=None))
    assert (s.redis.url, s.redis.namespace, s.ownership.lease_ttl) == ("redis://localhost:6379/0", "flo", 5.0)


def test_bench_forwards_every_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flo_coord.cli import serve

    script = tmp_path / "bench.py"
    # a dataclass with string annotations, as scripts/bench.py has: it needs the module in sys.modules
    script.write_text(
        "from __future__ import annotations\nimport json, sys\nfrom dataclasses import dataclass, field\n"
        "@dataclass\nclass Args:\n    argv: list[str] = field(default_factory=list)\n"
        "def main(argv):\n    print(json.dumps(Args(argv).argv))\n    return 3\n"
    )
    monkeypatch.setattr(serve, "_bench_script", lambda: script)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["bench", "--requests", "5", "--", "x"]) == 3
    assert json.loads(out.getvalue()) == ["--requests", "5", "--", "x"]


def test_follow_resumes_from_its_offset_when_the_connection_breaks(monkeypatch: pytest.MonkeyPatch) -> None:
    from flo_coord.cli import client
    from flo_coord.errors import CoordinatorUnavailableError
    from flo_coord.execution import delivery

    answer = "0123456789abcdefghij"
    offsets: list[int] = []

    async def flaky_follow(manager: Any, rid: str, offset: int = 0, *, wait: float = 0.0) -> Any:
        offsets.append(offset)
        if len(offsets) == 1:
            yield answer[offset:7]
            raise CoordinatorUnavailableError("follow", rid, ConnectionError("reset"))
        for i in range(offset, len(answer), 4):
            yield answer[i : i + 4]

    monkeypatch.setattr(delivery, "follow", flaky_follow)
    monkeypatch.setattr(client, "RECONNECT_PAUSE", 0.0)
    out = io.StringIO()
    written = asyncio.run(client.stream_answer(None, "r1", 3, wait=0, timeout=10, out=out))  # type: ignore[arg-type]
    assert out.getvalue() == answer[3:]
    assert written == len(answer) - 3
    assert offsets == [3, 7]


# ------------------------------------------------------- against a live deployment


class Deployment(SimpleNamespace):
    url: str
    namespace: str
    fake: FakeLLMServerThread
    worker: subprocess.Popen
    log: Path

    def cli(self, *args: str, timeout: float = 60, namespace: str | None = None) -> subprocess.CompletedProcess:
        env = _env(FLO_REDIS_URL=self.url, FLO_NAMESPACE=namespace or self.namespace)
        return run_cli(*args, timeout=timeout, env=env)

    def backends(self) -> list[str]:
        return [
            "--backend",
            f"Vllm={self.fake.base_url},cli-vllm",
            "--backend",
            f"Ollama={self.fake.base_url},cli-ol,ollama",
        ]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    require_redis_server()
    log = tmp_path_factory.mktemp("cli") / "worker.log"
    with RedisServer() as server, FakeLLMServerThread(token_delay=0.01) as fake:
        d = Deployment(url=server.url, namespace=f"cli{uuid.uuid4().hex[:8]}", fake=fake, log=log)
        with open(log, "wb") as out:
            d.worker = subprocess.Popen(
                [*CLI, "worker", "--worker-id", "cli-w1", "--lease-ttl", "1", *d.backends(), "--exit-with-parent"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(FLO_REDIS_URL=server.url, FLO_NAMESPACE=d.namespace),
            )
        try:
            deadline = time.monotonic() + 30
            while "ready: worker cli-w1" not in log.read_text():
                assert d.worker.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            yield d
        finally:
            d.worker.terminate()
            d.worker.wait(15)


def test_submit_streams_the_exact_answer_and_the_record_reads_back(deployment: Deployment) -> None:
    prompt = "What does a fencing epoch protect?"
    done = deployment.cli("submit", prompt, "--request-id", "cli-r1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == full_answer_text(prompt) + "\n"
    assert "cli-r1" in done.stderr

    follow, rest, inspect, stats, history, again = run_all(
        [
            ["follow", "cli-r1"],
            ["follow", "cli-r1", "--offset", "20"],
            ["inspect", "cli-r1", "--json"],
            ["stats", "--json"],
            ["history", "--json", "--request-id", "cli-r1"],
            ["submit", "again", "--request-id", "cli-r1"],
        ],
        env=_env(FLO_REDIS_URL=deployment.url, FLO_NAMESPACE=deployment.namespace),
    )
    assert follow[0] == 0 and follow[1] == full_answer_text(prompt) + "\n"
    assert rest[0] == 0 and rest[1] == full_answer_text(prompt)[20:] + "\n"
    record = json.loads(inspect[1])
    assert record["kind"] == "outcome" and record["outcome"]["state"] == "Completed"
    assert record["answer"] == full_answer_text(prompt) and record["outcome"]["owner"] == "cli-w1"
    assert json.loads(stats[1])["successful"] >= 1
    entries = json.loads(history[1])
    assert entries and entries[-1]["kind"] == "attempt" and entries[-1]["result"] == "Success"
    assert again[0] == 2 and "already in use" in again[2]  # a request id is never reused

    table = deployment.cli("inspect", "cli-r1")
    assert table.returncode == 0 and "Completed" in table.stdout and "cli-w1" in table.stdout
    listing = deployment.cli("history", "-n", "5")
    assert listing.returncode == 0 and "cli-r1" in listing.stdout and "Success" in listing.stdout
    unknown = deployment.cli("inspect", "no-such-request")
    assert unknown.returncode == 2 and "unknown request" in unknown.stderr and "Traceback" not in unknown.stderr

    # every worker line about the request names it, with the worker id and the epoch
    lines = [line for line in deployment.log.read_text().splitlines() if "cli-r1" in line]
    assert lines and all("worker_id=cli-w1" in line and "request_id=cli-r1" in line for line in lines)
    assert any("epoch=1" in line for line in lines)
    # a new request is "starting", never "resuming ... from 0 chars"
    assert any("starting cli-r1 at epoch 1" in line for line in lines)
    assert not any("resuming" in line for line in lines)


def test_outputs_say_what_is_true(deployment: Deployment) -> None:
    """An unknown request is unknown; an offset past the end is an error; the end itself is an empty answer."""
    prompt = "Where does the answer end?"
    assert deployment.cli("submit", prompt, "--request-id", "cli-end").returncode == 0
    length = len(full_answer_text(prompt))
    unknown, empty, past, at_end, exact = run_all(
        [
            ["history", "--request-id", "no-such-request"],
            ["history", "--request-id", "cli-end", "--json"],
            ["follow", "cli-end", "--offset", str(length + 1)],
            ["follow", "cli-end", "--offset", str(length)],
            ["follow", "cli-end", "--offset", str(length - 3)],
        ],
        env=_env(FLO_REDIS_URL=deployment.url, FLO_NAMESPACE=deployment.namespace),
    )
    assert unknown[0] == 2 and "unknown request 'no-such-request'" in unknown[2], unknown
    assert "no history" not in unknown[1]
    assert empty[0] == 0 and json.loads(empty[1])[-1]["request_id"] == "cli-end"
    assert past[0] == 2 and past[1] == "" and f"past the end of the answer of cli-end ({length} chars)" in past[2]
    assert at_end[0] == 0 and at_end[1] == "", at_end
    assert exact[0] == 0 and exact[1] == full_answer_text(prompt)[-3:] + "\n"


def test_submit_sends_chat_messages(deployment: Deployment, tmp_path: Path) -> None:
    from flo_coord.testing.fakellm import render_messages

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a lease?"}]
    expected = full_answer_text(render_messages(chat))
    flags = deployment.cli("submit", "--message", "system=Be brief.", "--message", "user=What is a lease?")
    assert flags.returncode == 0, flags.stderr
    assert flags.stdout == expected + "\n"
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"model": "ignored", "messages": chat}))
    from_file = deployment.cli("submit", "--messages-file", str(path), "--request-id", "cli-chat")
    assert from_file.returncode == 0 and from_file.stdout == expected + "\n", from_file.stderr
    record = json.loads(deployment.cli("inspect", "cli-chat", "--json").stdout)
    assert record["answer"] == expected


def test_a_taken_over_request_is_logged_as_resuming(deployment: Deployment) -> None:
    from flo_coord import AsyncFailoverManager

    prompt = "Who carries on?"
    prefix = full_answer_text(prompt)[:30]

    async def abandon() -> None:  # a worker that died after committing 30 characters
        manager = AsyncFailoverManager(
            url=deployment.url, namespace=deployment.namespace, worker_id="dead", lease_ttl=0.2
        )
        await manager.start_tracking("cli-orphan", prompt, "Vllm")
        await manager.append_tokens("cli-orphan", prefix)
        await manager.aclose()

    asyncio.run(abandon())
    answer = deployment.cli("follow", "cli-orphan", "--timeout", "30")
    assert answer.returncode == 0 and answer.stdout == full_answer_text(prompt) + "\n", answer.stderr
    lines = [line for line in deployment.log.read_text().splitlines() if "cli-orphan" in line]
    assert any("resuming cli-orphan at epoch 2 from 30 chars" in line for line in lines), lines
    assert not any("starting cli-orphan" in line for line in lines)


def test_top_and_inspect_show_a_live_request(deployment: Deployment) -> None:
    from flo_coord import AsyncFailoverManager

    namespace = f"live{uuid.uuid4().hex[:6]}"

    async def track() -> None:
        manager = AsyncFailoverManager(url=deployment.url, namespace=namespace, worker_id="holder", lease_ttl=60)
        await manager.start_tracking("live-1", "a prompt", "Vllm")
        await manager.append_tokens("live-1", "Hello there")
        await manager.aclose()

    asyncio.run(track())
    top = deployment.cli("top", "--once", namespace=namespace)
    assert top.returncode == 0, top.stderr
    assert "live-1" in top.stdout and "holder" in top.stdout and "OWNER" in top.stdout
    rows = json.loads(deployment.cli("top", "--once", "--json", namespace=namespace).stdout)["active"]
    assert rows[0]["request_id"] == "live-1" and rows[0]["owner"] == "holder" and rows[0]["epoch"] == 1
    assert 0 < rows[0]["lease_remaining"] <= 60 and rows[0]["chars"] == len("Hello there")
    record = json.loads(deployment.cli("inspect", "live-1", "--json", namespace=namespace).stdout)
    assert record["kind"] == "context" and record["context"]["generated_prefix"] == "Hello there"


def test_reap_reports_claims_and_resumes_orphans(deployment: Deployment) -> None:
    from flo_coord import AsyncFailoverManager

    namespace = f"reap{uuid.uuid4().hex[:6]}"  # no worker here: only the command reaps
    prompt = "Who finishes an orphan?"
    prefix = full_answer_text(prompt)[:25]

    async def abandon(rid: str) -> None:
        manager = AsyncFailoverManager(url=deployment.url, namespace=namespace, worker_id="dead", lease_ttl=0.2)
        await manager.start_tracking(rid, prompt, "Vllm")
        await manager.append_tokens(rid, prefix)
        await manager.aclose()

    asyncio.run(abandon("orphan-1"))
    time.sleep(0.4)  # the lease runs out: the request is an orphan
    report = deployment.cli("reap", "--json", namespace=namespace)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["orphans"] == ["orphan-1"]
    claimed = deployment.cli("reap", "--claim", "--lease-ttl", "0.3", "--worker-id", "claimer", namespace=namespace)
    assert claimed.returncode == 0 and "orphan-1" in claimed.stdout and "not resumed" in claimed.stdout
    time.sleep(0.5)  # the claimer's lease runs out too
    resumed = deployment.cli("reap", "--json", *deployment.backends(), namespace=namespace)
    assert resumed.returncode == 0, resumed.stderr
    (row,) = json.loads(resumed.stdout)["resumed"]
    assert row["request_id"] == "orphan-1" and row["state"] == "Completed" and row["prefix_chars"] == len(prefix)
    answer = deployment.cli("follow", "orphan-1", namespace=namespace)
    assert answer.stdout == full_answer_text(prompt) + "\n"
    assert "no orphaned requests" in deployment.cli("reap", namespace=namespace).stdout


def test_submit_without_workers_explains_what_to_do(deployment: Deployment) -> None:
    done = deployment.cli("submit", "hello", "--wait", "0.5", namespace=f"empty{uuid.uuid4().hex[:6]}")
    assert done.returncode == 1
    assert "is a worker running on namespace" in done.stderr and "Traceback" not in done.stderr


def test_serve_fake_llm_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve-fake-llm", "--port", str(port), "--token-delay", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert f"127.0.0.1:{port}" in proc.stdout.readline()
        import httpx

        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m", "prompt": "hi"})
        assert reply.json()["choices"][0]["text"] == full_answer_text("hi")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
