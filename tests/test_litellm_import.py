"""``flo-coord import-litellm``: a LiteLLM config.yaml becomes TOML that loads and routes the same way.

The command runs as a real process; the TOML it prints is loaded with load_settings and
drives a Coordinator on a real redis-server against the fake LLM server (OpenAI and
Anthropic dialects), so weights, fallbacks and context-window fallbacks are checked by
where requests really went.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from flo_coord.cli.litellm_import import translate
from flo_coord.execution.coordinator import Coordinator, ExecutorConfig
from flo_coord.models import ChatMessage
from flo_coord.settings import load_settings
from flo_coord.testing.fakellm import FakeLLMServer, full_answer_text, render_messages

PROMPT = [ChatMessage("user", "Where does this LiteLLM model group send me?")]
ANSWER = full_answer_text(render_messages(PROMPT))


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def sample(fake_url: str, down_url: str) -> str:
    return f"""
model_list:
  - model_name: llama
    litellm_params:
      model: hosted_vllm/llama-a-m
      api_base: {down_url}
      weight: 3
  - model_name: llama
    litellm_params:
      model: hosted_vllm/llama-b-m
      api_base: {fake_url}/v1
      rpm: 600
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o-m
      api_base: {fake_url}/v1
      api_key: os.environ/FLO_TEST_OPENAI_KEY
  - model_name: claude
    litellm_params:
      model: anthropic/claude-m
      api_base: {fake_url}
      api_key: sk-literal-secret-value
  - model_name: titan
    litellm_params:
      model: bedrock/amazon.titan-text-express-v1
router_settings:
  routing_strategy: least-busy
  num_retries: 4
  timeout: 20
  allowed_fails: 2
  cooldown_time: 20
  redis_host: localhost
  fallbacks: [{{"llama": ["gpt-4o"]}}]
  context_window_fallbacks: [{{"llama": ["claude"]}}]
general_settings:
  master_key: sk-1234
"""


def run_import(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return subprocess.run(
        [sys.executable, "-m", "flo_coord", "import-litellm", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture
async def fake() -> Any:
    async with FakeLLMServer() as server:
        yield server


async def test_import_litellm_prints_toml_that_loads_and_routes_the_same_way(
    tmp_path: Path, redis_server: Any, fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(sample(fake.base_url, dead_url()))
    done = run_import(config)
    assert done.returncode == 0, done.stderr
    for key in ("litellm_params.rpm", "redis_host", "general_settings", "model_list[4] (titan)", "api_key"):
        assert key in done.stderr  # each untranslated key is listed
    assert "sk-literal-secret-value" not in done.stdout + done.stderr  # a literal key is never copied
    toml = tmp_path / "flo.toml"
    toml.write_text(done.stdout)
    overrides = {("redis", "url"): redis_server.url, ("redis", "namespace"): f"l{uuid.uuid4().hex[:8]}"}
    settings = load_settings(toml, overrides=overrides, environ={})
    assert (settings.failover.max_retries, settings.breaker.threshold, settings.breaker.cooldown) == (4, 2, 20.0)
    groups = {g.name: g for g in settings.models}
    assert set(groups) == {"llama", "gpt-4o", "claude"}
    assert [e.weight for e in groups["llama"].entries] == [3.0, 1.0]
    assert (groups["llama"].fallbacks, groups["llama"].context_window_fallbacks) == (["gpt-4o"], ["claude"])

    monkeypatch.setenv("FLO_TEST_OPENAI_KEY", "sk-openai-test")
    fast = ExecutorConfig(first_token_timeout=2.0, stall_timeout=2.0, backoff_initial=0.1, backoff_max=0.2)
    options = {**settings.coordinator_options(), "executor": fast}
    async with Coordinator(**options) as co:
        # llama-1 is down: its sibling serves (like LiteLLM's cooldown of one deployment)
        stream = co.stream("r-down", PROMPT, model="llama")
        assert "".join([c async for c in stream]) == ANSWER and stream.outcome.backend == "llama-2"  # type: ignore[union-attr]
        # every llama deployment fails with 5xx: the group's fallbacks, never the context-window one
        fake.set_fault("llama-b-m", "http5xx")
        stream = co.stream("r-5xx", PROMPT, model="llama")
        assert "".join([c async for c in stream]) == ANSWER and stream.outcome.backend == "gpt-4o-1"  # type: ignore[union-attr]
        # the prompt is too long for llama: the context-window fallback (Anthropic), never gpt-4o
        fake.set_fault("llama-b-m", "context_length")
        fake.clear_requests()
        stream = co.stream("r-ctx", PROMPT, model="llama")
        assert "".join([c async for c in stream]) == ANSWER and stream.outcome.backend == "claude-1"  # type: ignore[union-attr]
        assert [r["model"] for r in fake.requests if r["model"] == "gpt-4o-m"] == []


def test_translate_refuses_what_is_not_a_litellm_config() -> None:
    from flo_coord.errors import ConfigError

    with pytest.raises(ConfigError, match="model_list"):
        translate({"models": []})
    result = translate({"model_list": [{"model_name": "x", "litellm_params": {"model": "replicate/foo"}}]})
    assert result.models == {} and "not supported" in result.skipped[0]


def test_import_litellm_says_what_is_wrong_with_a_bad_file(tmp_path: Path) -> None:
    missing = run_import(tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("just: [a, list")
    done = run_import(bad)
    assert done.returncode == 2 and "not readable YAML" in done.stderr and "Traceback" not in done.stderr
