"""The sans-I/O core of the failover protocol.

Every operation is a generator: it validates its input eagerly (so bad input raises
before any I/O), then yields batches of Redis calls and receives their replies. The
sync and async shells (``flo_coord.store.shell``) only execute batches, so the logic exists
once. A batch is sent as one pipeline: one round trip on a single Redis.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import uuid
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from itertools import chain
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec

from flo_coord import defaults
from flo_coord.errors import CorruptStateError, LeaseLostError, ValidationError
from flo_coord.models import (
    ChatMessage,
    FailoverAttempt,
    FailoverConfig,
    FailoverRequest,
    FailoverStats,
    HistoryEntry,
    RequestOutcome,
    ServingBackend,
    StreamingContext,
    StreamState,
    Takeover,
    count_tokens,
)
from flo_coord.redact import redact_secrets
from flo_coord.store import validation
from flo_coord.store.codec import (
    attempt_result_counts,
    decode_context,
    decode_history,
    decode_outcome,
    encode_history,
    encode_messages,
    encode_params,
    index_member,
    json_encoder,
    pairs,
    text,
)
from flo_coord.store.keys import Keys, RequestKeys
from flo_coord.store.scripts import (
    APPEND,
    APPEND_MANY,
    CANCEL,
    CLAIM,
    FINISH,
    FOLLOW_READ,
    HEARTBEAT,
    INDEX_TOUCH,
    LEASE_STATUS,
    ORPHAN_CANDIDATES,
    READ,
    REJECT,
    START,
    START_NEW,
    UPDATE,
    Script,
)

T = TypeVar("T")
log = logging.getLogger("flo_coord.core")

# ------------------------------------------------------------------------ calls


# Named tuples, not frozen dataclasses: as immutable, and made several times faster (one
# per call on the hot path).
class Eval(NamedTuple):
    """Run a registered script (FCALL, or EVALSHA; the shell loads it when Redis lacks it)."""

    script: Script
    keys: tuple[str, ...]
    args: tuple[Any, ...]


class Cmd(NamedTuple):
    """A plain Redis command."""

    args: tuple[Any, ...]


Call = Eval | Cmd
#: An operation yields batches of calls and gets back one reply per call; a reply that
#: is an error arrives as the exception instance (check it with ``ok``).
Operation = Generator[list[Call], list[Any], T]


class Single(Generator[list[Call], list[Any], T], Generic[T]):
    """An operation of one call, without a generator frame (the hot path's form).

    ``start()`` builds the call when the operation starts (not when it is made: state such
    as the next append ``seq`` is read at sending time, as a generator would), and
    ``finish(reply)`` turns its reply into the result; ``failed(exc)`` hears that the
    call's outcome is unknown (a fault thrown in after it was sent, or the operation
    abandoned: ``close()``). It is a ``Generator`` like any operation, so ``together``,
    ``drive`` and the batcher run it unchanged; the shells send ``fast_call()`` directly
    (no generator, batch or bookkeeping objects). A subclass whose work is sometimes more
    than one call returns None from ``fast_call`` then, and is driven step by step.
    """

    __slots__ = ("_state",)
    _NEW, _SENT, _DONE = 0, 1, 2

    def __init__(self) -> None:
        self._state = Single._NEW

    def start(self) -> Call:
        raise NotImplementedError

    def finish(self, reply: Any) -> T:
        raise NotImplementedError

    def failed(self, exc: BaseException) -> None:
        """The sent call may or may not have run (``exc`` says why)."""

    def fast_call(self) -> Call | None:
        """Start the operation and return its one call; None: drive it step by step."""
        self._state = Single._SENT
        return self.start()

    def resolve(self, reply: Any) -> T:
        """The result of the reply to ``fast_call``'s call."""
        self._state = Single._DONE
        return self.finish(reply)

    def send(self, value: list[Any] | None) -> list[Call]:
        if self._state == Single._NEW:
            if value is not None:
                raise TypeError("can't send non-None value to a just-started operation")
            call = self.fast_call()
            assert call is not None
            return [call]
        if self._state == Single._SENT:
            assert value is not None
            raise StopIteration(self.resolve(value[0]))
        raise StopIteration

    def throw(  # type: ignore[override]
        self, typ: Any, val: Any = None, tb: TracebackType | None = None
    ) -> list[Call]:
        """The round trip failed (or, with GeneratorExit, the operation is abandoned): a
        sent call's outcome is unknown (``failed``); the exception is raised again."""
        exc = typ if isinstance(typ, BaseException) else (val if isinstance(val, BaseException) else typ())
        if self._state == Single._SENT:
            self._state = Single._DONE
            self.failed(exc)
        self._state = Single._DONE
        raise exc


def together(ops: list[Operation[Any]]) -> Operation[list[Any]]:
    """Run independent ``ops`` side by side: their batches of each step go as one pipeline
    (one round trip per step instead of one per operation). Returns their results in
    order; the first error (a failed batch, or one op's own) is raised. Each op keeps its
    atomicity (a script stays one script); only their sending is shared."""
    results: list[Any] = [None] * len(ops)
    pending: dict[int, list[Call]] = {}
    for index, op in enumerate(ops):
        try:
            pending[index] = next(op)
        except StopIteration as stop:
            results[index] = stop.value
    while pending:
        replies = yield [call for batch in pending.values() for call in batch]
        step, start = pending, 0
        pending = {}
        for index, batch in step.items():
            part, start = replies[start : start + len(batch)], start + len(batch)
            try:
                pending[index] = ops[index].send(part)
            except StopIteration as stop:
                results[index] = stop.value
    return results


class AppendAck(msgspec.Struct, frozen=True, gc=False):
    """Redis acknowledged an append: the text up to ``length`` bytes is committed.

    (``gc=False``: only numbers inside, so the cyclic garbage collector need not track one
    per append; fewer tracked objects, shorter full collections in a busy process.)
    """

    applied: bool  #: False when ``seq`` was already applied (a retried append)
    seq: int
    length: int
    token_count: int


@dataclass(slots=True)
class Holding:
    """What this worker holds of one request: its fencing epoch, next append seq, and the
    automatic-seq append whose outcome is unknown, if any.

    ``unknown`` is (epoch, seq, text, token count) of an append that Redis may or may not have applied
    (the shell gave up on it past its deadline, or its caller abandoned it). The next
    automatic-seq append of the request re-sends that text under that seq first
    (``_Append``): applied once either way (``DUP`` if it had been), so later
    text can never reuse its seq and be taken for its duplicate. ``lock`` serialises a
    sync caller's automatic-seq appends (the asyncio batcher keeps one in flight itself).
    """

    epoch: int
    next_seq: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)
    unknown: tuple[int, int, str, int] | None = None  #: (epoch, seq, text, token count)


#: Every live core of this process, so a forked child can reset them (``_after_fork``).
_cores: weakref.WeakSet[FailoverCore] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for core in list(_cores):
        core._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def default_worker_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def ok(reply: Any, request_id: str | None = None) -> Any:
    """Raise the error a reply carries (foreign data becomes CorruptStateError)."""
    if isinstance(reply, BaseException):
        message = str(reply)
        if request_id is not None and ("FLOCORRUPT" in message or "WRONGTYPE" in message):
            detail = re.sub(r"^(ERR )?user_(script|function):\d+: ", "", message.split(" script: ")[0].strip())
            raise CorruptStateError(request_id, detail) from None
        raise reply
    return reply


def _history_entry(fields: Any) -> HistoryEntry | None:
    """One history stream entry; None for a foreign one (not even UTF-8, not JSON...)."""
    try:
        return decode_history(pairs(fields).get("e", ""))
    except (UnicodeDecodeError, IndexError, AttributeError):
        return None


def _status(reply: Any, request_id: str) -> tuple[str, list[Any]]:
    reply = ok(reply, request_id)
    if not isinstance(reply, list) or not reply:
        raise CorruptStateError(request_id, f"unexpected script reply {reply!r:.80}")
    return text(reply[0]), reply


class FailoverCore:
    """Protocol state and operations of one worker in one namespace (no I/O)."""

    def __init__(
        self,
        config: FailoverConfig | None,
        *,
        namespace: str,
        worker_id: str | None,
        lease_ttl: float,
        max_age: float = defaults.MAX_AGE,
        retention: float = defaults.RETENTION,
        limits: validation.Limits | None = None,
    ) -> None:
        if config is not None and not isinstance(config, FailoverConfig):
            raise ValidationError(f"config must be a FailoverConfig, got {type(config).__name__}")
        self.config = config or FailoverConfig()
        self.limits = validation.limits(limits)
        self.keys = Keys(validation.namespace(namespace))
        self.worker_id = validation.worker_id(worker_id if worker_id is not None else default_worker_id(), self.limits)
        self.lease_ttl = validation.positive_seconds("lease_ttl", lease_ttl)
        self.max_age = validation.positive_seconds("max_age", max_age)
        self.retention = validation.positive_seconds("retention", retention)
        #: deployment names (besides ServingBackend names) this core accepts as a backend;
        #: the Coordinator registers its configured deployments here
        self.deployments: frozenset[str] = frozenset()
        self._held: dict[str, Holding] = {}
        self._held_lock = threading.Lock()
        self._keys_cache: dict[str, tuple[str, str, str, str]] = {}
        self._named_by_us = worker_id is None
        _cores.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the requests are the parent's, and so is a default worker id.

        A child that kept them would write under the parent's owner, epoch and seqs: its
        append would take a seq the parent is about to use, and the parent's text would be
        acknowledged as a duplicate and dropped. So the child holds nothing (its writes to
        the parent's requests raise LeaseLostError) and, unless the caller named the worker,
        is a worker of its own (a fresh default id, with its own pid)."""
        self._held = {}
        self._held_lock = threading.Lock()  # another thread may have held it at the fork
        if self._named_by_us:
            self.worker_id = validation.worker_id(default_worker_id(), self.limits)

    # ------------------------------------------------------------ ownership table

    def holding(self, request_id: str) -> Holding | None:
        return self._held.get(request_id)

    def held_ids(self) -> list[str]:
        with self._held_lock:
            return list(self._held)

    def _hold(self, request_id: str, epoch: int, last_seq: int) -> None:
        with self._held_lock:
            self._held[request_id] = Holding(epoch=epoch, next_seq=last_seq + 1)

    def _drop(self, request_id: str, epoch: int | None = None) -> None:
        with self._held_lock:
            held = self._held.get(request_id)
            if held is not None and (epoch is None or held.epoch == epoch):
                del self._held[request_id]

    def _lost(self, request_id: str, held_epoch: int, reply: list[Any]) -> LeaseLostError:
        self._drop(request_id, held_epoch)
        if text(reply[0]) == "GONE":
            return LeaseLostError(request_id, held_epoch=held_epoch)
        return LeaseLostError(
            request_id,
            held_epoch=held_epoch,
            current_owner=text(reply[1]) or None,
            current_epoch=int(reply[2]),
            completed=len(reply) > 3 and int(reply[3]) == 1,
        )

    def _ms(self, seconds: float) -> int:
        return max(1, int(seconds * 1000))

    def _rid(self, request_id: str) -> tuple[str, RequestKeys]:
        rid = validation.request_id(request_id, self.limits)
        return rid, self.keys.request(rid)

    def _append_keys(self, rid: str) -> tuple[str, str, str, str]:
        """A request's keys as APPEND takes them, built once per request (not per token)."""
        keys = self._keys_cache.get(rid)
        if keys is None:
            if len(self._keys_cache) >= _KEYS_CACHED:
                self._keys_cache.clear()  # bounded: ids of long-finished requests go
            keys = self._keys_cache[rid] = astuple(self.keys.request(rid))
        return keys

    def _fenced(
        self, script: Script, rk: RequestKeys, rid: str, *args: Any, epoch: int | None = None
    ) -> tuple[Eval, int]:
        """The fenced call of ``script`` and the epoch it is fenced on.

        ``epoch`` is the generation token of the caller (the epoch its generation started
        or claimed the request under); without it, the epoch this worker holds now.
        """
        epoch = self._fence_epoch(rid, epoch)
        return Eval(script, astuple(rk), (self.worker_id, epoch, *args)), epoch

    def _fence_epoch(self, rid: str, epoch: int | None) -> int:
        """The epoch a write of ``rid`` is fenced on (see ``_fenced``)."""
        if epoch is None:
            held = self._held.get(rid)
            return held.epoch if held else 0  # epoch 0 never matches: a non-holder is fenced out
        self._check_generation(rid, epoch)
        return epoch

    def _check_generation(self, rid: str, epoch: int) -> None:
        """Refuse, before any I/O, a write of a generation this worker no longer holds.

        When this worker re-claims a request it was still running (its lease expired in an
        outage), the holding moves to the new epoch: the older generation's writes must not
        pass the fence under the new epoch, so they stop here with LeaseLostError.
        """
        validation.epoch(epoch)
        held = self._held.get(rid)
        if held is None or held.epoch != epoch:
            raise LeaseLostError(
                rid,
                held_epoch=epoch,
                current_owner=self.worker_id if held is not None else None,
                current_epoch=held.epoch if held is not None else None,
            )

    # ------------------------------------------------------------------ tracking

    def start_tracking(
        self,
        request_id: str,
        prompt: Any,
        backend: ServingBackend | str | None = None,
        *,
        messages: Any = None,
        max_tokens: int | None = None,
        params: dict[str, Any] | None = None,
        model_group: str | None = None,
    ) -> Operation[StreamingContext]:
        """Track a request; ``params`` (sampling parameters, JSON values) and ``model_group``
        (the model group it runs through, groups.py) are stored with it, by the same write,
        for any replica that takes it over. Raises ValidationError for a bad one."""
        if params is not None and not isinstance(params, dict):
            raise ValidationError(f"params must be a dict of JSON values, got {type(params).__name__}")
        group = validation.label("model_group", model_group, self.limits) if model_group is not None else None
        args = self._start_args(request_id, prompt, backend, messages, max_tokens)
        return self._start(*args, params=params or None, model_group=group)

    def start_new(
        self,
        request_id: str,
        prompt: Any,
        backend: ServingBackend | str | None = None,
        *,
        messages: Any = None,
        max_tokens: int | None = None,
    ) -> Operation[StreamingContext | None]:
        """``start_tracking`` for a queued request, as one script (START_NEW): None, and
        nothing changed, when the request exists or has an outcome (a late or duplicate
        queue delivery must never overwrite, or run again, a request someone started)."""
        return self._start(*self._start_args(request_id, prompt, backend, messages, max_tokens), START_NEW)

    def _start_args(
        self, request_id: str, prompt: Any, backend: Any, messages: Any, max_tokens: Any
    ) -> tuple[str, RequestKeys, str, str, list[ChatMessage] | None, int | None]:
        rid, rk = self._rid(request_id)
        msgs = validation.messages(messages, self.limits) if messages is not None else None
        if msgs is not None and prompt is None:
            prompt = render_messages(msgs)
        prompt = validation.prompt(prompt, self.limits)
        primary = self._backend_name(backend)
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValidationError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        return rid, rk, prompt, primary, msgs, max_tokens

    def reject(self, request_id: str, reason: Any, *, kind: str) -> Operation[bool]:
        """End a request nobody runs and nobody can run (a poison queue entry, a corrupt
        stored context) as Failed with ``reason``/``kind``, so followers see why.

        Returns False when it changed nothing: the request already has an outcome, or its
        context holds a live lease (someone runs it)."""
        rid, rk = self._rid(request_id)
        reason = validation.text("reason", reason, self.limits.max_chunk_bytes)
        kind = validation.label("kind", kind, self.limits)
        return self._reject(rid, rk, reason, kind)

    def _reject(self, rid: str, rk: RequestKeys, reason: str, kind: str) -> Operation[bool]:
        args = (self.worker_id, reason, kind, self._ms(self.retention))
        (reply,) = yield [Eval(REJECT, astuple(rk), args)]
        status, _ = _status(reply, rid)
        if status != "OK":
            return False
        (removed,) = yield [Cmd(("ZREM", self.keys.active, rid))]
        ok(removed)
        return True

    def _backend_name(self, backend: ServingBackend | str | None) -> str:
        if backend is None:
            return self.config.fallback_order[0].value
        if isinstance(backend, ServingBackend):
            return backend.value
        if isinstance(backend, str) and backend in self.deployments:
            return backend
        if isinstance(backend, str):
            return ServingBackend.parse(backend).value
        raise ValidationError(f"backend must be a ServingBackend, got {type(backend).__name__}")

    def _start(
        self,
        rid: str,
        rk: RequestKeys,
        prompt: str,
        primary: str,
        msgs: list[ChatMessage] | None,
        max_tokens: int | None,
        script: Script = START,
        params: dict[str, Any] | None = None,
        model_group: str | None = None,
    ) -> Operation[Any]:
        ttl = self._ms(self.lease_ttl)
        args = (
            rid,
            prompt,
            primary,
            self.worker_id,
            ttl,
            self._ms(self.max_age),
            encode_messages(msgs),
            max_tokens or "",
            _encode_params(params, self.limits),
            model_group or "",
        )
        # The index hint goes first: a live request is never missing from the index.
        replies = yield [Eval(INDEX_TOUCH, (self.keys.active,), (ttl, "add", rid)), Eval(script, astuple(rk), args)]
        ok(replies[0])
        status, reply = _status(replies[1], rid)
        if status == "EXISTS":
            return None  # START_NEW refused: the index entry is a hint the request's hash corrects
        epoch, lease, now = int(reply[1]), int(reply[2]), int(reply[3])
        self._hold(rid, epoch, 0)
        return StreamingContext(
            prompt=prompt,
            request_id=rid,
            primary_backend=primary,
            messages=msgs,
            max_tokens=max_tokens,
            params=params,
            model_group=model_group,
            owner=self.worker_id,
            epoch=epoch,
            lease_deadline=lease / 1000,
            created_at=now / 1000,
        )

    def append_tokens(
        self, request_id: str, tokens: Any, *, seq: Any = None, epoch: int | None = None
    ) -> Operation[AppendAck | None]:
        """Commit ``tokens``; ``epoch`` is the caller's generation token (see ``_fenced``)."""
        rid = validation.request_id(request_id, self.limits)
        chunk = validation.chunk(tokens, self.limits)
        return _Append(self, rid, [chunk], validation.seq(seq), epoch)

    def check_offer(self, request_id: str, tokens: Any) -> Holding | None:
        """Validate an append without building it (the hot path's check); the holding, if any.

        A held request id was validated when it was taken, so only the text is checked.
        """
        held = self._held.get(request_id) if isinstance(request_id, str) else None
        if held is None:
            validation.request_id(request_id, self.limits)
        validation.chunk(tokens, self.limits)
        return held

    def append_many(self, request_id: str, chunks: list[str], epoch: int | None = None) -> Operation[AppendAck | None]:
        """Commit several chunks as one append (the batcher's path).

        ``request_id`` and ``chunks`` were validated at the public edge
        (``check_offer``): they are not checked again here.
        """
        return _Append(self, request_id, chunks, None, epoch)

    def update_state(self, request_id: str, state: StreamState, *, epoch: int | None = None) -> Operation[None]:
        rid, rk = self._rid(request_id)
        if not isinstance(state, StreamState):
            raise ValidationError(f"state must be a StreamState, got {type(state).__name__}")
        return self._update(rid, rk, "state", state.name, "state_reason", state.message or "", epoch=epoch)

    def mark_backend_failed(
        self, request_id: str, backend: ServingBackend | str, *, epoch: int | None = None
    ) -> Operation[None]:
        rid, rk = self._rid(request_id)
        return self._update(rid, rk, "+failed", self._backend_name(backend), epoch=epoch)

    def set_usage(self, request_id: str, usage: dict[str, int], *, epoch: int | None = None) -> Operation[None]:
        """Store the usage summed over the request's attempts so far (fenced), for a takeover to continue."""
        rid, rk = self._rid(request_id)
        return self._update(rid, rk, *_ending_fields(None, usage, self.limits), epoch=epoch)

    def set_current_backend(
        self, request_id: str, backend: ServingBackend | str, *, epoch: int | None = None
    ) -> Operation[None]:
        rid, rk = self._rid(request_id)
        return self._update(rid, rk, "current_backend", self._backend_name(backend), epoch=epoch)

    def set_model_group(self, request_id: str, model_group: str, *, epoch: int | None = None) -> Operation[None]:
        """Store the model group a request runs against (fenced), for a takeover to use the same."""
        rid, rk = self._rid(request_id)
        value = validation.label("model_group", model_group, self.limits)
        return self._update(rid, rk, "model_group", value, epoch=epoch)

    def _update(self, rid: str, rk: RequestKeys, *pairs_: str, epoch: int | None = None) -> Operation[None]:
        call, epoch = self._fenced(UPDATE, rk, rid, *pairs_, epoch=epoch)
        (reply,) = yield [call]
        status, reply = _status(reply, rid)
        if status != "OK":
            raise self._lost(rid, epoch, reply)

    def complete(
        self,
        request_id: str,
        *,
        backend: str | None = None,
        model: str | None = None,
        finish_reason: str | None = None,
        usage: dict[str, int] | None = None,
        epoch: int | None = None,
    ) -> Operation[bool]:
        rid, rk = self._rid(request_id)
        backend = validation.label("backend", backend or "", self.limits)
        model = validation.label("model", model or "", self.limits)
        extra = _ending_fields(finish_reason, usage, self.limits)
        return self._finish(rid, rk, "Completed", "", "", backend, model, extra=extra, epoch=epoch)

    def fail(
        self,
        request_id: str,
        reason: Any,
        *,
        kind: str = "GenerationError",
        finish_reason: str | None = None,
        usage: dict[str, int] | None = None,
        epoch: int | None = None,
    ) -> Operation[bool]:
        rid, rk = self._rid(request_id)
        reason = redact_secrets(validation.text("reason", reason, self.limits.max_chunk_bytes))
        kind = validation.label("kind", kind, self.limits)
        extra = _ending_fields(finish_reason, usage, self.limits)
        return self._finish(rid, rk, "Failed", reason, kind, "", "", extra=extra, epoch=epoch)

    def _finish(
        self, rid: str, rk: RequestKeys, state: str, *args: str, extra: tuple[str, ...] = (), epoch: int | None = None
    ) -> Operation[bool]:
        call, epoch = self._fenced(FINISH, rk, rid, state, *args[:4], self._ms(self.retention), *extra, epoch=epoch)
        (reply,) = yield [call]
        status, reply = _status(reply, rid)
        finished_elsewhere = status == "LOST" and len(reply) > 3 and int(reply[3]) == 1
        if status in ("OK", "GONE"):
            # Only now: a refused (fenced-out) finish must not drop the live owner's index entry.
            (removed,) = yield [Cmd(("ZREM", self.keys.active, rid))]
            ok(removed)
        if status == "OK":
            self._drop(rid, epoch)
            return True
        if epoch == 0 and (status == "GONE" or finished_elsewhere):
            # The original: completing an unknown request is a no-op. A finished request is
            # unknown to a manager that does not hold it (e.g. a second complete()).
            return False
        raise self._lost(rid, epoch, reply)

    def release(self, request_id: str, *, epoch: int | None = None) -> Operation[None]:
        """Hand a request back: its lease ends now, so another worker claims it at once."""
        rid, rk = self._rid(request_id)
        if epoch is not None:
            self._check_generation(rid, epoch)
        return self._release(rid, rk, epoch)

    def _release(self, rid: str, rk: RequestKeys, epoch: int | None) -> Operation[None]:
        yield from self._update(rid, rk, "lease", "0", epoch=epoch)
        replies = yield [Eval(INDEX_TOUCH, (self.keys.active,), (0, "add", rid))]
        ok(replies[0])
        self._drop(rid, epoch)

    def forget(self, request_id: str, epoch: int | None = None) -> None:
        """Stop holding a request locally (no I/O): heartbeats no longer renew its lease, so
        it becomes claimable ``lease_ttl`` after the last renewal. For a generation that
        stopped because Redis was unreachable and so could not hand the request back or end
        it. ``epoch``: the generation's token; a newer holding of this worker is kept."""
        self._drop(request_id, epoch)

    # -------------------------------------------------------------- cancellation

    def cancel(self, request_id: str) -> Operation[tuple[str, str | None]]:
        """Flag a request for cancellation (the CANCEL script; any replica may).

        Returns ("OK", owner) for a live request (its owner ends it within about a second),
        ("DONE", state) for one that already ended, ("GONE", None) for an unknown one.
        """
        rid, rk = self._rid(request_id)
        (reply,) = yield [Eval(CANCEL, astuple(rk), ())]
        reply = ok(reply, rid)
        status = text(reply[0])
        return status, (text(reply[1]) if len(reply) > 1 else None)

    def cancel_flags(self, request_ids: list[str]) -> Operation[list[str]]:
        """The ids among ``request_ids`` whose context carries the cancel flag (one pipeline of HGETs)."""
        if not request_ids:
            return []
        replies = yield [Cmd(("HGET", self.keys.request(rid).ctx, "cancel")) for rid in request_ids]
        return [rid for rid, reply in zip(request_ids, replies, strict=True) if ok(reply, rid) is not None]

    # ------------------------------------------------------------------- reading

    def get_context(self, request_id: str) -> Operation[StreamingContext | None]:
        rid, rk = self._rid(request_id)
        return self._read(rid, rk)

    def _read(self, rid: str, rk: RequestKeys) -> Operation[StreamingContext | None]:
        (reply,) = yield [Eval(READ, astuple(rk), ())]
        status, reply = _status(reply, rid)
        if status == "GONE":
            return None
        return decode_context(rid, reply[2], reply[3])

    def outcome(self, request_id: str) -> Operation[RequestOutcome | None]:
        rid, rk = self._rid(request_id)
        (reply,) = yield [Cmd(("HGETALL", rk.result))]
        return decode_outcome(rid, ok(reply, rid))

    def should_failover(self, request_id: str) -> Operation[bool]:
        ctx = yield from self.get_context(request_id)
        return ctx is not None and ctx.worth_recovering(self.config.min_tokens_for_recovery)

    def next_backend(self, failed_backend: ServingBackend) -> ServingBackend | None:
        """The original single step: the first backend in the fallback order that is not ``failed_backend``."""
        if not isinstance(failed_backend, ServingBackend):
            failed_backend = ServingBackend.parse(failed_backend)
        return next((b for b in self.config.fallback_order if b != failed_backend), None)

    def next_backend_for_context(self, ctx: StreamingContext) -> ServingBackend | None:
        failed = set(ctx.failed_backends)
        return next((b for b in self.config.fallback_order if b.value not in failed), None)

    def next_backend_for(self, request_id: str) -> Operation[ServingBackend | None]:
        """The first backend in the fallback order that has not failed for this request."""
        ctx = yield from self.get_context(request_id)
        return None if ctx is None else self.next_backend_for_context(ctx)

    def prepare_failover(self, request_id: str) -> Operation[FailoverRequest | None]:
        ctx = yield from self.get_context(request_id)
        if ctx is None:
            return None
        return FailoverRequest(
            request_id=ctx.request_id,
            prompt=ctx.continuation_prompt() if self.config.include_prefix else ctx.prompt,
            generated_prefix=ctx.generated_prefix,
            token_count=ctx.token_count,
            messages=ctx.messages,
            next_backend=self.next_backend_for_context(ctx),
        )

    # ------------------------------------------------------------------- history

    def record_attempt(self, attempt: FailoverAttempt, *, mark_failed: bool = True) -> Operation[None]:
        """Add ``attempt`` to the history; with ``mark_failed``, a failed attempt on a request
        this worker holds also marks its backend failed for that request."""
        if not isinstance(attempt, FailoverAttempt):
            raise ValidationError(f"attempt must be a FailoverAttempt, got {type(attempt).__name__}")
        # msgspec does not check field types on construction: normalise through the wire
        # format, so what could not be read back is refused before anything is written.
        try:
            checked = decode_history(encode_history(attempt))
        except RecursionError:  # a hostile nesting depth (e.g. in usage): no repr of it either
            raise ValidationError("attempt nests deeper than the history encoder allows") from None
        except (TypeError, ValueError, OverflowError, NotImplementedError):  # the encoder's hook raises the last
            checked = None
        if not isinstance(checked, FailoverAttempt):
            raise ValidationError(f"attempt has a field of the wrong type or value: {attempt!r:.200}")
        # a ServingBackend or one of the deployments registered here (the Coordinator's)
        attempt = msgspec.structs.replace(checked, backend=self._backend_name(str(checked.backend)))
        if attempt.request_id is not None:
            validation.request_id(attempt.request_id, self.limits)
        if attempt.worker_id is None:
            attempt = msgspec.structs.replace(attempt, worker_id=self.worker_id)
        return self._record(attempt, mark_failed)

    def _record(self, attempt: FailoverAttempt, mark_failed: bool) -> Operation[None]:
        (reply,) = yield [self._history_add(attempt)]
        ok(reply)
        rid = attempt.request_id
        failed = attempt.result is not None and attempt.result.is_failure()
        if mark_failed and failed and rid is not None and rid in self._held:
            yield from self._update(rid, self.keys.request(rid), "+failed", str(attempt.backend))

    def _history_add(self, entry: HistoryEntry) -> Cmd:
        return Cmd(("XADD", self.keys.history, "MAXLEN", defaults.HISTORY_MAXLEN, "*", "e", encode_history(entry)))

    def history(self, count: int = defaults.HISTORY_MAXLEN) -> Operation[list[HistoryEntry]]:
        count = validation.limit(count)
        return self._history(count)

    def _history(self, count: int) -> Operation[list[HistoryEntry]]:
        (reply,) = yield [Cmd(("XREVRANGE", self.keys.history, "+", "-", "COUNT", count))]
        entries = [_history_entry(fields) for _, fields in reversed(ok(reply))]
        return [e for e in entries if e is not None]

    def stats(self) -> Operation[FailoverStats]:
        history_cmd = Cmd(("XRANGE", self.keys.history, "-", "+", "COUNT", defaults.HISTORY_MAXLEN))
        replies = yield [history_cmd, Cmd(("ZCARD", self.keys.active))]
        entries = [_history_entry(fields) for _, fields in ok(replies[0])]
        attempts, successes, timeouts, takeovers = attempt_result_counts([e for e in entries if e is not None])
        return FailoverStats(
            total_attempts=attempts,
            successful=successes,
            timeouts=timeouts,
            active_contexts=int(ok(replies[1])),
            takeovers=takeovers,
        )

    # ---------------------------------------------------------------- ownership

    def heartbeat(self) -> Operation[int]:
        """Renew every lease this worker holds; returns how many were renewed."""
        held = [(rid, h.epoch) for rid, h in list(self._held.items())]
        if not held:
            return 0
        ttl = self._ms(self.lease_ttl)
        calls: list[Call] = [
            Eval(HEARTBEAT, astuple(self.keys.request(rid)), (self.worker_id, epoch, ttl)) for rid, epoch in held
        ]
        replies = yield calls
        renewed = []
        for (rid, epoch), reply in zip(held, replies, strict=True):
            try:
                status, _ = _status(reply, rid)
            except CorruptStateError:
                status = "CORRUPT"
            if status == "OK":
                renewed.append(rid)
            else:
                self._drop(rid, epoch)
        if renewed:
            (touched,) = yield [Eval(INDEX_TOUCH, (self.keys.active,), (ttl, "add", *renewed))]
            ok(touched)
        return len(renewed)

    def orphans(self, limit: int = 100) -> Operation[list[str]]:
        """Requests whose lease expired. Cost grows with expired leases, not active ones."""
        return self._orphans(validation.limit(limit))

    def _orphans(self, limit: int, corrupt: list[str] | None = None) -> Operation[list[str]]:
        (reply,) = yield [Eval(ORPHAN_CANDIDATES, (self.keys.active,), (limit,))]
        candidates = [rid for rid in (index_member(c, self.limits) for c in ok(reply)[1]) if rid is not None]
        if not candidates:
            return []
        # The index is a hint: confirm each candidate in its own hash.
        replies = yield [Eval(LEASE_STATUS, astuple(self.keys.request(c)), ()) for c in candidates]
        orphans: list[str] = []
        gone: list[str] = []
        rescore: list[int | str] = []
        for rid, status_reply in zip(candidates, replies, strict=True):
            try:
                status, r = _status(status_reply, rid)
            except CorruptStateError:
                if corrupt is not None:
                    corrupt.append(rid)
                continue  # a corrupt request is reported by its own calls, not here
            if status == "GONE":
                gone.append(rid)
            elif int(r[2]) > int(r[1]):
                rescore.extend((int(r[2]), rid))
            else:
                orphans.append(rid)
        fixes: list[Call] = []
        if gone:
            fixes.append(Cmd(("ZREM", self.keys.active, *gone)))
        if rescore:
            fixes.append(Cmd(("ZADD", self.keys.active, "XX", *rescore)))
        if fixes:
            for r in (yield fixes):
                ok(r)
        return orphans

    def claim(self, request_id: str) -> Operation[StreamingContext | None]:
        rid, rk = self._rid(request_id)
        return self._claim(rid, rk, uuid.uuid4().hex)

    def _claim(self, rid: str, rk: RequestKeys, nonce: str) -> Operation[StreamingContext | None]:
        ttl = self._ms(self.lease_ttl)
        (reply,) = yield [Eval(CLAIM, astuple(rk), (self.worker_id, ttl, nonce, self._ms(self.max_age)))]
        status, reply = _status(reply, rid)
        if status != "OK":
            if status == "GONE":
                yield [Cmd(("ZREM", self.keys.active, rid))]
            return None
        ctx = decode_context(rid, reply[3], reply[4])
        self._hold(rid, ctx.epoch, ctx.last_seq)
        takeover = Takeover(
            request_id=rid,
            old_owner=text(reply[1]) or None,
            new_owner=self.worker_id,
            epoch=ctx.epoch,
            at=int(reply[2]) / 1000,
            prefix_chars=len(ctx.generated_prefix),
        )
        (touched,) = yield [Eval(INDEX_TOUCH, (self.keys.active,), (ttl, "add", rid))]
        ok(touched)
        try:
            (recorded,) = yield [self._history_add(takeover)]
            ok(recorded)
        except Exception as exc:  # history is observability: the won request must still run
            log.warning("takeover of %s not recorded in history: %s", rid, exc)
        return ctx

    def claim_orphans(self, limit: int = 100) -> Operation[list[StreamingContext]]:
        return self._claim_orphans(validation.limit(limit))

    def _claim_orphans(self, limit: int) -> Operation[list[StreamingContext]]:
        won = []
        corrupt: list[str] = []
        for rid in (yield from self._orphans(limit, corrupt)):
            try:
                ctx = yield from self._claim(rid, self.keys.request(rid), uuid.uuid4().hex)
            except CorruptStateError:
                corrupt.append(rid)  # the others are still claimed
                continue
            if ctx is not None:
                won.append(ctx)
        for rid in corrupt:  # nobody can run it: end it, typed, so it is neither stuck nor followed for ever
            reason = "the request cannot be run: its stored context is corrupt"
            if (yield from self._reject(rid, self.keys.request(rid), reason, "CorruptStateError")):
                log.warning("request %s had a corrupt stored context: ended as failed", rid)
        return won

    def active_requests(self, limit: int = 1000) -> Operation[list[tuple[str, float]]]:
        """(request id, indexed lease deadline) of active requests, for ``top``."""
        limit = validation.limit(limit)
        (reply,) = yield [Cmd(("ZRANGE", self.keys.active, 0, limit - 1, "WITHSCORES"))]
        flat = ok(reply)
        if flat and isinstance(flat[0], list | tuple):  # RESP3 pairs
            scored = [(r, s) for r, s in flat]
        else:
            scored = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        members = [(index_member(r, self.limits), float(s) / 1000) for r, s in scored]
        return [(rid, deadline) for rid, deadline in members if rid is not None]

    # ------------------------------------------------------------------ delivery

    def follow_read(
        self, request_id: str, from_byte: int
    ) -> Operation[tuple[str, bytes, RequestOutcome | None] | None]:
        """(feed id to block on, committed bytes from ``from_byte``, outcome if finished)."""
        rid, rk = self._rid(request_id)
        (reply,) = yield [Eval(FOLLOW_READ, astuple(rk), (from_byte, self._ms(defaults.FEED_TTL)))]
        status, reply = _status(reply, rid)
        if status == "GONE":
            return None
        chunk = reply[2] if isinstance(reply[2], bytes) else text(reply[2]).encode()
        return text(reply[1]), chunk, decode_outcome(rid, reply[3])


_OK = (b"OK", "OK")  # a status as bytes, or as str from a client that decodes replies


class _Append(Single[AppendAck | None]):
    """One fenced APPEND (``append_tokens``, ``append_many``).

    At start: the generation check (``epoch`` given), the ``seq`` (given, or the holding's
    next) and the call; at finish: the holding's next ``seq`` moves past the acknowledged
    one, and a refusal becomes LeaseLostError (None for a request nobody holds or knows).

    An automatic-seq append whose outcome is unknown (a fault past the deadline thrown in,
    or the operation abandoned) is recorded in ``Holding.unknown``; the request's next
    automatic-seq append first re-sends it alone under its own seq (applied once either
    way, ``DUP`` if it had been), so later text never reuses that seq and is never taken
    for its duplicate. Such an append is two calls: it is driven step by step
    (``fast_call`` returns None), every other append is one.
    """

    __slots__ = ("chunks", "core", "epoch", "held", "joined", "number", "numbered", "rid", "seq", "tokens")
    _SETTLING = 3

    def __init__(self, core: FailoverCore, rid: str, chunks: list[str], seq: int | None, epoch: int | None) -> None:
        self._state = Single._NEW  # (Single.__init__, inlined: one of these per append)
        self.core = core
        self.rid = rid
        self.chunks = chunks
        self.seq = seq
        self.epoch = epoch

    def _unknown(self) -> tuple[int, int, str, int] | None:
        """The holding's unknown append this one must settle first, if it numbers automatically."""
        if self.seq is not None:
            return None
        held = self.core._held.get(self.rid)
        return held.unknown if held is not None else None

    def fast_call(self) -> Call | None:
        if self._unknown() is not None:
            return None
        return super().fast_call()

    def send(self, value: list[Any] | None) -> list[Call]:
        if self._state == Single._NEW and value is None and self._unknown() is not None:
            return self._settle()
        if self._state == _Append._SETTLING:
            assert value is not None
            self._settled(value[0])
            self._state = Single._SENT
            return [self.start()]
        return super().send(value)

    def _settle(self) -> list[Call]:
        core, rid = self.core, self.rid
        if self.epoch is not None:
            core._check_generation(rid, self.epoch)
        held = core._held[rid]
        assert held.unknown is not None
        epoch, number, joined, tokens = held.unknown
        if (epoch, number) != (held.epoch, held.next_seq):
            held.unknown = None  # the request moved on (a new epoch, another seq): moot
            self._state = Single._SENT
            return [self.start()]
        self._state = _Append._SETTLING
        return [Eval(APPEND, core._append_keys(rid), (core.worker_id, epoch, number, joined, tokens))]

    def _settled(self, reply: Any) -> None:
        held = self.core._held[self.rid]
        assert held.unknown is not None
        number = held.unknown[1]
        held.unknown = None  # answered: applied now or before, or refused for good (the next call says so)
        status, reply = _status(reply, self.rid)
        if status in ("OK", "DUP"):
            held.next_seq = max(held.next_seq, number + 1, int(reply[1]) + 1)

    def start(self) -> Call:
        core, rid, chunks = self.core, self.rid, self.chunks
        self.held = held = core._held.get(rid)
        self.numbered = held if self.seq is None else None  # automatic seqs: this worker numbers the appends
        number = self.seq
        if number is None:
            number = held.next_seq if held else 1
        self.number = number
        if len(chunks) == 1:
            self.joined, self.tokens = chunks[0], count_tokens(chunks[0])
        else:
            self.joined, self.tokens = "".join(chunks), sum(count_tokens(c) for c in chunks)
        # checks the generation (``epoch`` given) before anything is sent
        self.epoch = epoch = core._fence_epoch(rid, self.epoch)
        return Eval(APPEND, core._append_keys(rid), (core.worker_id, epoch, number, self.joined, self.tokens))

    def failed(self, exc: BaseException) -> None:
        if self.numbered is not None:
            assert self.epoch is not None
            self.numbered.unknown = (self.epoch, self.number, self.joined, self.tokens)

    def finish(self, reply: Any) -> AppendAck | None:
        rid, held, number = self.rid, self.held, self.number
        if type(reply) is list and len(reply) == 4 and reply[0] in _OK:  # applied: the common reply, read directly
            if held is not None:
                held.next_seq = max(held.next_seq, number + 1, int(reply[1]) + 1)
            return AppendAck(applied=True, seq=number, length=int(reply[2]), token_count=int(reply[3]))
        status, reply = _status(reply, rid)
        if status == "OK" or status == "DUP":
            if held is not None:
                held.next_seq = max(held.next_seq, number + 1, int(reply[1]) + 1)
            return AppendAck(applied=status == "OK", seq=number, length=int(reply[2]), token_count=int(reply[3]))
        if status == "GONE" and held is None:
            return None  # the original: appending to an unknown request is a no-op
        assert self.epoch is not None
        raise self.core._lost(rid, self.epoch, reply)


def _ending_fields(finish_reason: str | None, usage: dict[str, int] | None, limits: Any) -> tuple[str, ...]:
    """The outcome's finish_reason and usage (JSON) as FINISH's extra field/value pairs."""
    out: tuple[str, ...] = ()
    if finish_reason:
        out += ("finish_reason", validation.label("finish_reason", finish_reason, limits))
    counts = validation.usage(usage)
    if counts:
        out += ("usage", json_encoder.encode(counts).decode())
    return out


def astuple(rk: RequestKeys) -> tuple[str, str, str, str]:
    """A request's keys in the order every per-request script takes them."""
    return (rk.ctx, rk.result, rk.text, rk.feed)


def _encode_params(params: dict[str, Any] | None, limits: validation.Limits) -> bytes:
    """Request parameters as JSON; ValidationError when not JSON or over ``max_chunk_bytes``."""
    try:
        data = encode_params(params)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ValidationError(f"params must hold only JSON values: {exc}") from None
    if len(data) > limits.max_chunk_bytes:
        raise ValidationError(f"params are {len(data)} bytes as JSON; the limit is {limits.max_chunk_bytes}")
    # What JSON cannot hold, msgspec changes quietly (NaN -> null, a set -> a list, 1 -> "1" as
    # a key): a backend would get another value than the caller gave. Refuse what does not
    # come back equal.
    if data and msgspec.json.decode(data) != params:
        raise ValidationError(
            f"params must hold only JSON values (str keys; finite numbers, str, bool, None, lists, dicts): "
            f"{redact_secrets(repr(params))[:200]} does not survive JSON unchanged"
        )
    return data


def render_messages(messages: list[ChatMessage]) -> str:
    """The plain-text form of chat messages kept in ``StreamingContext.prompt``."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages)


#: Requests whose APPEND keys a core keeps built (``_append_keys``); past it, it starts again.
_KEYS_CACHED = 4096

#: Appends folded into one APPEND_MANY call at most (bounds the time Redis spends in one script).
MAX_MERGED_APPENDS = 256


def merge_appends(batch: list[Call]) -> tuple[list[Call], Callable[[list[Any]], list[Any]]]:
    """Fold a batch's APPEND calls into APPEND_MANY calls, and a function that maps the
    replies back to the original calls. For one Redis only: the merged keys span slots."""
    appends = [i for i, call in enumerate(batch) if isinstance(call, Eval) and call.script is APPEND]
    if len(appends) < 2:
        return batch, lambda replies: replies
    merged_indexes = set(appends)
    others = [i for i in range(len(batch)) if i not in merged_indexes]
    groups = [appends[g : g + MAX_MERGED_APPENDS] for g in range(0, len(appends), MAX_MERGED_APPENDS)]
    merged: list[Call] = []
    for group in groups:
        calls: list[Eval] = [batch[i] for i in group]  # type: ignore[misc]  # APPEND calls only
        keys = tuple(chain.from_iterable([call.keys for call in calls]))
        args = tuple(chain.from_iterable([call.args for call in calls]))
        merged.append(Eval(APPEND_MANY, keys, (len(calls), *args)))

    def unmerge(replies: list[Any]) -> list[Any]:
        out: list[Any] = [None] * len(batch)
        for group, reply in zip(groups, replies, strict=False):
            for position, i in enumerate(group):
                out[i] = reply if isinstance(reply, BaseException) else reply[position]
        for i, reply in zip(others, replies[len(groups) :], strict=True):
            out[i] = reply
        return out

    return merged + [batch[i] for i in others], unmerge
