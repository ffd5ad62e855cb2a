"""The Coordinator: stream from real backends, fail over mid-stream, finish taken-over requests.

``stream()`` tracks a request, commits every chunk to Redis (fenced, seq-numbered,
batched) before handing it to the caller, and when a backend fails continues on the
next backend that has not failed for this request, from the committed prefix.
Backends are deployments, keyed by their unique name (breaker, failed set, capability
memory, in-flight counts, history). A request for a model group (``model=``) runs
through that group's tiers, picked by weight and fleet-wide in-flight calls, then its
fallbacks (``context_window_fallbacks`` after a context-too-long failure), under its
privacy tier (groups.py); otherwise ``primary`` then ``fallback_order``. When a
worker dies, another replica's reaper claims the request and ``resume()`` finishes it;
any client can ``follow()`` the answer from any replica.

Policy for a failing call (each case is in the README):
- 5xx: retry the same backend ``same_backend_retries`` times, then fail over;
- 429: wait ``Retry-After`` (or exponential backoff with jitter) up to
  ``rate_limit_retries`` times, then fail over;
- connection refused/reset, a cut stream, a stall, a slow first token, a malformed
  chunk: fail over at once (and count it against the backend's shared breaker);
- 400 context too long or other 4xx: do not retry that backend; move on;
- 400 content policy: do not retry anywhere: ``ContentPolicyError``;
- a prefill rejection: that backend cannot continue this request (remembered for every
  worker for a while, capabilities.py); move on, and report the failure that caused the
  failover, not the rejection;
- a pool timeout or a missing api key variable: a local fault, never counted on the breaker;
- once every other backend is used up, a backend that failed transiently is tried again
  after a backoff, within ``max_retries`` and ``failover_timeout``.
Whatever else goes wrong while generating (a Redis error past its deadline, a bug), the
request ends failed with the error in its outcome; if even that cannot be written, this
worker stops renewing its lease so another replica takes it over.
The caller gets the whole answer or a typed error, never a truncated answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flo_coord import defaults, logs
from flo_coord.constraints import FrozenChecked, NonNegativeInt, PositiveInt, PositiveSeconds, check_value, convert
from flo_coord.errors import (
    ConfigError,
    ContentPolicyError,
    CoordinatorUnavailableError,
    FloCoordError,
    GenerationError,
    LeaseLostError,
    PrivacyTierError,
    RequestCancelledError,
    UnknownRequestError,
    ValidationError,
)
from flo_coord.execution import capabilities
from flo_coord.execution.backends import (
    Backend,
    BackendError,
    BackendSpec,
    BadRequestError,
    ContentPolicyRejection,
    ContextLengthError,
    GenerationRequest,
    PrefillRejectedError,
    Progress,
    RateLimitedError,
    ServerError,
    StreamCutError,
    StreamEnd,
    TextChunk,
    ToolCallsOnlyError,
    make_backend,
)
from flo_coord.execution.breaker import BreakerConfig, CircuitBreaker
from flo_coord.execution.capabilities import CapabilityMemory
from flo_coord.execution.delivery import follow
from flo_coord.execution.groups import ModelGroup, Router, Tier, check_unique, fallback_names
from flo_coord.models import (
    ChatMessage,
    FailoverAttempt,
    FailoverConfig,
    FailoverResult,
    RequestOutcome,
    ServingBackend,
    StreamingContext,
    is_deployment_name,
)
from flo_coord.ownership import AsyncReaper, CancelWatcher
from flo_coord.redact import register_backend_secrets
from flo_coord.store import AsyncFailoverManager, RedisHealth, validation

log = logging.getLogger("flo_coord.executor")


class ExecutorConfig(FrozenChecked, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How the Coordinator treats a failing backend call (``[executor]``; README "Failover policy").

    Seconds are 0.001 to ten years, retry counts integers >= 0 (defaults in flo_coord.defaults),
    ``backoff_initial`` at most ``backoff_max``; another value (or an unknown field) raises
    ConfigError naming the field.
    """

    first_token_timeout: PositiveSeconds = defaults.FIRST_TOKEN_TIMEOUT  #: time to first token before failing over
    stall_timeout: PositiveSeconds = defaults.STALL_TIMEOUT  #: longest silence between two chunks
    same_backend_retries: NonNegativeInt = defaults.SAME_BACKEND_RETRIES  #: retries of the same backend after a 5xx
    rate_limit_retries: NonNegativeInt = defaults.RATE_LIMIT_RETRIES  #: waits on the same backend after a 429
    rate_limit_max_wait: PositiveSeconds = defaults.RATE_LIMIT_MAX_WAIT  #: a longer Retry-After fails over at once
    backoff_initial: PositiveSeconds = defaults.BACKOFF_INITIAL  #: first backoff after a 429 without Retry-After
    backoff_max: PositiveSeconds = defaults.BACKOFF_MAX  #: the longest backoff (>= backoff_initial)

    def _finish(self) -> None:
        if self.backoff_initial > self.backoff_max:  # the backoff could never grow to its first step
            raise ConfigError(
                f"ExecutorConfig.backoff_initial {self.backoff_initial:g} is more than backoff_max "
                f"{self.backoff_max:g}; backoff_initial must be at most backoff_max"
            )


class StallTimeoutError(BackendError):
    """No chunk within the stall (or first-token) timeout while the connection stayed open."""

    transient = True
    #: True when the request's failover budget ran out first: not the backend's fault
    budget_exhausted = False


@dataclass
class _Run:
    """One request's progress through its backends on this worker."""

    ctx: StreamingContext
    prefix: str
    failed: set[str]
    attempts: list[FailoverAttempt] = field(default_factory=list)
    failovers: int = 0
    recovery_deadline: float | None = None  # monotonic; set by a failure, cleared by the next commit
    cause: BaseException | None = None  # the failure that made us fail over (reported on give-up)
    finish: StreamEnd | None = None
    finished_by: str | None = None
    cannot_continue: set[str] = field(default_factory=set)  # rejected a prefill for this request
    context_exceeded: bool = False  # a deployment said the prompt is too long: context_window_fallbacks now
    excluded: list[str] = field(default_factory=list)  # deployments the group's privacy tier kept out
    retry_at: dict[str, float] = field(default_factory=dict)  # failed transiently: monotonic time to retry
    spent_tokens: int = 0  # completion tokens of the answer so far (usage, else estimate_tokens)
    usage: dict[str, int] = field(default_factory=dict)  # summed over this run's attempts
    outcome: RequestOutcome | None = None

    @property
    def request_id(self) -> str:
        return self.ctx.request_id


PromptOrMessages = str | list[ChatMessage] | list[dict[str, str]]


def estimate_tokens(text: str, deltas: int = 0) -> int:
    """Tokens of ``text`` when no backend reported usage for it: a conservative estimate.

    The larger of the streamed text deltas (a delta carries at least one token) and one
    token per 4 UTF-8 bytes, rounded up. It errs towards more tokens, so a
    continuation's ``max_tokens`` never lets the answer run past the caller's limit;
    whitespace-separated words would undercount code and Chinese or Japanese text.
    """
    return max(deltas, math.ceil(len(text.encode("utf-8")) / 4))


class _Ending:
    """How an answer ended, shared by an AnswerStream and the generator that fills it in.

    The generator holds this, never the AnswerStream: a stream -> generator -> stream cycle
    would leave a caller's abandoned stream to the cyclic GC, which finalises the nested
    generators in any order at once, and the request would never be ended.
    """

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: RequestOutcome | None = None


class AnswerStream(AsyncIterator[str]):
    """The committed chunks of one answer (``Coordinator.stream`` and ``follow``).

    Once the iteration has ended (or raised), ``outcome`` holds the request's RequestOutcome
    (``finish_reason``, ``usage`` summed over attempts, ...) with no extra Redis round trip;
    ``finish_reason`` and ``usage`` are shortcuts to it. ``aclose()`` ends it early.
    """

    def __init__(self) -> None:
        self._ending = _Ending()
        self._chunks: AsyncGenerator[str, None] | None = None

    @property
    def outcome(self) -> RequestOutcome | None:
        return self._ending.outcome

    def __aiter__(self) -> AnswerStream:
        return self

    async def __anext__(self) -> str:
        assert self._chunks is not None
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        if self._chunks is not None:
            await self._chunks.aclose()

    @property
    def finish_reason(self) -> str | None:
        return self.outcome.finish_reason if self.outcome is not None else None

    @property
    def usage(self) -> dict[str, int] | None:
        return self.outcome.usage if self.outcome is not None else None


class Coordinator:
    """Streams requests through backends with failover, takeover and resumable delivery."""

    def __init__(
        self,
        backends: Mapping[ServingBackend | str, Backend | BackendSpec] | Iterable[BackendSpec],
        *,
        redis: Any = None,
        url: str | None = None,
        config: FailoverConfig | None = None,
        worker_id: str | None = None,
        namespace: str = defaults.NAMESPACE,
        lease_ttl: float = defaults.LEASE_TTL,
        executor: ExecutorConfig | None = None,
        breaker: BreakerConfig | None = None,
        manager: AsyncFailoverManager | None = None,
        concurrency: int | None = None,
        capability_ttl: float | None = None,
        models: Iterable[ModelGroup] | None = None,
        **manager_options: Any,
    ) -> None:
        """``backends``: the deployments, as BackendSpecs (each keyed by its unique ``name``) or
        a mapping of deployment name (or ServingBackend) to a Backend or BackendSpec.
        ``concurrency``: requests this Coordinator runs at once (a Worker's ``concurrency``);
        it sizes each backend's HTTP connection pool unless its spec sets ``max_connections``.
        ``capability_ttl``: seconds a runtime prefill rejection is remembered for all workers.
        ``models``: the model groups ``stream(..., model=...)`` routes through (groups.py);
        none: one implicit group per deployment ``model`` (groups.default_groups).
        ``executor``, ``breaker``: an ExecutorConfig / BreakerConfig or a dict of its fields.
        ``manager_options``: further AsyncFailoverManager arguments (``max_age``, ``retention``,
        ``limits``, ``retry``, ``durability``, ``observer``); ignored with ``manager=``.
        A request without a model group runs on ``primary`` then ``config.fallback_order``;
        when that order reaches none of the deployments (e.g. the default order and one Vllm
        deployment), on the deployments in the order given instead (groups.fallback_names).
        Raises ConfigError, before anything is started or stored, for duplicate deployment
        names, an invalid model group, and any argument of the wrong type or range (an
        unknown keyword argument included).
        """
        unknown = sorted(set(manager_options) - _MANAGER_OPTIONS)
        if unknown:
            passed_on = ", ".join(sorted(_MANAGER_OPTIONS - {*_OWN_OPTIONS}))
            raise ConfigError(
                f"Coordinator got unknown keyword argument(s) {', '.join(unknown)}; its own are "
                f"{', '.join(_OWN_OPTIONS)}, and the AsyncFailoverManager's {passed_on}"
            )
        if manager is not None and not isinstance(manager, AsyncFailoverManager):
            raise ConfigError(f"manager must be an AsyncFailoverManager, got {type(manager).__name__}")
        if concurrency is not None:
            concurrency = check_value("concurrency", concurrency, PositiveInt, ConfigError)
        if capability_ttl is not None:
            capability_ttl = check_value("capability_ttl", capability_ttl, PositiveSeconds, ConfigError)
        executor = convert(executor, ExecutorConfig, label="executor") if executor is not None else ExecutorConfig()
        breaker = convert(breaker, BreakerConfig, label="breaker") if breaker is not None else None
        groups = _model_groups(models)
        self.backends = _backend_map(backends, concurrency)
        self.manager = manager or AsyncFailoverManager(
            config,
            redis=redis,
            url=url,
            namespace=namespace,
            worker_id=worker_id,
            lease_ttl=lease_ttl,
            **manager_options,
        )
        specs = [b.spec for b in self.backends.values()]
        configured = self.manager.config().fallback_order
        #: what a request without a model group fails over through after its primary (names)
        self.fallback_order, replaced = fallback_names(specs, configured)
        if replaced:
            say = log.warning if config is not None or manager is not None else log.info  # chosen by the caller
            say(
                "failover.fallback_order (%s) reaches none of the deployments; requests without a model "
                "group try them in the order given: %s",
                ", ".join(b.value for b in configured),
                ", ".join(self.fallback_order),
            )
        self.router = Router.configured(groups, specs, self.fallback_order)
        self.manager.register_deployments(self.backends)
        # a call stays counted for three leases without renewal (store/inflight.py): a dead
        # worker's calls drop out
        self.inflight = self.manager.inflight
        self._inflight: dict[str, str] = {}  # member -> deployment of this worker's calls in flight
        self._renewer: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self.executor: ExecutorConfig = executor
        self.breaker = CircuitBreaker(self.manager.breakers, self.manager.worker_id, breaker)
        self.capabilities = CapabilityMemory(self.manager.capabilities, capability_ttl or capabilities.DEFAULT_TTL)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._generations: dict[str, tuple[int, asyncio.Task[Any]]] = {}  # request -> (epoch, task)
        self._heartbeat: Any = None
        self._reaper: AsyncReaper | None = None
        #: request -> (epoch, task consuming its generation here), for cancel_local
        self._running: dict[str, tuple[int, asyncio.Task[Any]]] = {}
        self._cancelling: set[asyncio.Task[Any]] = set()  # tasks cancel_local cancelled
        self.cancel_watcher = CancelWatcher(self.manager, self.cancel_local)
        self._closing = False

    @property
    def worker_id(self) -> str:
        return self.manager.worker_id

    @property
    def redis_available(self) -> bool:
        """False while Redis does not answer (the last operation raised
        CoordinatorUnavailableError); for a readiness probe (``/readyz``) and metrics."""
        return self.manager.health.available

    @property
    def health(self) -> RedisHealth:
        """The ``retry.RedisHealth`` of this Coordinator's Redis client: ``available``,
        ``down_for()`` (seconds), ``last_success`` (monotonic seconds), ``outages``."""
        return self.manager.health

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, reap: bool = True, reap_interval: float | None = None) -> Coordinator:
        """Start heartbeats, the cancel watcher (a request cancelled from anywhere stops
        generating here within ``defaults.CANCEL_POLL`` seconds) and, with ``reap``, the
        reaper that resumes orphaned requests every ``reap_interval`` seconds (0.001 to ten
        years; default ``ownership.reaper_interval``). ConfigError (nothing started) for a
        bad ``reap_interval``."""
        reaper = None
        if reap and self._reaper is None:  # built first: a bad reap_interval (ConfigError) starts nothing
            reaper = AsyncReaper(self.manager, self.resume_in_background, reap_interval)
        if self._heartbeat is None:
            self._heartbeat = self.manager.start_heartbeat()
        if self.cancel_watcher._task is None:
            self.cancel_watcher.start()
        if reaper is not None:
            reaper.start()
            self._reaper = reaper
        return self

    async def aclose(self, *, hand_back: bool = True, timeout: float = defaults.HAND_BACK_TIMEOUT) -> list[str]:
        """Stop; with ``hand_back``, release every request still held so others take it at once.

        Running generations are cancelled; the hand-back of all held requests runs at once,
        and the whole close is bounded by ``timeout`` seconds (also when Redis is gone or
        frozen). Returns (and logs) the request ids it could not hand back: their leases
        expire within ``lease_ttl`` and another replica takes them over then.
        """
        self._closing = True
        ends = time.monotonic() + timeout

        def left() -> float:  # one budget for every step, so the whole close is bounded
            return max(0.05, ends - time.monotonic())

        if self._reaper is not None:
            await _bounded(self._reaper.stop(), left())
        await _bounded(self.cancel_watcher.stop(), left())
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await _bounded(asyncio.gather(*self._tasks, return_exceptions=True), left())
        failed = await self._hand_back(self.manager.held(), left()) if hand_back else []
        if self._heartbeat is not None:
            await _bounded(self._heartbeat.stop(), left())
        if self._releases:
            await _bounded(asyncio.gather(*self._releases, return_exceptions=True), left())
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        for backend in self.backends.values():
            await _bounded(backend.aclose(), left())
        await _bounded(self.manager.aclose(), left())
        return failed

    async def _hand_back(self, request_ids: list[str], timeout: float) -> list[str]:
        """Release ``request_ids`` concurrently within ``timeout``; the ids not released."""
        if not request_ids:
            return []
        tasks = {rid: asyncio.ensure_future(self.manager.release(rid)) for rid in request_ids}
        await asyncio.wait(tasks.values(), timeout=timeout)
        failed = []
        for rid, task in tasks.items():
            if not task.done():
                task.cancel()
                failed.append(rid)
            elif task.exception() is not None and not isinstance(task.exception(), LeaseLostError):
                failed.append(rid)
        if failed:
            log.warning(
                "could not hand back %d requests (their leases expire in %.1fs, then another replica takes them): %s",
                len(failed),
                self.manager.lease_ttl,
                ", ".join(failed),
            )
        return failed

    async def __aenter__(self) -> Coordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------------- public

    def stream(
        self,
        request_id: str,
        prompt_or_messages: PromptOrMessages,
        *,
        primary: ServingBackend | str | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> AnswerStream:
        """Track, generate and yield the answer's chunks, each once it is committed.

        ``model``: a model group name (``[[models]]``): the request runs through that
        group's deployments and fallbacks under its privacy tier; the name is stored with
        the request (by the write that starts it), so a replica that takes it over routes it
        the same way. Without ``[[models]]``, each deployment ``model`` names an implicit
        group (groups.default_groups). Without ``model``, ``primary`` (a deployment or
        ServingBackend name) then ``fallback_order``.
        Returns an AnswerStream: iterate it; afterwards its ``outcome``, ``finish_reason``
        and ``usage`` tell how the answer ended. Raises (before anything is stored)
        UnknownModelError for a model no group serves, ValidationError for chat messages
        whose role is not one of ``store.CHAT_ROLES`` (as the gateway and the CLI do), else the request's typed error
        (GenerationError, ContentPolicyError, PrivacyTierError, ...) where it ends.
        ``params``: sampling parameters (JSON values) stored with the request and added to
        every backend call's payload, also by a replica that takes the request over.
        """
        if model is not None:
            self.router.group(model)
        prompt, messages = _split(prompt_or_messages)
        if messages is not None:  # the gateway's and the CLI's rule, here too (nothing stored yet)
            messages = validation.chat_messages(messages, self.manager.limits)
        answer = AnswerStream()
        answer._chunks = self._stream(answer._ending, request_id, prompt, messages, primary, max_tokens, model, params)
        return answer

    async def _stream(
        self,
        ending: _Ending,
        request_id: str,
        prompt: str | None,
        messages: list[ChatMessage] | None,
        primary: ServingBackend | str | None,
        max_tokens: int | None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> AsyncGenerator[str, None]:
        if primary is None:  # the first deployment it will try (the store's default is fallback_order's first)
            primary = self.router.group(model).entries[0].name if model is not None else self.fallback_order[0]
        ctx = await self.manager.start_tracking(
            request_id, prompt, primary, messages=messages, max_tokens=max_tokens, params=params, model_group=model
        )
        delivered = 0
        try:
            # aclosing: a caller that stops early must end the request (and close the backend's
            # stream) before its aclose() returns, not whenever the generators are collected
            async with contextlib.aclosing(self._generate(ctx, ending)) as chunks:
                async for chunk in chunks:
                    delivered += len(chunk)
                    yield chunk
        except asyncio.CancelledError:
            if self._cancelled_here():
                raise RequestCancelledError(request_id, f"request {request_id!r} failed: {_CANCELLED}") from None
            raise
        except LeaseLostError:
            # We stalled past our lease and another replica took over: deliver its commits.
            log.warning("lost %s to another worker; following its commits", request_id)
            async with contextlib.aclosing(self.follow(request_id, offset=delivered)) as rest:
                async for chunk in rest:
                    yield chunk
                ending.outcome = rest.outcome

    async def run(
        self,
        request_id: str,
        prompt_or_messages: PromptOrMessages,
        *,
        primary: ServingBackend | str | None = None,
        max_tokens: int | None = None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> RequestOutcome | None:
        """Generate to the end without a consumer (clients ``follow``); returns the outcome."""
        stream = self.stream(
            request_id, prompt_or_messages, primary=primary, max_tokens=max_tokens, model=model, params=params
        )
        async with contextlib.aclosing(stream) as chunks:
            async for _ in chunks:
                pass
        return await self.manager.outcome(request_id)

    async def assign_model(self, ctx: StreamingContext, model: str) -> None:
        """Route the tracked request ``ctx`` (held by this worker) through model group ``model``.

        Stored with the request (one fenced write), so a replica that takes it over uses
        the same group. Raises UnknownModelError when no group is called ``model``.
        """
        self.router.group(model)
        await self.manager.set_model_group(ctx.request_id, model, epoch=ctx.epoch)
        ctx.model_group = model

    async def resume(self, ctx: StreamingContext) -> None:
        """Finish a request this worker claimed, from its committed prefix."""
        try:
            async with contextlib.aclosing(self._generate(ctx)) as chunks:
                async for _ in chunks:
                    pass
        except LeaseLostError:
            log.warning("lost %s again while resuming it", ctx.request_id)

    def follow(self, request_id: str, offset: int = 0, *, wait: float = 0.0) -> AnswerStream:
        """The committed answer from character ``offset`` on, live, from any replica.

        ``wait``: seconds to wait for a just-submitted request to be taken by a worker.
        Returns an AnswerStream whose ``outcome`` (``finish_reason``, ``usage``) is set when
        the answer ends, from the same read that saw the end (no extra round trip).
        """
        answer = AnswerStream()
        ending = answer._ending

        def seen(outcome: RequestOutcome) -> None:
            ending.outcome = outcome

        answer._chunks = follow(self.manager, request_id, offset, wait=wait, on_outcome=seen)
        return answer

    async def outcome(self, request_id: str) -> RequestOutcome | None:
        return await self.manager.outcome(request_id)

    async def cancel(self, request_id: str) -> tuple[str, str | None, bool]:
        """Cancel a request wherever it runs (any replica may call this; one CANCEL script).

        The request's context is flagged; its owner (this Coordinator or any other worker
        or gateway replica) stops generating within about ``defaults.CANCEL_POLL`` seconds,
        closing the backend stream, and ends it Failed with ``error_kind`` "Cancelled" and
        the reason "cancelled by the caller" (a write fenced by the generation's epoch). A
        flagged request whose owner died is ended the same way by the replica that takes it
        over. Followers then get RequestCancelledError; ``stream()`` on the owner raises it.
        Returns ``("OK", owner, cancelled_here)`` for a live request (``cancelled_here``: its
        generation ran here and was stopped at once), ``("DONE", state, False)`` for a request
        that already ended (nothing changes). Raises UnknownRequestError for an unknown
        request, ValidationError for a malformed id, CoordinatorUnavailableError when Redis
        does not answer. Comes from the gateway's ``DELETE /v1/requests/{id}``.
        """
        status, detail = await self.manager.cancel(request_id)
        if status == "GONE":
            raise UnknownRequestError(request_id)
        return status, detail, status == "OK" and self.cancel_local(request_id)

    def cancel_local(self, request_id: str) -> bool:
        """Stop this Coordinator's generation of ``request_id``, if one runs here (no I/O).

        The task consuming the generation is cancelled: the backend stream is closed and the
        request ended failed ("Cancelled", fenced by its epoch); a ``stream()`` caller gets
        RequestCancelledError instead of the CancelledError. Returns False when no generation
        of it runs here. Called by the cancel watcher when it sees the request's cancel flag.
        """
        running = self._running.get(request_id)
        if running is None or running[1].done():
            return False
        self._cancelling.add(running[1])
        running[1].add_done_callback(self._cancelling.discard)
        running[1].cancel()
        return True

    # ------------------------------------------------------------------ internals

    def resume_in_background(self, ctx: StreamingContext) -> asyncio.Task[None]:
        """Finish ``ctx`` in a task this Coordinator tracks (``aclose`` hands it back).

        One generation per request: an older generation of the same request still running
        here (this worker re-claimed the request after its lease expired, e.g. in a Redis
        outage) is cancelled first; its writes were already fenced out by their epoch.
        """
        rid = ctx.request_id
        older = self._generations.get(rid)
        if older is not None and older[0] < ctx.epoch and not older[1].done():
            log.info("request %s: stopping the generation of epoch %d for epoch %d", rid, older[0], ctx.epoch)
            older[1].cancel()
        task = asyncio.get_running_loop().create_task(self._resume_logged(ctx), name=f"resume-{rid}")
        self._tasks.add(task)
        self._generations[rid] = (ctx.epoch, task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: self._generation_done(rid, t))
        return task

    def _generation_done(self, rid: str, task: asyncio.Task[Any]) -> None:
        current = self._generations.get(rid)
        if current is not None and current[1] is task:
            del self._generations[rid]

    def _stopped_by_outage(self, ctx: StreamingContext) -> None:
        """A generation whose commits could not be made stopped (its backend stream is
        closed): stop renewing its lease, so that after the outage the request is taken
        over (by any replica, this one included) from its committed prefix."""
        self.manager.forget(ctx.request_id, ctx.epoch)
        log.warning("request %s stopped: Redis unreachable; it is taken over after the outage", ctx.request_id)

    async def _resume_logged(self, ctx: StreamingContext) -> None:
        # every line logged while running this request (in its own task) names it
        with logs.bound(worker_id=self.worker_id, request_id=ctx.request_id, epoch=ctx.epoch):
            if ctx.takeovers or ctx.generated_prefix:  # taken over (or continued): say from where
                log.info("resuming %s at epoch %d from %d chars", ctx.request_id, ctx.epoch, len(ctx.generated_prefix))
            else:
                log.info("starting %s at epoch %d", ctx.request_id, ctx.epoch)
            try:
                await self.resume(ctx)
            except asyncio.CancelledError:
                raise
            except CoordinatorUnavailableError as exc:  # already logged by _stopped_by_outage
                log.debug("resumed request %s stopped: %s", ctx.request_id, exc)
            except Exception as exc:
                log.warning("resumed request %s ended with %s", ctx.request_id, exc)

    async def _generate(self, ctx: StreamingContext, ending: _Ending | None = None) -> AsyncGenerator[str, None]:
        run = _Run(ctx=ctx, prefix=ctx.generated_prefix, failed=set(ctx.failed_backends), usage=dict(ctx.usage or {}))
        run.spent_tokens = estimate_tokens(ctx.generated_prefix)  # committed before this worker: conservative
        running = self._track_running(ctx)
        try:
            try:
                if ctx.cancelled:  # flagged before this worker claimed it: end it, do not generate
                    await self._end_cancelled(run)
                    raise RequestCancelledError(run.request_id, f"request {run.request_id!r} failed: {_CANCELLED}")
                async with contextlib.aclosing(self._attempts(run)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                await self._complete(run)
            except (GenerationError, LeaseLostError):
                raise  # already ended (by _give_up) or no longer ours
            except CoordinatorUnavailableError:
                self._stopped_by_outage(ctx)  # taken over from the committed prefix after the outage
                raise
            except Exception as exc:  # every request ends: a bug, ...
                raise await self._end_on_error(run, exc) from exc
            finally:
                if ending is not None:
                    ending.outcome = run.outcome
        except (asyncio.CancelledError, GeneratorExit):
            await self._abandon(run)
            raise
        finally:
            if self._running.get(ctx.request_id) == running:
                del self._running[ctx.request_id]

    def _track_running(self, ctx: StreamingContext) -> tuple[int, asyncio.Task[Any]]:
        """Note the task consuming this generation, so cancel_local can stop it."""
        task = asyncio.current_task()
        assert task is not None  # generations run in a task (an async generator's consumer)
        running = self._running[ctx.request_id] = (ctx.epoch, task)
        return running

    def _cancelled_here(self) -> bool:
        """True (and the task's cancellation is withdrawn) when cancel_local alone cancelled
        the current task: a ``stream()`` caller then gets RequestCancelledError, not CancelledError."""
        task = asyncio.current_task()
        if task is None or task not in self._cancelling:
            return False
        self._cancelling.discard(task)
        return task.uncancel() == 0

    async def _end_cancelled(self, run: _Run) -> None:
        """End the request failed, kind "Cancelled", fenced by this generation's epoch."""
        await self.manager.fail(run.request_id, _CANCELLED, kind="Cancelled", epoch=run.ctx.epoch)
        run.outcome = self._outcome(run, "Failed", error=_CANCELLED, error_kind="Cancelled")

    async def _attempts(self, run: _Run) -> AsyncGenerator[str, None]:
        """Backend after backend until one finishes the answer (``run.finish``) or we give up."""
        while run.finish is None:
            if self._remaining_tokens(run) == 0:
                # the committed answer already used the caller's max_tokens: it ends here, cut by the limit
                run.finish, run.finished_by = StreamEnd("length"), run.finished_by or run.ctx.current_backend
                return
            backend = await self._pick(run)
            if backend is None:
                await self._record(run, self._fallback_name(run), FailoverResult.NoBackendsAvailable)
                raise await self._give_up(run, "no backend available")
            async with contextlib.aclosing(self._try_backend(run, backend)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def _complete(self, run: _Run) -> None:
        assert run.finish is not None
        end, usage = run.finish, run.usage or None
        await self.manager.complete(
            run.request_id,
            backend=run.finished_by,
            model=end.model,
            finish_reason=end.finish_reason,
            usage=usage,
            epoch=run.ctx.epoch,
        )
        run.outcome = self._outcome(run, "Completed", finish_reason=end.finish_reason, model=end.model)

    def _outcome(self, run: _Run, state: Any, **fields: Any) -> RequestOutcome:
        """The outcome as written, for AnswerStream callers (no round trip to read it back)."""
        return RequestOutcome(
            request_id=run.request_id,
            state=state,
            owner=self.worker_id,
            epoch=run.ctx.epoch,
            backend=run.finished_by,
            usage=run.usage or None,
            finished_at=time.time(),
            **fields,
        )

    async def _end_on_error(self, run: _Run, exc: Exception) -> GenerationError:
        """End the request failed after an unexpected error; if Redis cannot take that, let the lease go."""
        log.warning("request %s: generation failed with %r; ending it", run.request_id, exc)
        detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, FloCoordError) else str(exc)
        try:
            return await self._give_up(run, detail, raise_unwritten=True)
        except Exception as unwritten:  # Redis unreachable: stop renewing, so another replica takes over
            log.warning("could not end %s (%r); no longer renewing its lease", run.request_id, unwritten)
            self.manager.forget(run.request_id, run.ctx.epoch)
            error = GenerationError(run.request_id, f"request {run.request_id!r} failed: {detail}")
            error.attempts = list(run.attempts)
            return error

    async def _abandon(self, run: _Run) -> None:
        """The consumer went away or we are shutting down: hand the request back, or end it.

        Only the generation that holds the request now acts (an older generation of a
        request this worker re-claimed changes nothing); on shutdown ``aclose`` hands every
        held request back at once, within its timeout.
        """
        held = self.manager.holding(run.request_id)
        if held is None or held.epoch != run.ctx.epoch or self._closing:
            return
        try:
            await asyncio.shield(self._end_cancelled(run))
        except (Exception, asyncio.CancelledError) as exc:
            # stop renewing: another replica takes it over (and, if flagged, ends it cancelled)
            log.warning("could not end %s cleanly: %r; no longer renewing its lease", run.request_id, exc)
            self.manager.forget(run.request_id, run.ctx.epoch)

    def _order(self, run: _Run) -> list[Tier]:
        """The tiers of deployments to try, in order, each (deployment, weight) pairs.

        A request for a model group: the group's route (groups.Router.route) under its
        privacy tier. Otherwise the original order: ``primary``, then ``self.fallback_order``
        (``fallback_order``, or the deployments when it reaches none); a ServingBackend name
        there stands for every deployment of that provider (one tier).
        """
        if run.ctx.model_group:
            route, run.excluded = self.router.route(run.ctx.model_group, context_exceeded=run.context_exceeded)
            return route
        names = [run.ctx.primary_backend] if run.ctx.primary_backend else []
        names += self.fallback_order
        tiers: list[Tier] = []
        seen: set[str] = set()
        for name in dict.fromkeys(names):
            members = [name] if name in self.backends else []
            members += [d for d, b in self.backends.items() if b.spec.backend.value == name and d != name]
            tier = [(d, 1.0) for d in members if d not in seen]
            seen.update(members)
            if tier:
                tiers.append(tier)
        return tiers

    def _fallback_name(self, run: _Run) -> str:
        for tier in self._order(run):
            return tier[0][0]
        return run.ctx.primary_backend or self.fallback_order[0]

    async def _pick(self, run: _Run) -> str | None:
        """The deployment to try next, counted in flight on it (released by _try_backend).

        In tier order: the deployments not yet failed here whose breaker is not open, picked
        by weight and fleet-wide in-flight calls (a half-open one's probe goes first); then
        one that failed transiently, once its backoff is over (waited for within the
        failover budget). None: nothing can continue.
        """
        tiers = await self._able(run)
        for tier in tiers:
            fresh = [(n, w) for n, w in tier if n not in run.failed]
            if len(fresh) == 1:  # the common case: decision and pick in one round trip
                picked = await self._acquire_if_allowed(run, *fresh[0])
                if picked is not None:
                    return picked
                continue
            member = f"{self.worker_id}/{run.request_id}"
            states = await self.breaker.allow_each([n for n, _ in fresh], member, request_id=run.request_id)
            decisions = [(n, w, d) for (n, w), d in zip(fresh, states, strict=True)]
            probe = [(n, w) for n, w, d in decisions if d == "PROBE"]
            closed = [(n, w) for n, w, d in decisions if d == "CLOSED"]
            if probe or closed:
                return await self._acquire(run, probe[:1] or closed)
        names = [n for tier in tiers for n, _ in tier]
        again = sorted((n for n in names if n in run.retry_at), key=lambda n: run.retry_at[n])
        for name in again:
            await self._sleep_within_budget(run, run.retry_at[name] - time.monotonic())
            if self._budget_left(run) == 0:
                return None
            if await self._breaker_decision(run, name) != "OPEN":
                return await self._acquire(run, [(name, 1.0)])
        return None

    async def _acquire(self, run: _Run, candidates: Tier) -> str:
        """Pick among ``candidates`` by weight and in-flight calls, and count this call there."""
        member = f"{self.worker_id}/{run.request_id}"
        try:
            name, _ = await self.inflight.pick(candidates, member, request_id=run.request_id)
        except CoordinatorUnavailableError as exc:  # balancing is a hint: weights alone still spread the load
            log.warning("could not read in-flight counts: %s", exc)
            return random.choices([n for n, _ in candidates], [w for _, w in candidates])[0]
        self._counted(member, name)
        return name

    async def _acquire_if_allowed(self, run: _Run, name: str, weight: float) -> str | None:
        """``name`` counted in flight if its breaker lets this request use it, else None.

        The breaker decision and the in-flight count go in one pipeline (one round trip
        before the backend call instead of two); a count taken for a breaker that says
        OPEN is released at once (counts are hints: a moment too many changes no answer).
        """
        member = f"{self.worker_id}/{run.request_id}"
        probe_ttl = self.breaker.config.probe_ttl
        decision, _ = await self.inflight.pick_if_allowed(
            name, weight, member, probe_ttl=probe_ttl, request_id=run.request_id
        )
        self._counted(member, name)
        if decision == "OPEN":
            self._release_soon(run, name)
            return None
        return name

    def _counted(self, member: str, name: str) -> None:
        """Remember this worker's call ``member`` on ``name``; renew such calls while any runs."""
        self._inflight[member] = name
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_inflight(), name="inflight-renew")

    async def _release(self, run: _Run, name: str) -> None:
        member = f"{self.worker_id}/{run.request_id}"
        if self._inflight.pop(member, None) is None:
            return
        try:
            await self.inflight.release(name, member, request_id=run.request_id)
        except CoordinatorUnavailableError as exc:  # its deadline passes anyway: self-healing
            log.warning("could not release the in-flight call of %s on %s: %s", run.request_id, name, exc)

    def _release_soon(self, run: _Run, name: str) -> None:
        """Release in a task of its own (the call's deadline would end it anyway: self-healing)."""
        member = f"{self.worker_id}/{run.request_id}"
        if self._inflight.pop(member, None) is None:
            return
        task = asyncio.get_running_loop().create_task(self._release_member(name, member))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_member(self, name: str, member: str) -> None:
        with contextlib.suppress(Exception):
            await self.inflight.release(name, member)

    async def _renew_inflight(self) -> None:
        """Keep this worker's calls counted while they run (a third of the count's ttl apart)."""
        interval = self.inflight.ttl_ms / 3000
        while self._inflight:
            await asyncio.sleep(interval)
            try:
                await self.inflight.renew(dict(self._inflight))
            except CoordinatorUnavailableError as exc:
                log.warning("could not renew in-flight counts: %s", exc)

    async def _able(self, run: _Run) -> list[Tier]:
        """The tiers, keeping configured deployments that can continue this request (by capability)."""
        usable = set(self.backends) - run.cannot_continue
        tiers = [[(n, w) for n, w in tier if n in usable] for tier in self._order(run)]
        if run.ctx.messages is not None and run.prefix:
            names = [n for tier in tiers for n, _ in tier]
            modes = {n: self.backends[n].spec.continues_chat for n in names}
            asked = [(n, modes[n]) for n in names if modes[n] not in ("none", "completions")]  # prefills are remembered
            try:
                forgotten = await self.capabilities.missing(asked, request_id=run.request_id)
            except CoordinatorUnavailableError as exc:  # a shared hint only: each request still learns by itself
                log.warning("could not read remembered capabilities: %s", exc)
                forgotten = set()
            tiers = [[(n, w) for n, w in tier if modes[n] != "none" and n not in forgotten] for tier in tiers]
        return [tier for tier in tiers if tier]

    async def _breaker_decision(self, run: _Run, name: str) -> str:
        # one probe per request: a half-open backend gets one trial call, not this worker's every request
        return await self.breaker.allow(name, f"{self.worker_id}/{run.request_id}", request_id=run.request_id)

    async def _try_backend(self, run: _Run, name: str) -> AsyncGenerator[str, None]:
        """Calls to one backend (with its same-backend retries) until success or a final failure."""
        try:
            async with contextlib.aclosing(self._calls(run, name)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except (GeneratorExit, asyncio.CancelledError):
            self._release_soon(run, name)  # no awaiting while being closed or cancelled
            raise
        except BaseException:
            await self._release(run, name)
            raise
        await self._release(run, name)

    async def _calls(self, run: _Run, name: str) -> AsyncGenerator[str, None]:
        backend = self.backends[name]
        server_errors = rate_limits = 0
        while True:
            try:
                async with contextlib.aclosing(self._call(run, name, backend)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except ContentPolicyRejection as exc:
                error = ContentPolicyError(run.request_id, exc.reason)
                raise await self._give_up(run, exc.reason, error=error, finish_reason="content_filter") from exc
            except ToolCallsOnlyError as exc:
                raise await self._give_up(run, exc.detail) from exc
            except ServerError as exc:
                if server_errors < self.executor.same_backend_retries:
                    server_errors += 1
                    await self._sleep_within_budget(run, self._backoff(server_errors - 1))
                    continue
                await self._fail_over(run, name, exc)
                return
            except RateLimitedError as exc:
                wait = exc.retry_after if exc.retry_after is not None else self._backoff(rate_limits)
                if rate_limits < self.executor.rate_limit_retries and wait <= self.executor.rate_limit_max_wait:
                    rate_limits += 1
                    await self._sleep_within_budget(run, wait)
                    continue
                await self._fail_over(run, name, exc)
                return
            except BackendError as exc:
                await self._fail_over(run, name, exc)
                return

    async def _call(self, run: _Run, name: str, backend: Backend) -> AsyncGenerator[str, None]:
        """One HTTP call: commit text before yielding it; set ``run.finish`` on success.

        A reader task takes the backend's events while a commit is in flight, so chunks
        that arrive meanwhile are committed together (one append) instead of each waiting
        for a round trip of its own: a loaded Redis slows no stream below its backend.
        """
        ctx = run.ctx
        request = GenerationRequest(
            prompt=None if ctx.messages is not None else ctx.prompt,
            messages=ctx.messages,
            prefix=run.prefix,
            max_tokens=self._remaining_tokens(run),
            request_id=ctx.request_id,
            params=ctx.params,
        )
        started, produced, text_here = time.time(), 0, ""
        events = aiter(backend.stream(request))
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        reader = asyncio.get_running_loop().create_task(_read_events(events, inbox, backend))
        try:
            # the call opens while this (fenced) write is in flight: no round trip before it.
            # Nothing is committed or yielded before the write succeeded; if it fails (a newer
            # generation holds the request, Redis is down), ``finally`` closes the call.
            await self.manager.set_current_backend(ctx.request_id, name, epoch=ctx.epoch)
            while True:
                items = await self._next_items(run, backend, inbox, first=produced == 0)
                chunks = [item.text for item in items if isinstance(item, TextChunk) and item.text]
                if chunks:
                    text = "".join(chunks)
                    await self._commit(run, text)
                    run.prefix += text
                    produced += len(chunks)
                    text_here += text
                    run.recovery_deadline = None  # recovered: failover_timeout bounds only the way back
                    yield text
                last = items[-1]
                if isinstance(last, BaseException):
                    raise last
                if isinstance(last, StreamEnd):
                    await self._spend(run, last.usage, text_here, produced)
                    run.finish, run.finished_by = last, name
                    await self._record(run, name, FailoverResult.Success, started, produced, last.usage, last.model)
                    await self._breaker(name, True)
                    return
        except BackendError as exc:
            await self._spend(run, exc.usage, text_here, produced)
            timed_out = isinstance(exc, StallTimeoutError)
            result = FailoverResult.Timeout if timed_out else FailoverResult.BackendError(str(exc))
            await self._record(run, name, result, started, produced, exc.usage)
            raise
        finally:
            # Shielded: a second cancellation arriving meanwhile (a cancel request and the
            # watcher, or a shutdown) must not leave the backend's stream open and generating.
            await asyncio.shield(_close_backend_stream(reader, events))

    async def _commit(self, run: _Run, text: str) -> None:
        """Append ``text``, in pieces no larger than the append limit (a huge line is split, never refused)."""
        for piece in _pieces(text, self.manager.limits.max_chunk_bytes):
            await self.manager.append_tokens(run.request_id, piece, epoch=run.ctx.epoch)

    async def _spend(self, run: _Run, usage: dict[str, int] | None, text: str, deltas: int) -> None:
        """Count one attempt's tokens against the budget and add its usage to the request's.

        The sum is stored with the request, so a replica that takes it over keeps counting.
        """
        reported = (usage or {}).get("completion_tokens")
        run.spent_tokens += reported if reported is not None else estimate_tokens(text, deltas)
        if not usage:
            return
        for key, value in usage.items():
            run.usage[key] = run.usage.get(key, 0) + value
        try:
            await self.manager.set_usage(run.request_id, run.usage, epoch=run.ctx.epoch)
        except CoordinatorUnavailableError as exc:  # accounting only: the answer matters more
            log.warning("could not store the usage of %s: %s", run.request_id, exc)

    async def _next_items(self, run: _Run, backend: Backend, inbox: asyncio.Queue[Any], *, first: bool) -> list[Any]:
        """Wait (within the first-token or stall timeout) for one event, then take all that are queued.

        The list stops at a StreamEnd or an error, which is always its last item.
        """
        limit = self.executor.first_token_timeout if first else self.executor.stall_timeout
        budget = self._budget_left(run)
        timeout = limit if budget is None else min(limit, budget)
        try:
            async with asyncio.timeout(timeout):
                items = [await inbox.get()]
        except TimeoutError:
            what = "first token (or reasoning)" if first else "next chunk"
            exhausted = budget is not None and budget < limit
            why = " (failover_timeout)" if exhausted else ""
            error = StallTimeoutError(
                f"no {what} within {timeout:.1f}s{why}", backend=backend.spec.name, model=backend.spec.model
            )
            error.budget_exhausted = exhausted
            raise error from None
        while isinstance(items[-1], TextChunk | Progress) and not inbox.empty():
            items.append(inbox.get_nowait())
        return items

    async def _fail_over(self, run: _Run, name: str, exc: BackendError) -> None:
        """Mark ``name`` failed for this request and check the failover budget."""
        run.failed.add(name)
        await self.manager.mark_backend_failed(run.request_id, name, epoch=run.ctx.epoch)
        # a 4xx, a local fault, or this request's own budget running out says nothing about the backend
        request_specific = isinstance(exc, BadRequestError) or exc.local or getattr(exc, "budget_exhausted", False)
        if not request_specific:
            await self._breaker(name, False)
        if isinstance(exc, ContextLengthError):
            run.context_exceeded = True  # a model group moves on to its context_window_fallbacks
        if isinstance(exc, PrefillRejectedError):
            await self._cannot_continue(run, name, exc)
        else:
            run.cause = exc  # a prefill rejection is never reported: the failure that led to it is
        if exc.transient:
            run.retry_at[name] = time.monotonic() + self._backoff(len(run.retry_at))
        if run.recovery_deadline is None:
            run.recovery_deadline = time.monotonic() + self.manager.config().failover_timeout
        run.failovers += 1
        log.info("request %s: %s failed (%s); failover %d", run.request_id, name, exc, run.failovers)
        if run.failovers > self.manager.config().max_retries:
            raise await self._give_up(run, f"gave up after {run.failovers - 1} failovers (max_retries)")
        if self._budget_left(run) == 0:
            # the failed call is already recorded (by _call): no second, phantom attempt here
            raise await self._give_up(run, "failover_timeout exceeded")

    async def _cannot_continue(self, run: _Run, name: str, exc: PrefillRejectedError) -> None:
        """``name`` rejected a prefill: not again for this request, nor (for a while) for any worker."""
        run.cannot_continue.add(name)
        if exc.status is None:
            return  # refused by its own configuration: nothing new to tell other workers
        mode = self.backends[name].spec.continues_chat
        try:
            await self.capabilities.remember_missing(name, mode, request_id=run.request_id)
        except CoordinatorUnavailableError as exc_redis:  # a hint for others; this request already knows
            log.warning("could not share that %s rejects prefills: %s", name, exc_redis)

    def _budget_left(self, run: _Run) -> float | None:
        if run.recovery_deadline is None:
            return None
        return max(0.0, run.recovery_deadline - time.monotonic())

    async def _sleep_within_budget(self, run: _Run, seconds: float) -> None:
        budget = self._budget_left(run)
        await asyncio.sleep(seconds if budget is None else min(seconds, budget))

    def _backoff(self, retry: int) -> float:
        """Exponential backoff with full jitter: never hammer a struggling backend."""
        cap = min(self.executor.backoff_max, self.executor.backoff_initial * 2**retry)
        return random.uniform(cap / 2, cap)

    async def _breaker(self, name: str, success: bool) -> None:
        try:
            await self.breaker.record(name, success)
        except CoordinatorUnavailableError as exc:
            log.warning("breaker update for %s failed: %s", name, exc)

    async def _record(
        self,
        run: _Run,
        name: ServingBackend | str,
        result: FailoverResult,
        started: float | None = None,
        produced: int = 0,
        usage: dict[str, int] | None = None,
        model: str | None = None,
    ) -> None:
        backend = self.backends.get(str(name))
        attempt = FailoverAttempt(
            backend=str(name),
            started_at=started if started is not None else time.time(),
            result=result,
            request_id=run.request_id,
            worker_id=self.worker_id,
            model=model or (backend.spec.model if backend else None),
            tokens=produced,
            usage=usage,
        )
        run.attempts.append(attempt)
        try:
            # mark_failed=False: a retried 5xx/429 that then succeeds must not exclude its backend;
            # real failovers are marked by _fail_over.
            await self.manager.record_attempt(attempt, mark_failed=False)
        except CoordinatorUnavailableError as exc:  # history is observability; the answer matters more
            log.warning("could not record attempt for %s: %s", run.request_id, exc)

    async def _give_up(
        self,
        run: _Run,
        reason: str,
        *,
        error: GenerationError | None = None,
        finish_reason: str | None = None,
        raise_unwritten: bool = False,
    ) -> GenerationError:
        """End the request as failed (followers see why) and build the caller's error.

        The stored reason is said once; the caller's error adds "request 'X' failed: ".
        With ``raise_unwritten``, an error writing the failure (Redis unreachable) is raised.
        """
        if error is None:
            detail = f"{reason}; last failure: {run.cause}" if run.cause is not None else reason
            message = f"request {run.request_id!r} failed: {detail}"
            if run.excluded:
                tier = self.router.group(run.ctx.model_group or "").tier.value
                detail += f" (privacy tier {tier} of model {run.ctx.model_group!r} excluded: {', '.join(run.excluded)})"
                error = PrivacyTierError(run.request_id, f"request {run.request_id!r} failed: {detail}", run.excluded)
            else:
                error = GenerationError(run.request_id, message)
        else:
            detail = str(error)
        error.attempts = list(run.attempts)
        stored = detail if len(detail) <= _MAX_REASON else detail[: _MAX_REASON - 3] + "..."
        try:
            await self.manager.fail(
                run.request_id,
                stored,
                kind=type(error).__name__,
                finish_reason=finish_reason,
                usage=run.usage or None,
                epoch=run.ctx.epoch,
            )
        except LeaseLostError:
            pass
        except Exception:
            if raise_unwritten:
                raise
            log.warning("could not record the failure of %s; no longer renewing its lease", run.request_id)
            self.manager.forget(run.request_id, run.ctx.epoch)
        run.outcome = self._outcome(
            run, "Failed", error=stored, error_kind=type(error).__name__, finish_reason=finish_reason
        )
        return error

    def _remaining_tokens(self, run: _Run) -> int | None:
        """The ``max_tokens`` left for a continuation (usage reported, else estimate_tokens); 0 = used up."""
        if run.ctx.max_tokens is None:
            return None
        return max(0, run.ctx.max_tokens - run.spent_tokens) or (0 if run.prefix else 1)


#: characters of a failure reason kept in the outcome (the reason travels through Redis)
_MAX_REASON = 4000
#: the stored reason of a cancelled request (error_kind "Cancelled")
_CANCELLED = "cancelled by the caller"


async def _bounded(awaitable: Any, timeout: float) -> None:
    """Await ``awaitable`` for at most ``timeout`` seconds (a shutdown step on a gone Redis)."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        log.warning("a shutdown step did not finish within %.1fs; going on", timeout)
    except Exception as exc:
        log.warning("a shutdown step failed: %r", exc)


async def _close_backend_stream(reader: asyncio.Task[Any], events: Any) -> None:
    """Stop the task reading a backend's stream, then close the stream (the HTTP response)."""
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await events.aclose()


def _pieces(text: str, limit: int) -> list[str]:
    """``text`` cut at character boundaries into pieces of at most ``limit`` UTF-8 bytes."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return [text]
    out, start = [], 0
    while start < len(data):
        end = min(start + limit, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:  # never split inside a character
            end -= 1
        out.append(data[start:end].decode("utf-8"))
        start = end
    return out


def _split(prompt_or_messages: PromptOrMessages) -> tuple[str | None, list[Any] | None]:
    if isinstance(prompt_or_messages, str):
        return prompt_or_messages, None
    if isinstance(prompt_or_messages, list):
        return None, prompt_or_messages
    kind = type(prompt_or_messages).__name__
    raise ValidationError(f"expected a prompt string or a list of chat messages, got {kind}")


#: The keyword arguments a Coordinator passes on to the AsyncFailoverManager it builds.
_MANAGER_OPTIONS = frozenset(inspect.signature(AsyncFailoverManager.__init__).parameters) - {"self", "config"}
#: The Coordinator's own keyword arguments (named in the error about an unknown one).
_OWN_OPTIONS = (
    "redis", "url", "config", "worker_id", "namespace", "lease_ttl", "executor", "breaker", "manager",
    "concurrency", "capability_ttl", "models",
)  # fmt: skip


def _model_groups(models: Any) -> list[ModelGroup]:
    """``models`` (None, or an iterable of ModelGroup or dicts of its fields) as ModelGroups;
    ConfigError naming the entry otherwise."""
    if models is None:
        return []
    if isinstance(models, str | bytes | Mapping) or not isinstance(models, Iterable):
        raise ConfigError(f"models must be a list of ModelGroup, got {type(models).__name__}")
    groups: list[ModelGroup] = convert(list(models), list[ModelGroup], label="models")
    return groups


def _backend_map(
    backends: Mapping[ServingBackend | str, Backend | BackendSpec] | Iterable[BackendSpec],
    concurrency: int | None = None,
) -> dict[str, Backend]:
    """Deployment name -> adapter (names are case-sensitive; a ServingBackend key becomes its value)."""
    if isinstance(backends, Mapping):
        items = list(backends.items())
    elif isinstance(backends, Iterable) and not isinstance(backends, str | bytes):
        specs = list(backends)
        if not all(isinstance(spec, BackendSpec) for spec in specs):
            raise ConfigError("a list of backends must hold BackendSpec values only")
        check_unique(specs)
        items = [(spec.name, spec) for spec in specs]
    else:
        raise ConfigError(f"backends must be a list of BackendSpec or a mapping, got {type(backends).__name__}")
    out: dict[str, Backend] = {}
    for key, value in items:
        if not (isinstance(value, BackendSpec) or callable(getattr(value, "stream", None))):
            raise ConfigError(f"each backend must be a BackendSpec or a Backend, got {type(value).__name__}")
        name = _deployment_key(key)
        register_backend_secrets(getattr(value, "spec", value))  # its API key never reaches logs or Redis
        out[name] = make_backend(value, max_connections=concurrency) if isinstance(value, BackendSpec) else value
    if not out:
        raise ConfigError("a Coordinator needs at least one backend")
    return out


def _deployment_key(key: object) -> str:
    """A backend map key as a deployment name: a ServingBackend's value, else the name as given."""
    if isinstance(key, ServingBackend):
        return key.value
    if is_deployment_name(key):
        return str(key)
    raise ConfigError(f"backend key {key!r} is neither a ServingBackend nor a valid deployment name")


async def _read_events(events: Any, inbox: asyncio.Queue[Any], backend: Backend) -> None:
    """Move a backend's events into ``inbox``; the last item is a StreamEnd or an error."""
    try:
        async for event in events:
            inbox.put_nowait(event)
            if isinstance(event, StreamEnd):
                return
        spec = backend.spec
        inbox.put_nowait(StreamCutError("stream ended without a finish", backend=spec.name, model=spec.model))
    except Exception as exc:  # handed to the consumer, which raises it where it reads
        inbox.put_nowait(exc)
