"""What the I/O shells that execute the core's batches on a redis client share.

The shells: ``AsyncShell`` (``flo_coord.store.shell_async``), written once, and its
blocking twin ``SyncShell`` (``flo_coord.store.shell_sync``), generated from it by
``scripts/unasync.py``; that module's docstring names the three places they differ.
Everything without an ``await`` is here: batch bookkeeping, NOSCRIPT reload, the
transient-fault classification, durability and the retry policy. A batch is one pipeline
(``transaction=False``), so one round trip on a single Redis; on a Cluster the client
splits it by node. Scripts run as Redis Functions (``FCALL``, flo_coord.store.functions), or
with ``EVALSHA`` where Redis has no Functions. They are loaded on demand: a "function not
found" or NOSCRIPT reply (first use, a flush, a restart, a failover to a replica) loads
the library (on every primary of a Cluster) if the credential may, and re-sends the calls
that got it; a credential that may not gets ConfigError naming the operator command.

Retries (``flo_coord.store.retry``): one deadline bounds a whole operation. A fault re-sends only
the calls of the batch that have no reply yet; a batch with a call that is not idempotent
(XADD) is re-sent only when the fault proves that call did not run. The asyncio shell cuts
every attempt at the deadline; a sync attempt is bounded by its client's socket timeout.

The hot path (issue 12): a batch of script calls that needs no WAIT (an append, the
batcher's merged appends, heartbeats) is sent as it is on a connection the shell keeps
(``_HotConnection``: no per-call pool lending; packed by hiredis), its first attempt cut by
one coarse timer (``_Cutter``) instead of a timer per call; a one-call operation
(``core.Single``) runs without a generator. Only a fault or an error reply builds the
bookkeeping of the general path, so retries, reloads and errors behave exactly as there.

Durability: ``durability="replica"`` makes every batch that writes committed state (start,
append, finish) end with ``SET <key>:wait`` + ``WAIT 1 <wait_timeout_ms>`` on the same
connection, and a batch is acknowledged only once a replica has everything up to that SET
(so also a write that an earlier, lost attempt made). A replica that does not confirm in
time is a transient fault: the batch's WAIT is retried until the deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import threading
import time
from typing import Any, TypeVar

import redis.exceptions as rex

from flo_coord.errors import (
    ConfigError,
    CoordinatorUnavailableError,
    CorruptStateError,
    FloCoordError,
    ValidationError,
)
from flo_coord.store import functions
from flo_coord.store.connection import MIN_PLAIN_SOCKET_TIMEOUT, rebuilt_for_deadline
from flo_coord.store.core import Call, Cmd, Eval, Operation, Single
from flo_coord.store.retry import (
    RedisHealth,
    RetryPolicy,
    disable_client_retries,
    is_async_client,
    is_transient,
    not_sent,
)
from flo_coord.store.scripts import APPEND, APPEND_MANY, FINISH, REJECT, START, START_NEW, Script

_hiredis_pack: Any
try:  # a default dependency; without it the hot path packs commands with redis-py's Python packer
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover
    _hiredis_pack = None

T = TypeVar("T")
log = logging.getLogger("flo_coord.shell")

# Writes that a ``durability="replica"`` shell confirms with WAIT before reporting them.
_DURABLE_SCRIPTS = frozenset({s.sha for s in (APPEND, APPEND_MANY, FINISH, START, START_NEW, REJECT)})
#: Calls that are not idempotent: sending one twice adds a second stream entry.
_NOT_IDEMPOTENT = frozenset({"XADD"})
#: Loads within one attempt before it counts as a fault (a fallback to EVALSHA takes 2).
_MAX_RELOADS = 4
#: An attempt that starts at or after the deadline still gets this long (asyncio), so a
#: healthy Redis can answer the last batch of a slow operation. With the time blocking
#: calls may take (XREAD BLOCK, WAIT), it is the documented margin of an asyncio call:
#: every operation returns or raises within its deadline + DEADLINE_MARGIN (+ blocking).
_MIN_ATTEMPT = 0.5
DEADLINE_MARGIN = _MIN_ATTEMPT
_PENDING: Any = object()
#: How far past its deadline a sync attempt started by a retry may end (scheduling noise).
_SYNC_SLACK = 0.1


def _command(call: Call) -> str:
    if isinstance(call, Eval):
        return "FCALL"
    name = call.args[0]
    return (name.decode() if isinstance(name, bytes) else str(name)).upper()


def _retry_safe(batch: list[Call]) -> bool:
    """Stream entries (XADD: history, queued submissions) are the only calls not safe to repeat."""
    return not any(_command(c) in _NOT_IDEMPOTENT for c in batch)


def _durable(call: Call) -> bool:
    return isinstance(call, Eval) and call.script.sha in _DURABLE_SCRIPTS


def _blocking_seconds(calls: list[Call]) -> float:
    """How long blocking calls (XREAD/XREADGROUP BLOCK, WAIT) may legitimately take."""
    total = 0.0
    for call in calls:
        if not isinstance(call, Cmd):
            continue
        args = [a.upper() if isinstance(a, str) else a for a in call.args]
        try:
            if args[0] == "WAIT":
                total = max(total, float(args[2]) / 1000)
            elif "BLOCK" in args:
                total = max(total, float(args[args.index("BLOCK") + 1]) / 1000)
        except (IndexError, TypeError, ValueError):
            continue
    return total


def _is_cluster(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster | AsyncCluster)


class _Run:
    """One batch on its way to Redis: the replies so far and what is still to send."""

    def __init__(self, batch: list[Call], wait: tuple[Cmd, Cmd] | None) -> None:
        self.batch = batch
        self.replies: list[Any] = [_PENDING] * len(batch)
        self.errors: list[BaseException | None] = [None] * len(batch)
        self.unsafe = [i for i, c in enumerate(batch) if _command(c) in _NOT_IDEMPOTENT]
        self.durable = [i for i, c in enumerate(batch) if _durable(c)]
        self.wait = wait if self.durable else None
        self.confirmed = self.wait is None
        self.wait_error: BaseException | None = None

    def next_pipeline(self) -> tuple[list[int], list[Call]]:
        indexes = [i for i, r in enumerate(self.replies) if r is _PENDING]
        calls = [self.batch[i] for i in indexes]
        if not self.confirmed and self.wait is not None:
            calls += list(self.wait)
        return indexes, calls

    def failed(self, indexes: list[int], exc: BaseException) -> None:
        """The whole pipeline failed (nothing, some or all of it may have run)."""
        for i in indexes:
            self.errors[i] = exc
        if not self.confirmed:
            self.wait_error = exc

    def absorb(self, indexes: list[int], replies: list[Any]) -> dict[Script, BaseException]:
        """Take a pipeline's replies; returns the scripts Redis did not have (with the reply)."""
        missing: dict[Script, BaseException] = {}
        for i, reply in zip(indexes, replies, strict=False):
            call = self.batch[i]
            if isinstance(call, Eval) and functions.is_missing(reply):
                missing[call.script] = reply
                self.errors[i] = reply
            elif isinstance(reply, BaseException) and is_transient(reply):
                self.errors[i] = reply
            else:
                self.replies[i] = reply
        if not self.confirmed:
            anchor, acked = replies[len(indexes)], replies[len(indexes) + 1]
            if any(self.replies[i] is _PENDING for i in self.durable):
                self.wait_error = self.errors[next(i for i in self.durable if self.replies[i] is _PENDING)]
            elif isinstance(anchor, BaseException):
                self.wait_error = anchor
            elif isinstance(acked, BaseException):
                self.wait_error = acked
            elif int(acked) < 1:
                self.wait_error = rex.TimeoutError("WAIT: no replica acknowledged the write in time")
            else:
                self.confirmed, self.wait_error = True, None
        return missing

    def fault(self) -> BaseException | None:
        for i, reply in enumerate(self.replies):
            if reply is _PENDING:
                return self.errors[i] or rex.ConnectionError("no reply")
        return None if self.confirmed else (self.wait_error or rex.TimeoutError("WAIT not confirmed"))

    def may_retry(self, exc: BaseException) -> bool:
        if not (is_transient(exc) or functions.is_missing(exc)):
            return False
        # A not-idempotent call is sent again only if it surely did not run.
        return all(self.replies[i] is not _PENDING or not_sent(self.errors[i] or exc) for i in self.unsafe)


class _ShellBase:
    asynchronous: bool

    def __init__(
        self,
        client: Any,
        policy: RetryPolicy | None = None,
        *,
        durability: str = "primary",
        wait_timeout_ms: int = 1000,
    ) -> None:
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, got {type(policy).__name__}")
        if durability not in ("primary", "replica"):
            raise ConfigError(f"durability must be 'primary' or 'replica', got {durability!r}")
        if isinstance(wait_timeout_ms, bool) or not isinstance(wait_timeout_ms, int) or wait_timeout_ms <= 0:
            raise ConfigError(f"wait_timeout_ms must be an integer > 0, got {wait_timeout_ms!r}")
        if not hasattr(client, "pipeline") or not hasattr(client, "execute_command"):
            raise ConfigError(f"redis must be a redis-py client, got {type(client).__name__}")
        if is_async_client(client) != self.asynchronous:
            want = "an asyncio (redis.asyncio)" if self.asynchronous else "a synchronous (redis.Redis)"
            got = f"{type(client).__module__}.{type(client).__name__}"
            raise ConfigError(f"this manager needs {want} client, got {got}")
        self.policy = policy or RetryPolicy()
        if durability == "replica" and _is_cluster(client):
            raise ConfigError(
                "durability='replica' is not supported on Redis Cluster (WAIT confirms one node's writes); "
                "use a primary with replicas behind Sentinel"
            )
        if not self.asynchronous:
            # blocking calls (WAIT) need room in the socket timeout; plain calls need little
            floor = wait_timeout_ms / 1000 + 1.0 if durability == "replica" else MIN_PLAIN_SOCKET_TIMEOUT
            client = rebuilt_for_deadline(client, self.policy.deadline, floor)
            _warn_without_timeout(client)
        self.client = client
        self._merge_appends = not _is_cluster(client)
        self.durability = durability
        self.wait_timeout_ms = wait_timeout_ms
        self.scripting = functions.Scripting()
        #: whether Redis answered the last operation (``Coordinator.redis_available`` reads it)
        self.health = RedisHealth()
        # One retry layer: switch off the client's own retries (redis-py retries 10x by default).
        disable_client_retries(client)

    def _new_run(self, batch: list[Call]) -> _Run:
        wait = None
        if self.durability == "replica":
            anchor_key = next((c.keys[0] for c in batch if _durable(c) and isinstance(c, Eval)), None)
            if anchor_key is not None:
                wait = (
                    Cmd(("SET", f"{anchor_key}:wait", "1", "PX", 60_000)),
                    Cmd(("WAIT", 1, self.wait_timeout_ms)),
                )
        return _Run(batch, wait)

    def _attempt_budget(self, run: _Run, deadline_at: float) -> float:
        remaining = max(deadline_at - time.monotonic(), min(_MIN_ATTEMPT, self.policy.deadline))
        extra = _blocking_seconds(run.batch) + (self.wait_timeout_ms / 1000 if run.wait else 0.0)
        return remaining + extra

    def _last_start(self, deadline_at: float) -> float:
        """The last moment (monotonic) a retry of an operation due at ``deadline_at`` may start.

        An asyncio attempt is cut at the deadline: up to it. A sync attempt cannot be cut:
        none that could end (one socket timeout, plus scheduling noise) past the deadline.
        """
        if self.asynchronous:
            return deadline_at
        kwargs = getattr(getattr(self.client, "connection_pool", None), "connection_kwargs", None)
        timeout = kwargs.get("socket_timeout") if isinstance(kwargs, dict) else None
        return deadline_at - (float(timeout) if isinstance(timeout, int | float) else 0.0) + _SYNC_SLACK

    def _args(self, call: Call) -> tuple[Any, ...]:
        if isinstance(call, Eval):
            keys = call.keys
            return (*self.scripting.prefix(call.script), len(keys), *keys, *call.args)
        return call.args

    def _fast(self, batch: list[Call]) -> bool:
        """Whether a batch takes the hot path: script calls only (never blocking, never an
        XADD) that need no WAIT after them. They are sent as they are; only a fault or an
        error reply builds the bookkeeping (``_Run``) the other batches start with."""
        if self.durability == "primary":
            return all(isinstance(call, Eval) for call in batch)
        return all(isinstance(call, Eval) and call.script.sha not in _DURABLE_SCRIPTS for call in batch)

    def _judge(self, run: _Run, replies: list[Any]) -> dict[Script, BaseException] | list[Any]:
        """Judge hot-path replies holding an error as ``_attempt`` judges a pipeline's: the
        scripts to load (then the attempt goes on), the replies (errors the operation
        judges), or the fault raised (transient: retried)."""
        missing = run.absorb(list(range(len(replies))), replies)
        if missing:
            return missing
        fault = run.fault()
        if fault is not None:
            raise fault
        return run.replies

    def _error(self, exc: Exception, operation: str, request_id: str | None) -> BaseException:
        error = public_error(exc, operation, request_id)
        if isinstance(error, CoordinatorUnavailableError):
            self.health.failure(error)
        return error


#: Script or command errors that only foreign data in a key of ours can cause.
_CORRUPT_MARKERS = (
    "FLOCORRUPT",
    "WRONGTYPE",
    "is not an integer",
    "not a valid float",
    "not an integer or out of range",
)


#: What decoding a reply raises when a key holds data flo_coord did not write (a number that
#: is not one, bytes that are not UTF-8, a reply of the wrong shape, nesting too deep).
_DATA_ERRORS = (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError)


class UndecodableReplyError(Exception):
    """An operation could not decode a reply: foreign or corrupt data (``public_error`` types it)."""


def _advance(op: Operation[T], replies: list[Any]) -> list[Call]:
    """``op.send(replies)``: its next batch; a reply it cannot decode is UndecodableReplyError."""
    try:
        return op.send(replies)
    except FloCoordError:
        raise
    except _DATA_ERRORS as exc:
        raise UndecodableReplyError(f"{type(exc).__name__}: {exc}") from exc


def _finish(op: Single[T], reply: Any) -> T:
    """``op.resolve(reply)``; a reply it cannot decode is UndecodableReplyError (as in ``_advance``)."""
    try:
        return op.resolve(reply)
    except FloCoordError:
        raise
    except _DATA_ERRORS as exc:
        raise UndecodableReplyError(f"{type(exc).__name__}: {exc}") from exc


def public_error(exc: BaseException, operation: str, request_id: str | None) -> BaseException:
    """What a public call raises for ``exc``: a FloCoordError for every Redis fault.

    Transient faults past the deadline, and refusals no retry cures (NOPERM, wrong
    password, OOM, MISCONF...) become CoordinatorUnavailableError; errors caused by foreign
    data in a key become CorruptStateError; redis-py refusing an argument, ValidationError.
    Anything else (a bug) is returned unchanged.
    """
    if isinstance(exc, FloCoordError):
        return exc
    if isinstance(exc, UndecodableReplyError):
        return CorruptStateError(request_id or "", f"{operation}: undecodable reply ({exc})")
    if isinstance(exc, rex.DataError):
        return ValidationError(f"{operation}: {exc}")
    if isinstance(exc, rex.ResponseError) and not is_transient(exc):
        message = str(exc)
        if any(marker in message for marker in _CORRUPT_MARKERS):
            detail = re.sub(r"^(ERR )?user_(script|function):\d+: ", "", message.split(" script: ")[0])
            return CorruptStateError(request_id or "", f"{operation}: {detail}")
    if is_transient(exc) or isinstance(exc, rex.RedisError | rex.RedisClusterException):
        return CoordinatorUnavailableError(operation, request_id, exc)
    return exc


def request_error(exc: BaseException, operation: str, request_id: str) -> BaseException:
    """``public_error`` for one request's share of a batch run for several (names the request)."""
    if isinstance(exc, CoordinatorUnavailableError) and exc.request_id is None:
        error = CoordinatorUnavailableError(exc.operation, request_id, exc.cause)
        error.__cause__ = exc.__cause__
        return error
    return public_error(exc, operation, request_id) if isinstance(exc, Exception) else exc


def _warn_without_timeout(client: Any) -> None:
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if isinstance(kwargs, dict) and kwargs.get("socket_timeout") is None:
        log.warning(
            "the Redis client has no socket_timeout: a frozen server can hang a call past the retry "
            "deadline; build it with socket_timeout=... (flo_coord.store.connection.connect does)"
        )


class _Cutter:
    """Cuts the hot path's attempts that outlive their budget, on one coarse timer for all.

    Why: ``asyncio.timeout`` schedules and cancels a timer per call (about 4 us on the
    benchmark machine, a twentieth of a round trip); here a call registers its task and
    end in a dict, and one timer every ``TICK`` seconds cancels the tasks past theirs.
    A cut lands at most ``TICK`` after the end (after the deadline, so no retry follows:
    the call ends within ``DEADLINE_MARGIN``); the shell uses it only for budgets of
    ``MIN_BUDGET`` or more (a first attempt of a usual deadline), and keeps
    ``asyncio.timeout`` for shorter ones. As with ``asyncio.timeout``, the cancellation
    becomes a timeout only when no other one is pending for the task.
    """

    TICK = 0.05
    MIN_BUDGET = 1.0

    def __init__(self) -> None:
        self.ends: dict[asyncio.Task[Any], float] = {}
        self.cut: set[asyncio.Task[Any]] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def watch(self, task: asyncio.Task[Any], end: float) -> None:
        self.ends[task] = end
        if self.timer is None or self.loop is not asyncio.get_running_loop() or self.loop.is_closed():
            self.loop = asyncio.get_running_loop()
            self.timer = self.loop.call_later(self.TICK, self._check)

    def was_cut(self, task: asyncio.Task[Any]) -> bool:
        return task in self.cut

    def forget(self, task: asyncio.Task[Any]) -> None:
        self.ends.pop(task, None)
        self.cut.discard(task)

    def _check(self) -> None:
        now = time.monotonic()
        late = [task for task, end in self.ends.items() if now >= end]
        for task in late:
            del self.ends[task]
            self.cut.add(task)
            task.cancel()
        self.timer = self.loop.call_later(self.TICK, self._check) if self.ends and self.loop else None


class _HotConnection:
    """A connection a shell keeps for its batches of script calls, beside the client's pool.

    Why: lending a connection costs redis-py 8 more than Redis spends running the APPEND
    script (a lock, a non-blocking read to check the socket is clean, observability
    counters: about 30 us per command on the benchmark machine, where an HSET round trip
    takes 90 us). A batch on the kept connection is pack, send and read; when it is in use
    (another task or thread), the call borrows one from the pool as ``execute_command``
    would. The kept connection is made like the pool's (its class and arguments) but is
    not taken from it, so managers sharing one client never exhaust its pool; the shell's
    ``close``/``aclose`` (the managers' ``close``/``aclose``) disconnect it, and so does
    garbage collection. A connection that fails is disconnected by redis-py itself
    (``send_packed_command`` and ``read_response`` do, on any error or cancellation), and
    reconnects on its next use with ``connect()``, as the pool would (a Sentinel-managed
    connection asks the Sentinels for the primary there); in a forked child the parent's
    connection is left alone. Error replies come back as exceptions in the reply list.

    Only for plain and Sentinel-managed clients (``usable``): a Cluster client, a
    single-connection client, one with a reply callback for scripts, or any other class
    (a test double) keeps its own ``execute_command``.
    """

    def __init__(self, client: Any) -> None:
        self.pool = client.connection_pool
        self.conn: Any = None
        #: held while the kept connection is in use; only ever taken without blocking, but
        #: by the sync side's ``close`` (which waits for the thread using it)
        self.lock = threading.Lock()
        self.forks = _forks[0]
        # redis-py < 5.3 requires a command name here; later versions warn when one is given
        params = inspect.signature(self.pool.get_connection).parameters
        name = params.get("command_name")
        self.name_args: tuple[str, ...] = (
            ("FCALL",) if name is not None and name.default is inspect.Parameter.empty else ()
        )
        kwargs = self.pool.connection_kwargs
        utf8 = str(kwargs.get("encoding", "utf-8")).lower().replace("_", "-") in ("utf-8", "utf8")
        # hiredis packs a command in one C call, as redis-py's sync client does (its asyncio
        # packer is Python code: 15 us for an APPEND's 12 arguments), for the default encoding
        self.hiredis = _hiredis_pack is not None and utf8 and kwargs.get("encoding_errors", "strict") == "strict"

    @staticmethod
    def usable(client: Any, asynchronous: bool) -> bool:
        if asynchronous:
            import redis.asyncio as module
        else:
            import redis as module  # type: ignore[no-redef]
        return (
            isinstance(client, module.Redis)
            and type(client).execute_command is module.Redis.execute_command
            and getattr(client, "connection", None) is None
            and isinstance(getattr(client, "connection_pool", None), module.ConnectionPool)
            and not any(name in client.response_callbacks for name in ("FCALL", "EVALSHA"))
        )

    def _kept(self) -> Any:
        """The kept connection, made on first use (in a forked child: a new one; the inherited
        socket is the parent's, left alone)."""
        if self.forks != _forks[0]:
            self.conn, self.forks = None, _forks[0]
        if self.conn is None:
            self.conn = self.pool.connection_class(**self.pool.connection_kwargs)
        return self.conn

    def _pack(self, conn: Any, commands: list[tuple[Any, ...]]) -> Any:
        if not self.hiredis:
            return conn.pack_commands(commands) if len(commands) > 1 else conn.pack_command(*commands[0])
        try:
            if len(commands) == 1:
                return [_hiredis_pack(commands[0])]  # a list: the sync send_packed_command iterates it
            return [b"".join([_hiredis_pack(args) for args in commands])]
        except TypeError as exc:  # as redis-py's packers say it: an argument of no Redis type
            raise rex.DataError(str(exc)) from None


#: Forks of this process so far (a kept connection must not be used across one).
_forks = [0]


def _forked() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_forked)
