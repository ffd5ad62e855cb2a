"""Every test of batuta's serve::failover module, ported; the whole file runs twice,
on fakeredis and on a real redis-server (the ``store`` fixture is parametrised)."""

from __future__ import annotations

import time

import msgspec
import pytest

from flo_coord import (
    FailoverAttempt,
    FailoverConfig,
    FailoverRequest,
    FailoverResult,
    FailoverStats,
    ServingBackend,
    StreamingContext,
    StreamState,
)
from flo_coord.store.codec import decode_context_json, json_encoder

pytestmark = pytest.mark.usefixtures("store")


def attempt(backend: ServingBackend, result: FailoverResult | None) -> FailoverAttempt:
    return FailoverAttempt(backend=backend, started_at=time.time(), result=result)


# SERVE-FLO-001: Streaming Context


def test_SERVE_FLO_001_context_new():
    ctx = StreamingContext.new("Hello, how are you?", "req-123")
    assert ctx.prompt == "Hello, how are you?"
    assert ctx.request_id == "req-123"
    assert ctx.generated_prefix == ""
    assert ctx.token_count == 0


def test_SERVE_FLO_001_context_append():
    ctx = StreamingContext.new("Test", "req-1")
    ctx.append("Hello ")
    ctx.append("world!")
    assert ctx.generated_prefix == "Hello world!"
    assert ctx.token_count == 2


def test_SERVE_FLO_001_continuation_prompt():
    ctx = StreamingContext.new("Prompt: ", "req-1")
    ctx.append("Response so far")
    assert ctx.continuation_prompt() == "Prompt: Response so far"


def test_SERVE_FLO_001_continuation_prompt_empty():
    ctx = StreamingContext.new("Just prompt", "req-1")
    assert ctx.continuation_prompt() == "Just prompt"


def test_SERVE_FLO_001_worth_recovering():
    ctx = StreamingContext.new("Test", "req-1")
    assert not ctx.worth_recovering()
    ctx.append("one two three four five six")
    assert ctx.worth_recovering()


# SERVE-FLO-002: Failover Config


def test_SERVE_FLO_002_default_config():
    config = FailoverConfig()
    assert config.max_retries == 2
    assert config.include_prefix
    assert config.fallback_order
    assert config.failover_timeout == 30.0
    assert config.min_tokens_for_recovery == 5


def test_SERVE_FLO_002_fallback_order():
    config = FailoverConfig()
    assert ServingBackend.Realizar in config.fallback_order
    assert ServingBackend.Together in config.fallback_order
    assert config.fallback_order == [
        ServingBackend.Realizar,
        ServingBackend.Ollama,
        ServingBackend.Together,
        ServingBackend.Groq,
    ]


# SERVE-FLO-003: Failover Manager


def test_SERVE_FLO_003_start_tracking(store):
    manager = store.manager()
    manager.start_tracking("req-1", "Test prompt")
    assert manager.get_context("req-1") is not None


def test_SERVE_FLO_003_append_tokens(store):
    manager = store.manager()
    manager.start_tracking("req-1", "Prompt")
    manager.append_tokens("req-1", "Generated")
    ctx = manager.get_context("req-1")
    assert ctx is not None
    assert ctx.generated_prefix == "Generated"


def test_SERVE_FLO_003_complete_removes(store):
    manager = store.manager()
    manager.start_tracking("req-1", "Prompt")
    manager.complete("req-1")
    assert manager.get_context("req-1") is None


def test_SERVE_FLO_003_should_failover(store):
    manager = store.manager()
    manager.start_tracking("req-1", "Prompt")
    assert not manager.should_failover("req-1")
    manager.append_tokens("req-1", "one two three four five six")
    assert manager.should_failover("req-1")


# SERVE-FLO-004: Next Backend


def test_SERVE_FLO_004_next_backend_skips_failed(store):
    manager = store.manager()
    nxt = manager.next_backend(ServingBackend.Realizar)
    assert nxt is not None
    assert nxt != ServingBackend.Realizar


def test_SERVE_FLO_004_next_backend_order(store):
    config = FailoverConfig(fallback_order=[ServingBackend.Ollama, ServingBackend.Together])
    manager = store.manager(config)
    assert manager.next_backend(ServingBackend.Realizar) == ServingBackend.Ollama


# SERVE-FLO-005: Prepare Failover


def test_SERVE_FLO_005_prepare_failover(store):
    manager = store.manager()
    manager.start_tracking("req-1", "Original prompt")
    manager.append_tokens("req-1", " partial response")
    request = manager.prepare_failover("req-1")
    assert request is not None
    assert request.request_id == "req-1"
    assert "Original prompt" in request.prompt
    assert "partial response" in request.prompt
    assert request.prompt == "Original prompt partial response"


def test_SERVE_FLO_005_prepare_failover_not_found(store):
    manager = store.manager()
    assert manager.prepare_failover("nonexistent") is None


# SERVE-FLO-006: Statistics


def test_SERVE_FLO_006_empty_stats(store):
    manager = store.manager()
    stats = manager.stats()
    assert stats.total_attempts == 0
    assert stats.success_rate() == 0.0


def test_SERVE_FLO_006_record_attempt(store):
    manager = store.manager()
    manager.record_attempt(attempt(ServingBackend.Together, FailoverResult.Success))
    stats = manager.stats()
    assert stats.total_attempts == 1
    assert stats.successful == 1
    assert stats.success_rate() == 100.0


def test_SERVE_FLO_006_mixed_results(store):
    manager = store.manager()
    manager.record_attempt(attempt(ServingBackend.Together, FailoverResult.Success))
    manager.record_attempt(attempt(ServingBackend.Groq, FailoverResult.Timeout))
    stats = manager.stats()
    assert stats.total_attempts == 2
    assert stats.successful == 1
    assert stats.timeouts == 1
    assert stats.success_rate() == 50.0


# SERVE-FLO-007: Stream State


def test_SERVE_FLO_007_stream_states():
    assert StreamState.Pending == StreamState.Pending
    assert StreamState.Streaming != StreamState.Completed
    failed = StreamState.Failed("Connection reset")
    assert failed.name == "Failed"
    assert "reset" in failed.message


# Additional coverage tests of the original


def test_stream_state_clone():
    state = StreamState.Failed("error")
    cloned = StreamState.Failed("error")
    assert state == cloned
    assert state != StreamState.Failed("other")
    assert hash(state) == hash(cloned)


def test_stream_state_debug():
    assert "Recovered" in repr(StreamState.Recovered)


def test_stream_state_all_variants():
    states = [
        StreamState.Pending,
        StreamState.Streaming,
        StreamState.Completed,
        StreamState.Failed("err"),
        StreamState.Recovered,
    ]
    assert len(set(states)) == 5


def test_streaming_context_clone():
    ctx = StreamingContext.new("prompt", "req-1")
    ctx.append("tokens")
    cloned = msgspec.structs.replace(ctx)
    assert ctx.prompt == cloned.prompt
    assert ctx.generated_prefix == cloned.generated_prefix


def test_streaming_context_debug():
    debug = repr(StreamingContext.new("test prompt", "req-debug"))
    assert "test prompt" in debug
    assert "req-debug" in debug


def test_streaming_context_serialize():
    data = json_encoder.encode(StreamingContext.new("serializable", "req-ser")).decode()
    assert "serializable" in data
    assert "req-ser" in data


def test_streaming_context_deserialize():
    data = (
        '{"prompt":"deserialized","generated_prefix":"prefix","token_count":5,'
        '"primary_backend":"test","request_id":"req-de"}'
    )
    ctx = decode_context_json(data)
    assert ctx.prompt == "deserialized"
    assert ctx.generated_prefix == "prefix"
    assert ctx.token_count == 5
    assert ctx.primary_backend == "test"


def test_failover_config_clone():
    config = FailoverConfig()
    assert msgspec.structs.replace(config).max_retries == config.max_retries


def test_failover_config_debug():
    assert "max_retries" in repr(FailoverConfig())


def test_failover_config_serialize():
    data = json_encoder.encode(FailoverConfig()).decode()
    assert "max_retries" in data
    assert "include_prefix" in data
    assert '"Realizar"' in data


def test_failover_attempt_clone():
    a = attempt(ServingBackend.Ollama, FailoverResult.Success)
    assert msgspec.structs.replace(a).backend == a.backend


def test_failover_attempt_debug():
    assert "Together" in repr(attempt(ServingBackend.Together, None))


def test_failover_result_clone():
    result = FailoverResult.BackendError("timeout")
    assert result == FailoverResult.BackendError("timeout")
    assert result.message == "timeout"


def test_failover_result_debug():
    assert "NoBackendsAvailable" in repr(FailoverResult.NoBackendsAvailable)


def test_failover_result_all_variants():
    results = [
        FailoverResult.Success,
        FailoverResult.Timeout,
        FailoverResult.BackendError("err"),
        FailoverResult.NoBackendsAvailable,
    ]
    assert len(set(results)) == 4
    assert results[0] == FailoverResult.Success


def test_failover_request_clone():
    request = FailoverRequest(request_id="req-1", prompt="prompt", generated_prefix="prefix", token_count=10)
    assert msgspec.structs.replace(request).request_id == request.request_id


def test_failover_request_debug():
    request = FailoverRequest(request_id="debug-req", prompt="test", generated_prefix="", token_count=0)
    assert "debug-req" in repr(request)


def test_failover_stats_clone():
    stats = FailoverStats(total_attempts=10, successful=8, timeouts=1, active_contexts=2)
    assert msgspec.structs.replace(stats).total_attempts == 10


def test_failover_stats_debug():
    assert "FailoverStats" in repr(FailoverStats())


def test_failover_stats_default():
    stats = FailoverStats()
    assert (stats.total_attempts, stats.successful, stats.timeouts, stats.active_contexts) == (0, 0, 0, 0)


def test_failover_manager_config(store):
    manager = store.manager(FailoverConfig(max_retries=5))
    assert manager.config().max_retries == 5


def test_failover_manager_default(store):
    manager = store.manager()
    assert manager.stats().total_attempts == 0


def test_failover_manager_history_trimming(store):
    manager = store.manager()
    for _ in range(110):
        manager.record_attempt(attempt(ServingBackend.Together, FailoverResult.Success))
    assert manager.stats().total_attempts == 100
    assert len(manager.history()) == 100


def test_append_tokens_nonexistent(store):
    manager = store.manager()
    assert manager.append_tokens("nonexistent", "tokens") is None
    assert manager.get_context("nonexistent") is None


def test_should_failover_nonexistent(store):
    assert not store.manager().should_failover("nonexistent")


def test_prepare_failover_without_prefix(store):
    manager = store.manager(FailoverConfig(include_prefix=False))
    manager.start_tracking("req-1", "Original prompt")
    manager.append_tokens("req-1", " generated")
    request = manager.prepare_failover("req-1")
    assert request is not None
    assert request.prompt == "Original prompt"


def test_stats_active_contexts(store):
    manager = store.manager()
    manager.start_tracking("req-1", "p1")
    manager.start_tracking("req-2", "p2")
    manager.start_tracking("req-3", "p3")
    assert manager.stats().active_contexts == 3
    manager.complete("req-1")
    assert manager.stats().active_contexts == 2


def test_streaming_context_primary_backend():
    ctx = StreamingContext.new("prompt", "req-1")
    ctx.primary_backend = "realizar"
    assert ctx.primary_backend == "realizar"
