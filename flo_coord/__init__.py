"""flo_coord: keep streaming LLM answers alive across backend failures and worker crashes.

Every in-flight request's state lives in Redis, so any worker replica can take a
request over and finish it from the exact prefix already generated, exactly once.
"""

from flo_coord.errors import (
    ConfigError,
    ContentPolicyError,
    CoordinatorUnavailableError,
    CorruptStateError,
    FloCoordError,
    GenerationError,
    LeaseLostError,
    PrivacyTierError,
    RequestCancelledError,
    RequestFailedError,
    UnknownModelError,
    ValidationError,
)
from flo_coord.execution.backends import BackendSpec
from flo_coord.execution.coordinator import AnswerStream, Coordinator, ExecutorConfig
from flo_coord.execution.groups import GroupDeployment, ModelGroup
from flo_coord.models import (
    ChatMessage,
    FailoverAttempt,
    FailoverConfig,
    FailoverRequest,
    FailoverResult,
    FailoverStats,
    PrivacyTier,
    RequestOutcome,
    ServingBackend,
    StreamingContext,
    StreamState,
    Takeover,
)
from flo_coord.ownership import AsyncReaper, HeartbeatTask, HeartbeatThread, Reaper
from flo_coord.store import AppendAck, AsyncFailoverManager, FailoverManager, Limits, RetryPolicy, StoreObserver

__version__ = "0.1.0"

__all__ = [
    "AnswerStream",
    "AppendAck",
    "AsyncFailoverManager",
    "AsyncReaper",
    "BackendSpec",
    "ChatMessage",
    "ConfigError",
    "ContentPolicyError",
    "Coordinator",
    "CoordinatorUnavailableError",
    "CorruptStateError",
    "ExecutorConfig",
    "FailoverAttempt",
    "FailoverConfig",
    "FailoverManager",
    "FailoverRequest",
    "FailoverResult",
    "FailoverStats",
    "FloCoordError",
    "GenerationError",
    "GroupDeployment",
    "HeartbeatTask",
    "HeartbeatThread",
    "LeaseLostError",
    "Limits",
    "ModelGroup",
    "PrivacyTier",
    "PrivacyTierError",
    "Reaper",
    "RequestCancelledError",
    "RequestFailedError",
    "RequestOutcome",
    "RetryPolicy",
    "ServingBackend",
    "StoreObserver",
    "StreamState",
    "StreamingContext",
    "Takeover",
    "UnknownModelError",
    "ValidationError",
]
