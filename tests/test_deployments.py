"""Deployments and model groups (issue 14), end to end: a real redis-server, real HTTP to the
fake LLM server (OpenAI and Anthropic dialects), several Coordinators as a fleet.

Every served answer is compared with the fake server's full answer; which deployment served
(or was never asked) is read from the fake server's request log and the shared history.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from flo_coord import ChatMessage, FailoverAttempt, FailoverConfig
from flo_coord.errors import ConfigError, PrivacyTierError, UnknownModelError
from flo_coord.execution.backends import (
    BackendSpec,
    ContentPolicyRejection,
    GenerationRequest,
    ServerError,
    StreamEnd,
    TextChunk,
    make_backend,
)
from flo_coord.execution.breaker import BreakerConfig
from flo_coord.execution.coordinator import Coordinator, ExecutorConfig
from flo_coord.execution.groups import ModelGroup, Router
from flo_coord.models import PrivacyTier, ServingBackend
from flo_coord.settings import load_settings
from flo_coord.testing.fakellm import FakeLLMServer, full_answer, full_answer_text, render_messages

PROMPT = "Which replica should take this request?"
ANSWER = full_answer_text(PROMPT)
MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "what is a model group?")]
CHAT_ANSWER = full_answer_text(render_messages(MESSAGES))
FAST = ExecutorConfig(first_token_timeout=2.0, stall_timeout=2.0, backoff_initial=0.1, backoff_max=0.2)
KEY = "sk-ant-test-0123456789"


def dead_url() -> str:
    """An http URL nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


Make = Callable[..., Coordinator]


@pytest_asyncio.fixture
async def make(redis_server: Any) -> AsyncIterator[Make]:
    """Coordinators (one per call: a fleet of workers) on one fresh namespace."""
    namespace = f"d{uuid.uuid4().hex[:10]}"
    built: list[Coordinator] = []

    def build(specs: list[BackendSpec], models: list[ModelGroup], **options: Any) -> Coordinator:
        options.setdefault("executor", FAST)
        options.setdefault("config", FailoverConfig(max_retries=4, failover_timeout=10.0))
        coordinator = Coordinator(specs, models=models, url=redis_server.url, namespace=namespace, **options)
        built.append(coordinator)
        return coordinator

    yield build
    for coordinator in built:
        await coordinator.aclose()


def rid() -> str:
    return f"req-{uuid.uuid4().hex[:8]}"


def served(fake: FakeLLMServer, model: str) -> int:
    return sum(1 for r in fake.requests if r["model"] == model)


async def collect(stream: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in stream])


def vllm(name: str, url: str, model: str) -> BackendSpec:
    return BackendSpec(name=name, provider="vllm", base_url=url, model=model)


# --------------------------------------------------------------------------- deployments


def test_two_deployments_of_one_provider_and_old_names_still_work() -> None:
    a, b = vllm("vllm-a", "http://a:8000", "m"), vllm("vllm-b", "http://b:8000", "m")
    assert a.backend is b.backend is ServingBackend.Vllm and a.backend.is_local()
    assert a.continues_chat == "continue_final_message"  # the provider's default, not the name's
    old = BackendSpec(name="Groq", base_url="http://g", model="m")
    assert old.backend is ServingBackend.Groq and old.name == "Groq"
    hosted = BackendSpec(name="claude", provider="ANTHROPIC", model="claude-x")
    assert (hosted.kind, hosted.base_url) == ("anthropic", "https://api.anthropic.com")
    with pytest.raises(ConfigError, match="no provider"):
        BackendSpec(name="my-box", base_url="http://h", model="m")
    with pytest.raises(ConfigError, match="not a valid deployment name"):
        BackendSpec(name="a,b", provider="Vllm", base_url="http://h", model="m")


def test_duplicate_deployment_names_name_both_entries(tmp_path: Any) -> None:
    path = tmp_path / "flo.toml"
    path.write_text(
        '[[backends]]\nname = "Vllm"\nbase_url = "http://first:8000"\nmodel = "m1"\n\n'
        '[[backends]]\nname = "Vllm"\nbase_url = "http://second:8000"\nmodel = "m2"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert "entry 1" in str(caught.value) and "entry 2" in str(caught.value)
    assert "http://first:8000" in str(caught.value) and "http://second:8000" in str(caught.value)


def test_cli_backend_flags_keep_both_deployments_and_refuse_a_repeated_name() -> None:
    import argparse

    from flo_coord.cli.common import UsageError, load

    args = argparse.Namespace(backend=["vllm-a=http://a:1,m,,Vllm", "vllm-b=http://b:1,m,openai,vllm"], config=None)
    settings = load(args)
    assert [s.name for s in settings.backends] == ["vllm-a", "vllm-b"]
    assert settings.failover.fallback_order[0] is ServingBackend.Vllm
    with pytest.raises(UsageError, match="used twice"):
        load(argparse.Namespace(backend=["Vllm=http://a:1,m", "Vllm=http://b:1,m"], config=None))


# ------------------------------------------------------------------------ load balancing


async def test_requests_spread_by_weight(make: Make, fake: FakeLLMServer) -> None:
    specs = [vllm("vllm-a", fake.base_url, "heavy-m"), vllm("vllm-b", fake.base_url, "light-m")]
    group = ModelGroup(name="llama", deployments=[{"name": "vllm-a", "weight": 3}, "vllm-b"])  # type: ignore[list-item]
    co = make(specs, [group])
    for _ in range(40):
        assert await collect(co.stream(rid(), PROMPT, model="llama")) == ANSWER
    heavy, light = served(fake, "heavy-m"), served(fake, "light-m")
    assert heavy + light == 40 and heavy > light >= 1, (heavy, light)


async def test_requests_spread_by_in_flight_count_across_the_fleet(make: Make) -> None:
    async with FakeLLMServer(n_tokens=30, token_delay=0.05) as slow:
        specs = [vllm("vllm-a", slow.base_url, "a-m"), vllm("vllm-b", slow.base_url, "b-m")]
        group = ModelGroup(name="llama", deployments=["vllm-a", "vllm-b"])
        workers = [make(specs, [group]), make(specs, [group])]
        streams, tasks = [], []
        for i in range(6):  # alternate workers; each request is in flight before the next is picked
            stream = workers[i % 2].stream(rid(), PROMPT, model="llama")
            first = await anext(stream)
            streams.append(stream)
            tasks.append(asyncio.create_task(collect(stream)))
            assert first == full_answer(PROMPT)[0]
        counts = await workers[0].inflight.counts(["vllm-a", "vllm-b"])
        assert counts == {"vllm-a": 3, "vllm-b": 3}  # the least busy one each time, whichever worker picked
        await asyncio.gather(*tasks)
        assert (served(slow, "a-m"), served(slow, "b-m")) == (3, 3)
        counts = await workers[1].inflight.counts(["vllm-a", "vllm-b"])
        assert counts == {"vllm-a": 0, "vllm-b": 0}  # every call released when it ended


async def test_in_flight_counts_of_a_dead_worker_expire(make: Make, fake: FakeLLMServer) -> None:
    from flo_coord.store.inflight import InFlightStore

    co = make([vllm("vllm-a", fake.base_url, "a-m")], [])
    m = co.manager
    ghost = InFlightStore(m.core, m.shell, m.breakers, ttl=1.0)  # a worker that counted a call, then died
    assert (await ghost.pick([("vllm-a", 1.0)], "ghost/r1"))[0] == "vllm-a"
    assert await co.inflight.counts(["vllm-a"]) == {"vllm-a": 1}
    await asyncio.sleep(1.2)
    assert await co.inflight.counts(["vllm-a"]) == {"vllm-a": 0}


async def test_independent_operations_share_round_trips_and_keep_their_results(make: Make) -> None:
    from flo_coord.store.core import together

    co = make([vllm("vllm-a", "http://a", "a-m"), vllm("vllm-b", "http://b", "b-m")], [])
    shell, member = co.manager.shell, "w/r1"
    sent: list[int] = []
    execute = shell.execute

    async def counting(batch: Any, *args: Any) -> Any:
        sent.append(len(batch))
        return await execute(batch, *args)

    shell.execute = counting  # type: ignore[method-assign]
    ops = [
        co.manager.breakers.allow_op("vllm-a", member, co.breaker.config.probe_ttl),
        co.inflight.pick_op([("vllm-b", 1.0)], member),
        co.inflight.counts_op(["vllm-b"]),
    ]
    decision, (picked, before), counts = await shell.run(together(ops), "t")
    # counts takes two steps (TIME, then its read, which sees the pick): two round trips, not four
    assert (decision, picked, before) == ("CLOSED", "vllm-b", [0]) and counts == {"vllm-b": 1} and sent == [3, 1]
    assert await shell.run(together([]), "t") == []


async def test_one_deployment_down_the_other_serves_all_and_its_breaker_opens_for_every_worker(
    make: Make, fake: FakeLLMServer
) -> None:
    specs = [vllm("vllm-down", dead_url(), "down-m"), vllm("vllm-up", fake.base_url, "up-m")]
    group = ModelGroup(name="llama", deployments=["vllm-down", "vllm-up"])
    breaker = BreakerConfig(threshold=2, window=30.0, cooldown=30.0)
    workers = [make(specs, [group], breaker=breaker), make(specs, [group], breaker=breaker)]
    for i in range(12):
        assert await collect(workers[i % 2].stream(rid(), PROMPT, model="llama")) == ANSWER
    assert served(fake, "up-m") == 12
    history = await workers[0].manager.history()
    down = [e for e in history if isinstance(e, FailoverAttempt) and e.backend == "vllm-down"]
    assert 1 <= len(down) <= 2  # threshold failures (from either worker), then never again
    for worker in workers:  # open for everyone, whoever saw the failures
        state = await worker.breaker.allow("vllm-down", f"probe-{worker.worker_id}")
        assert state == "OPEN"
    if len(down) < 2:  # every request that picked it failed over; the rest never tried it
        assert all(e.result is not None and e.result.is_failure() for e in down)


# ------------------------------------------------------------------------------ fallbacks


def fallback_groups(url: str) -> tuple[list[BackendSpec], list[ModelGroup]]:
    specs = [vllm("d-small", url, "small-m"), vllm("d-general", url, "general-m"), vllm("d-long", url, "long-m")]
    groups = [
        ModelGroup(name="small", deployments=["d-small"], fallbacks=["general"], context_window_fallbacks=["long"]),
        ModelGroup(name="general", deployments=["d-general"]),
        ModelGroup(name="long", deployments=["d-long"]),
    ]
    return specs, groups


async def test_context_window_fallback_only_for_a_context_too_long_failure(make: Make, fake: FakeLLMServer) -> None:
    co = make(*fallback_groups(fake.base_url))
    fake.set_fault("small-m", "context_length")
    stream = co.stream(rid(), PROMPT, model="small")
    assert await collect(stream) == ANSWER
    assert stream.outcome is not None and stream.outcome.backend == "d-long"
    assert (served(fake, "small-m"), served(fake, "long-m"), served(fake, "general-m")) == (1, 1, 0)


async def test_model_group_fallback_only_for_other_failures(make: Make, fake: FakeLLMServer) -> None:
    co = make(*fallback_groups(fake.base_url))
    fake.set_fault("small-m", "http5xx")  # every request: 503
    stream = co.stream(rid(), PROMPT, model="small")
    assert await collect(stream) == ANSWER
    assert stream.outcome is not None and stream.outcome.backend == "d-general"
    assert served(fake, "general-m") == 1 and served(fake, "long-m") == 0


async def test_the_model_group_is_stored_with_the_request(make: Make, fake: FakeLLMServer) -> None:
    co = make(*fallback_groups(fake.base_url))
    fake.set_token_delay(0.05)
    request_id = rid()
    stream = co.stream(request_id, PROMPT, model="small")
    await anext(stream)
    ctx = await co.manager.get_context(request_id)
    assert ctx is not None and ctx.model_group == "small"  # a replica taking it over routes the same way
    await stream.aclose()
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        co.stream(rid(), PROMPT, model="nope")


async def test_a_replica_that_takes_a_request_over_routes_it_through_the_same_group(
    make: Make, fake: FakeLLMServer
) -> None:
    fake.set_token_delay(0.02)
    specs = [vllm("d-one", fake.base_url, "one-m")]
    group = ModelGroup(name="solo", deployments=["d-one"])
    # fallback_order (the default: Realizar, Ollama, Together, Groq) reaches no deployment: only the group does
    dying = make(specs, [group], lease_ttl=0.5, worker_id="dying")
    taker = make(specs, [group], lease_ttl=0.5, worker_id="taker")
    request_id = rid()
    stream = dying.stream(request_id, PROMPT, model="solo")
    first = [await anext(stream) for _ in range(5)]
    await asyncio.sleep(0.7)  # the worker freezes: no heartbeats
    (ctx,) = await taker.manager.claim_orphans()
    assert ctx.model_group == "solo"
    await taker.resume(ctx)
    assert await collect(taker.follow(request_id)) == ANSWER
    outcome = await taker.outcome(request_id)
    assert outcome is not None and (outcome.owner, outcome.backend) == ("taker", "d-one")
    assert "".join(first) + await collect(stream) == ANSWER  # the frozen stream delivers the taker's text


# ------------------------------------------------------------------ default (implicit) groups


def test_without_models_each_deployment_model_is_a_group_then_the_fallback_order() -> None:
    specs = [
        vllm("vllm-a", "http://a", "llama"),
        BackendSpec(name="groq-1", provider="Groq", model="llama-groq"),
        vllm("vllm-b", "http://b", "llama"),
        BackendSpec(name="Together", base_url="http://t", model="mixtral"),
    ]
    router = Router.configured([], specs, [ServingBackend.Together, ServingBackend.Vllm, ServingBackend.Groq])
    assert router.implicit and list(router.groups) == ["llama", "llama-groq", "mixtral"]
    # its own deployments balanced in tier 1, then fallback_order (a provider: all its deployments)
    assert router.route("llama") == ([[("vllm-a", 1.0), ("vllm-b", 1.0)], [("Together", 1.0)], [("groq-1", 1.0)]], [])
    assert router.route("llama-groq")[0] == [[("groq-1", 1.0)], [("Together", 1.0)], [("vllm-a", 1.0), ("vllm-b", 1.0)]]
    configured = Router.configured([ModelGroup(name="only", deployments=["vllm-a"])], specs, [ServingBackend.Vllm])
    assert not configured.implicit and "llama" not in configured and list(configured.groups) == ["only"]


async def test_a_default_group_fails_over_through_the_fallback_order_for_streams_and_submissions(
    make: Make, fake: FakeLLMServer
) -> None:
    from flo_coord.execution.worker import Worker
    from flo_coord.store import queue

    specs = [
        vllm("d-down", dead_url(), "down-m"),
        BackendSpec(name="t-up", provider="Together", base_url=fake.base_url, model="up-m"),
    ]
    co = make(specs, [], config=FailoverConfig(max_retries=4, failover_timeout=10.0, fallback_order=["Together"]))
    request_id = rid()
    stream = co.stream(request_id, PROMPT, model="down-m")
    first = await anext(stream)
    ctx = await co.manager.get_context(request_id)
    assert ctx is not None and ctx.model_group == "down-m"  # stored by the write that started it
    assert first + await collect(stream) == ANSWER
    assert stream.outcome is not None and stream.outcome.backend == "t-up" and served(fake, "up-m") == 1
    with pytest.raises(UnknownModelError):
        co.stream(rid(), PROMPT, model="t-up")  # a deployment name is not a model
    worker = Worker(co, concurrency=2, block=0.1)  # ``submit --model up-m``: the same default groups
    running = asyncio.create_task(worker.run())
    try:
        submitted = rid()
        await co.manager.shell.run(
            queue.submit(co.manager.core, queue.Submission(request_id=submitted, prompt=PROMPT, model="up-m")), "t"
        )
        assert await collect(co.follow(submitted, wait=5.0)) == ANSWER
        outcome = await co.outcome(submitted)
        assert outcome is not None and outcome.backend == "t-up"
    finally:
        worker.request_stop()
        await running


# -------------------------------------------------------------------------------- privacy


async def test_a_sovereign_group_never_sends_a_prompt_to_a_remote_provider(make: Make, fake: FakeLLMServer) -> None:
    specs = [
        vllm("local-a", dead_url(), "local-a-m"),
        BackendSpec(name="local-b", provider="LlamaCpp", base_url=dead_url(), model="local-b-m"),
        BackendSpec(name="groq-1", provider="Groq", base_url=fake.base_url, model="groq-m"),
    ]
    groups = [
        ModelGroup(name="private", deployments=["local-a", "local-b"], fallbacks=["cloud"], privacy="sovereign"),
        ModelGroup(name="cloud", deployments=["groq-1"]),
    ]
    co = make(specs, groups)
    with pytest.raises(PrivacyTierError) as caught:
        await collect(co.stream(rid(), PROMPT, model="private"))
    assert "Sovereign" in str(caught.value) and "groq-1" in str(caught.value)
    assert caught.value.excluded == ["groq-1"]
    assert fake.requests == []  # every local deployment is down, and still no prompt left the premises
    # the cloud group itself may use Groq
    assert await collect(co.stream(rid(), PROMPT, model="cloud")) == ANSWER


def test_privacy_is_checked_at_config_load(tmp_path: Any) -> None:
    path = tmp_path / "flo.toml"
    path.write_text(
        '[[backends]]\nname = "azure-1"\nprovider = "AzureOpenAI"\nbase_url = "https://a.example"\nmodel = "m"\n\n'
        '[[backends]]\nname = "groq-1"\nprovider = "groq"\nmodel = "m"\n\n'
        '[[models]]\nname = "private"\ndeployments = ["azure-1", "groq-1"]\nprivacy = "Private"\n'
    )
    with pytest.raises(ConfigError, match="privacy Private does not allow deployment groq-1"):
        load_settings(path, environ={})
    assert PrivacyTier.Private.allows(ServingBackend.AzureOpenAI)


# ------------------------------------------------------------------------------ Anthropic


def claude(name: str, url: str, model: str) -> BackendSpec:
    return BackendSpec(name=name, provider="Anthropic", base_url=url, model=model, api_key_env="FLO_TEST_ANTHROPIC")


@pytest.fixture
def anthropic_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FLO_TEST_ANTHROPIC", KEY)
    return KEY


async def test_anthropic_full_answer(fake: FakeLLMServer, anthropic_key: str) -> None:
    backend = make_backend(claude("claude-1", fake.base_url, "claude-m"))
    try:
        events = [e async for e in backend.stream(GenerationRequest(messages=MESSAGES, max_tokens=100))]
    finally:
        await backend.aclose()
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == CHAT_ANSWER
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.finish_reason == "stop" and end.model == "claude-m"
    assert end.usage is not None and end.usage["completion_tokens"] == len(full_answer(render_messages(MESSAGES)))
    (request,) = fake.requests
    assert request["path"] == "/v1/messages" and request["body"]["system"] == "be brief"
    assert request["body"]["max_tokens"] == 100 and request["messages"][-1]["role"] == "user"
    assert request["authorization_sha256"] == hashlib.sha256(anthropic_key.encode()).hexdigest()


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        ("finish:max_tokens:5", "length"),
        ("finish:refusal:5", ContentPolicyRejection),
        ("inband:anthropic:3:overloaded", ServerError),
    ],
)
async def test_anthropic_endings(fake: FakeLLMServer, anthropic_key: str, fault: str, outcome: Any) -> None:
    fake.set_fault("claude-m", fault)
    backend = make_backend(claude("claude-1", fake.base_url, "claude-m"))
    try:
        if isinstance(outcome, str):
            events = [e async for e in backend.stream(GenerationRequest(messages=MESSAGES))]
            assert isinstance(events[-1], StreamEnd) and events[-1].finish_reason == outcome
        else:
            with pytest.raises(outcome) as caught:
                async for _ in backend.stream(GenerationRequest(messages=MESSAGES)):
                    pass
            if outcome is ServerError:
                assert caught.value.status == 529 and caught.value.code == "overloaded_error"
    finally:
        await backend.aclose()


@pytest.mark.parametrize("fault", ["no_done", "finish_reset", "pings", "bom", "empty_frames", "reasoning:2"])
async def test_anthropic_streams_that_end_complete(fake: FakeLLMServer, anthropic_key: str, fault: str) -> None:
    fake.set_fault("claude-m", fault)
    backend = make_backend(claude("claude-1", fake.base_url, "claude-m"))
    try:
        events = [e async for e in backend.stream(GenerationRequest(messages=MESSAGES))]
    finally:
        await backend.aclose()
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == CHAT_ANSWER
    assert isinstance(events[-1], StreamEnd) and events[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("cut:5", "StreamCutError"),
        ("malformed:3", "MalformedChunkError"),
        ("tool_calls", "ToolCallsOnlyError"),
        ("echo_key", "ServerError"),
        ("context_length", "ContextLengthError"),
        ("http5xx:1:529", "ServerError"),
        ("rate429:2", "RateLimitedError"),
    ],
)
async def test_anthropic_failures_are_typed(fake: FakeLLMServer, anthropic_key: str, fault: str, error: str) -> None:
    fake.set_fault("claude-m", fault)
    backend = make_backend(claude("claude-1", fake.base_url, "claude-m"))
    try:
        with pytest.raises(Exception) as caught:
            async for _ in backend.stream(GenerationRequest(messages=MESSAGES)):
                pass
    finally:
        await backend.aclose()
    assert type(caught.value).__name__ == error
    assert anthropic_key not in str(caught.value)  # an echoed key is redacted


async def test_anthropic_prefill_ending_in_whitespace_is_trimmed_and_continued(
    fake: FakeLLMServer, anthropic_key: str
) -> None:
    tokens = full_answer(render_messages(MESSAGES))
    prefix = "".join(tokens[:6]) + " "  # ends inside the 7th token, right after its space
    backend = make_backend(claude("claude-1", fake.base_url, "claude-m"))
    try:
        request = GenerationRequest(messages=MESSAGES, prefix=prefix)
        rest = "".join([e.text async for e in backend.stream(request) if isinstance(e, TextChunk)])
    finally:
        await backend.aclose()
    assert prefix + rest == CHAT_ANSWER
    assert fake.requests[-1]["messages"][-1] == {"role": "assistant", "content": prefix.rstrip()}


async def claude_pair(make: Make, fake: FakeLLMServer) -> Coordinator:
    specs = [claude("claude-1", fake.base_url, "claude-1-m"), claude("claude-2", fake.base_url, "claude-2-m")]
    group = ModelGroup(name="claude", deployments=["claude-1", {"name": "claude-2", "tier": 2}])  # type: ignore[list-item]
    return make(specs, [group])


async def test_anthropic_cut_stream_is_continued_from_the_prefix(
    make: Make, fake: FakeLLMServer, anthropic_key: str
) -> None:
    co = await claude_pair(make, fake)
    fake.set_fault("claude-1-m", "cut:7")
    stream = co.stream(rid(), MESSAGES, model="claude")
    assert await collect(stream) == CHAT_ANSWER
    assert stream.outcome is not None and stream.outcome.backend == "claude-2"
    continued = next(r for r in fake.requests if r["model"] == "claude-2-m")
    prefix = "".join(full_answer(render_messages(MESSAGES))[:7])
    assert continued["messages"][-1] == {"role": "assistant", "content": prefix.rstrip()}


async def test_anthropic_in_band_overloaded_error_fails_over(
    make: Make, fake: FakeLLMServer, anthropic_key: str
) -> None:
    co = await claude_pair(make, fake)
    fake.set_fault("claude-1-m", "inband:anthropic:4:overloaded")
    request_id = rid()
    assert await collect(co.stream(request_id, MESSAGES, model="claude")) == CHAT_ANSWER
    history = await co.manager.history()
    failed = [e for e in history if isinstance(e, FailoverAttempt) and e.request_id == request_id]
    assert failed[0].backend == "claude-1" and "overloaded_error" in str(failed[0].result)


async def test_anthropic_refuses_a_text_completion_locally(fake: FakeLLMServer, anthropic_key: str) -> None:
    from flo_coord.execution.backends import UnsupportedRequestError

    backend = make_backend(claude("claude-1", fake.base_url, "claude-m"))
    try:
        with pytest.raises(UnsupportedRequestError, match="chat requests only"):
            async for _ in backend.stream(GenerationRequest(prompt=PROMPT)):
                pass
    finally:
        await backend.aclose()
    assert fake.requests == []  # refused before any HTTP: the Coordinator moves on without a call


async def test_a_worker_with_the_least_privilege_acl_runs_model_groups(
    redis_server: Any, fake: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The in-flight scripts use only commands of the documented worker ACL (docs/OPERATING.md)."""
    import redis as redis_py
    from test_acl import WORKER_RULES, setuser

    namespace, password = f"a{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = redis_py.Redis(host=redis_server.host, port=redis_server.port)
    setuser(admin, f"worker-{namespace}", password, namespace, WORKER_RULES)
    url = f"redis://worker-{namespace}:{password}@{redis_server.host}:{redis_server.port}/0"
    specs = [vllm("vllm-a", dead_url(), "a-m"), vllm("vllm-b", fake.base_url, "b-m")]
    group = ModelGroup(name="llama", deployments=["vllm-a", "vllm-b"])
    async with Coordinator(specs, models=[group], url=url, namespace=namespace, executor=FAST) as co:
        for _ in range(3):
            assert await collect(co.stream(rid(), PROMPT, model="llama")) == ANSWER
        counts = await co.inflight.counts(["vllm-a", "vllm-b"])
    assert counts == {"vllm-a": 0, "vllm-b": 0} and "in-flight" not in caplog.text  # picked and released
    admin.execute_command("ACL", "DELUSER", f"worker-{namespace}")
    admin.close()


async def test_a_submitted_request_runs_through_its_model_group(redis_server: Any, fake: FakeLLMServer) -> None:
    from flo_coord.execution.worker import Worker
    from flo_coord.store import queue

    specs = [vllm("d-one", fake.base_url, "one-m")]
    co = Coordinator(
        specs, models=[ModelGroup(name="solo", deployments=["d-one"])], url=redis_server.url, namespace=rid()
    )
    worker = Worker(co, concurrency=4, block=0.1)
    running = asyncio.create_task(worker.run())
    try:
        shell, core = co.manager.shell, co.manager.core
        good, bad = rid(), rid()
        await shell.run(queue.submit(core, queue.Submission(request_id=good, prompt=PROMPT, model="solo")), "t")
        await shell.run(queue.submit(core, queue.Submission(request_id=bad, prompt=PROMPT, model="nope")), "t")
        assert await collect(co.follow(good, wait=5.0)) == ANSWER
        outcome = await co.outcome(good)
        assert outcome is not None and outcome.backend == "d-one"
        for _ in range(100):
            failed = await co.outcome(bad)
            if failed is not None:
                break
            await asyncio.sleep(0.05)
        assert failed is not None and failed.error_kind == "UnknownModelError" and "nope" in (failed.error or "")
    finally:
        worker.request_stop()
        await running
