"""The store: the only way to Redis.

Key schema (``keys``), Lua scripts and the Redis Functions library (``scripts``,
``functions``), codecs (``codec``), input bounds (``validation``), the sans-I/O protocol
core (``core``), the I/O shell with its retry and connection rules (``shell``, ``retry``,
``connection``), the append batcher (``batching``), lease renewal (``heartbeat``), the
optional observer hooks (``observer``), the operations of the layers above (``breakers``,
``inflight``, ``capabilities``, ``queue``, ``gateway``, ``feed``, ``inspect``, mixed in by
``surface``) and the public facades (``facade``: ``AsyncFailoverManager``, written once,
and ``FailoverManager``, generated from it into ``facade_sync`` by ``scripts/unasync.py``).

``__all__`` below is the store's public surface: code above the store (execution/,
gateway/, cli/, ownership, metrics, testing/) imports only these names (from here or, for
the facades, from ``flo_coord.store.facade``) and reaches Redis only through a manager's
public methods; tests/test_layers.py checks it.
"""

from flo_coord.store import validation
from flo_coord.store.breakers import BreakerStore, Decision
from flo_coord.store.capabilities import CapabilityStore
from flo_coord.store.connection import connect
from flo_coord.store.core import AppendAck, Holding, default_worker_id, render_messages
from flo_coord.store.facade import AsyncFailoverManager, FailoverManager
from flo_coord.store.functions import client_rules as client_fcall_rules
from flo_coord.store.functions import ensure_loaded as ensure_functions
from flo_coord.store.functions import install as install_functions
from flo_coord.store.gateway import GatewayStore, IdempotencyConflictError, Presentation, key_hash
from flo_coord.store.heartbeat import AsyncPeriodic, HeartbeatTask, HeartbeatThread, Periodic, start_heartbeat
from flo_coord.store.inflight import InFlightStore
from flo_coord.store.inspect import as_builtins
from flo_coord.store.observer import StoreObserver
from flo_coord.store.queue import Entry, Poison, QueueStore, Submission
from flo_coord.store.retry import RedisHealth, RetryPolicy, outage_retrying
from flo_coord.store.scripts import registry as script_registry
from flo_coord.store.validation import CHAT_ROLES, Limits

__all__ = [
    "CHAT_ROLES",
    "AppendAck",
    "AsyncFailoverManager",
    "AsyncPeriodic",
    "BreakerStore",
    "CapabilityStore",
    "Decision",
    "Entry",
    "FailoverManager",
    "GatewayStore",
    "HeartbeatTask",
    "HeartbeatThread",
    "Holding",
    "IdempotencyConflictError",
    "InFlightStore",
    "Limits",
    "Periodic",
    "Poison",
    "Presentation",
    "QueueStore",
    "RedisHealth",
    "RetryPolicy",
    "StoreObserver",
    "Submission",
    "as_builtins",
    "client_fcall_rules",
    "connect",
    "default_worker_id",
    "ensure_functions",
    "install_functions",
    "key_hash",
    "outage_retrying",
    "render_messages",
    "script_registry",
    "start_heartbeat",
    "validation",
]
