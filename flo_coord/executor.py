"""The Coordinator: stream from real backends, fail over mid-stream, finish taken-over requests.

``stream()`` tracks a request, commits every chunk to Redis (fenced, seq-numbered,
batched) before handing it to the caller, and when a backend fails continues on the
next backend that has not failed for this request, from the committed prefix. When a
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
- a prefill rejection: that backend cannot continue this request; move on, and report
  the failure that caused the failover, not the rejection.
The caller gets the whole answer or a typed error, never a truncated answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from flo_coord import defaults, logs
from flo_coord.backends import (
    Backend,
    BackendError,
    BackendSpec,
    BadRequestError,
    ContentPolicyRejection,
    GenerationRequest,
    PrefillRejectedError,
    RateLimitedError,
    ServerError,
    StreamCutError,
    StreamEnd,
    TextChunk,
    make_backend,
)
from flo_coord.breaker import BreakerConfig, CircuitBreaker
from flo_coord.delivery import follow
from flo_coord.errors import (
    ConfigError,
    ContentPolicyError,
    CoordinatorUnavailableError,
    GenerationError,
    LeaseLostError,
    ValidationError,
)
from flo_coord.manager import AsyncFailoverManager
from flo_coord.models import (
    ChatMessage,
    FailoverAttempt,
    FailoverConfig,
    FailoverResult,
    RequestOutcome,
    ServingBackend,
    StreamingContext,
)
from flo_coord.ownership import AsyncReaper
from flo_coord.redact import register_backend_secrets

log = logging.getLogger("flo_coord.executor")


class ExecutorConfig(msgspec.Struct, kw_only=True, frozen=True):
    """How the Coordinator treats a failing backend call (seconds)."""

    first_token_timeout: float = 30.0  #: time to first token before failing over
    stall_timeout: float = 15.0  #: longest silence between two chunks
    same_backend_retries: int = 1  #: retries of the same backend after a 5xx
    rate_limit_retries: int = 2  #: waits on the same backend after a 429
    rate_limit_max_wait: float = 30.0  #: a longer Retry-After fails over at once
    backoff_initial: float = 0.5  #: first backoff after a 429 without Retry-After
    backoff_max: float = 8.0

    def __post_init__(self) -> None:
        for name in ("first_token_timeout", "stall_timeout", "rate_limit_max_wait", "backoff_initial", "backoff_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"executor {name} must be a number of seconds > 0, got {value!r}")
        for name in ("same_backend_retries", "rate_limit_retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"executor {name} must be an integer >= 0, got {value!r}")


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

    @property
    def request_id(self) -> str:
        return self.ctx.request_id


PromptOrMessages = str | list[ChatMessage] | list[dict[str, str]]


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
        **manager_options: Any,
    ) -> None:
        self.manager = manager or AsyncFailoverManager(
            config,
            redis=redis,
            url=url,
            namespace=namespace,
            worker_id=worker_id,
            lease_ttl=lease_ttl,
            **manager_options,
        )
        self.backends = _backend_map(backends)
        self.executor = executor or ExecutorConfig()
        self.breaker = CircuitBreaker(self.manager.core.keys, self.manager.worker_id, breaker)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: Any = None
        self._reaper: AsyncReaper | None = None
        self._closing = False

    @property
    def worker_id(self) -> str:
        return self.manager.worker_id

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, reap: bool = True, reap_interval: float | None = None) -> Coordinator:
        """Start heartbeats (and, with ``reap``, the reaper that resumes orphaned requests)."""
        if self._heartbeat is None:
            self._heartbeat = self.manager.start_heartbeat()
        if reap and self._reaper is None:
            self._reaper = AsyncReaper(self.manager, self.resume_in_background, reap_interval)
            self._reaper.start()
        return self

    async def aclose(self, *, hand_back: bool = True) -> None:
        """Stop; with ``hand_back``, release every request still held so others take it at once."""
        self._closing = True
        if self._reaper is not None:
            await self._reaper.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if hand_back:
            for rid in self.manager.held():
                try:
                    await self.manager.release(rid)
                except Exception as exc:  # best effort: the lease expires anyway
                    log.warning("could not hand back %s: %s", rid, exc)
        if self._heartbeat is not None:
            await self._heartbeat.stop()
        for backend in self.backends.values():
            await backend.aclose()
        await self.manager.aclose()

    async def __aenter__(self) -> Coordinator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------------- public

    async def stream(
        self,
        request_id: str,
        prompt_or_messages: PromptOrMessages,
        *,
        primary: ServingBackend | str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncGenerator[str, None]:
        """Track, generate and yield the answer's chunks, each once it is committed."""
        prompt, messages = _split(prompt_or_messages)
        ctx = await self.manager.start_tracking(request_id, prompt, primary, messages=messages, max_tokens=max_tokens)
        delivered = 0
        try:
            # aclosing: a caller that stops early must end the request (and close the backend's
            # stream) before its aclose() returns, not whenever the generators are collected
            async with contextlib.aclosing(self._generate(ctx)) as chunks:
                async for chunk in chunks:
                    delivered += len(chunk)
                    yield chunk
        except LeaseLostError:
            # We stalled past our lease and another replica took over: deliver its commits.
            log.warning("lost %s to another worker; following its commits", request_id)
            async with contextlib.aclosing(self.follow(request_id, offset=delivered)) as rest:
                async for chunk in rest:
                    yield chunk

    async def run(
        self,
        request_id: str,
        prompt_or_messages: PromptOrMessages,
        *,
        primary: ServingBackend | str | None = None,
        max_tokens: int | None = None,
    ) -> RequestOutcome | None:
        """Generate to the end without a consumer (clients ``follow``); returns the outcome."""
        stream = self.stream(request_id, prompt_or_messages, primary=primary, max_tokens=max_tokens)
        async with contextlib.aclosing(stream) as chunks:
            async for _ in chunks:
                pass
        return await self.manager.outcome(request_id)

    async def resume(self, ctx: StreamingContext) -> None:
        """Finish a request this worker claimed, from its committed prefix."""
        try:
            async with contextlib.aclosing(self._generate(ctx)) as chunks:
                async for _ in chunks:
                    pass
        except LeaseLostError:
            log.warning("lost %s again while resuming it", ctx.request_id)

    def follow(self, request_id: str, offset: int = 0, *, wait: float = 0.0) -> AsyncGenerator[str, None]:
        """The committed answer from character ``offset`` on, live, from any replica.

        ``wait``: seconds to wait for a just-submitted request to be taken by a worker.
        """
        return follow(self.manager, request_id, offset, wait=wait)

    async def outcome(self, request_id: str) -> RequestOutcome | None:
        return await self.manager.outcome(request_id)

    # ------------------------------------------------------------------ internals

    def resume_in_background(self, ctx: StreamingContext) -> asyncio.Task[None]:
        """Finish ``ctx`` in a task this Coordinator tracks (``aclose`` hands it back)."""
        task = asyncio.get_running_loop().create_task(self._resume_logged(ctx), name=f"resume-{ctx.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _resume_logged(self, ctx: StreamingContext) -> None:
        # every line logged while running this request (in its own task) names it
        with logs.bound(worker_id=self.worker_id, request_id=ctx.request_id, epoch=ctx.epoch):
            log.info("resuming %s at epoch %d from %d chars", ctx.request_id, ctx.epoch, len(ctx.generated_prefix))
            try:
                await self.resume(ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("resumed request %s ended with %s", ctx.request_id, exc)

    async def _generate(self, ctx: StreamingContext) -> AsyncGenerator[str, None]:
        run = _Run(ctx=ctx, prefix=ctx.generated_prefix, failed=set(ctx.failed_backends))
        try:
            while run.finish is None:
                backend = await self._pick(run)
                if backend is None:
                    await self._record(run, self._fallback_name(run), FailoverResult.NoBackendsAvailable)
                    raise await self._give_up(run, "no backend available")
                async with contextlib.aclosing(self._try_backend(run, backend)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            await self.manager.complete(run.request_id, backend=run.finished_by, model=run.finish.model)
        except (asyncio.CancelledError, GeneratorExit):
            await self._abandon(run)
            raise

    async def _abandon(self, run: _Run) -> None:
        """The consumer went away or we are shutting down: hand the request back, or end it."""
        if self.manager.core.holding(run.request_id) is None:
            return
        try:
            if self._closing:
                await asyncio.shield(self.manager.release(run.request_id))
            else:
                await asyncio.shield(self.manager.fail(run.request_id, "cancelled by the caller", kind="Cancelled"))
        except (Exception, asyncio.CancelledError) as exc:
            log.warning("could not end %s cleanly: %r", run.request_id, exc)

    def _order(self, run: _Run) -> list[str]:
        primary = run.ctx.primary_backend
        names = [primary] if primary else []
        names += [b.value for b in self.manager.config().fallback_order]
        return list(dict.fromkeys(names))

    def _fallback_name(self, run: _Run) -> ServingBackend:
        for name in self._order(run):
            try:
                return ServingBackend(name)
            except ValueError:
                continue
        return self.manager.config().fallback_order[0]

    async def _pick(self, run: _Run) -> str | None:
        """The first backend, primary first, that is configured, not failed here, and not open."""
        needs_prefill = run.ctx.messages is not None and bool(run.prefix)
        for name in self._order(run):
            backend = self.backends.get(name)
            if backend is None or name in run.failed:
                continue
            if needs_prefill and not backend.spec.prefill:
                continue  # it cannot continue a chat from a prefix
            # one probe per request: a half-open backend gets one trial call, not this worker's every request
            allow = self.breaker.allow(name, f"{self.worker_id}/{run.request_id}")
            if await self.manager.shell.run(allow, "breaker", run.request_id) == "OPEN":
                continue
            return name
        return None

    async def _try_backend(self, run: _Run, name: str) -> AsyncGenerator[str, None]:
        """Calls to one backend (with its same-backend retries) until success or a final failure."""
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
                raise await self._give_up(run, exc.reason, error=error) from exc
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
            max_tokens=_remaining_tokens(ctx.max_tokens, run.prefix),
            request_id=ctx.request_id,
        )
        started, produced = time.time(), 0
        await self.manager.set_current_backend(ctx.request_id, name)
        events = aiter(backend.stream(request))
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        reader = asyncio.get_running_loop().create_task(_read_events(events, inbox, backend))
        try:
            while True:
                items = await self._next_items(run, backend, inbox, first=produced == 0)
                chunks = [item.text for item in items if isinstance(item, TextChunk) and item.text]
                if chunks:
                    text = "".join(chunks)
                    await self.manager.append_tokens(ctx.request_id, text)
                    run.prefix += text
                    produced += len(chunks)
                    run.recovery_deadline = None  # recovered: failover_timeout bounds only the way back
                    yield text
                last = items[-1]
                if isinstance(last, BaseException):
                    raise last
                if isinstance(last, StreamEnd):
                    run.finish, run.finished_by = last, name
                    await self._record(run, name, FailoverResult.Success, started, produced, last)
                    await self._breaker(name, True)
                    return
        except BackendError as exc:
            timed_out = isinstance(exc, StallTimeoutError)
            result = FailoverResult.Timeout if timed_out else FailoverResult.BackendError(str(exc))
            await self._record(run, name, result, started, produced)
            raise
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await events.aclose()  # type: ignore[attr-defined]

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
            what = "first token" if first else "next chunk"
            exhausted = budget is not None and budget < limit
            why = " (failover_timeout)" if exhausted else ""
            error = StallTimeoutError(
                f"no {what} within {timeout:.1f}s{why}", backend=backend.spec.name, model=backend.spec.model
            )
            error.budget_exhausted = exhausted
            raise error from None
        while isinstance(items[-1], TextChunk) and not inbox.empty():
            items.append(inbox.get_nowait())
        return items

    async def _fail_over(self, run: _Run, name: str, exc: BackendError) -> None:
        """Mark ``name`` failed for this request and check the failover budget."""
        run.failed.add(name)
        await self.manager.mark_backend_failed(run.request_id, name)
        # a 4xx, or this request's own failover budget running out, says nothing about the backend
        request_specific = isinstance(exc, BadRequestError) or getattr(exc, "budget_exhausted", False)
        if not request_specific:
            await self._breaker(name, False)
        if not isinstance(exc, PrefillRejectedError):
            run.cause = exc  # a prefill rejection is never reported: the failure that led to it is
        if run.recovery_deadline is None:
            run.recovery_deadline = time.monotonic() + self.manager.config().failover_timeout
        run.failovers += 1
        log.info("request %s: %s failed (%s); failover %d", run.request_id, name, exc, run.failovers)
        if run.failovers > self.manager.config().max_retries:
            raise await self._give_up(run, f"gave up after {run.failovers - 1} failovers (max_retries)")
        if self._budget_left(run) == 0:
            # the failed call is already recorded (by _call): no second, phantom attempt here
            raise await self._give_up(run, "failover_timeout exceeded")

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
            await self.manager.shell.run(self.breaker.record(name, success), "breaker")
        except CoordinatorUnavailableError as exc:
            log.warning("breaker update for %s failed: %s", name, exc)

    async def _record(
        self,
        run: _Run,
        name: ServingBackend | str,
        result: FailoverResult,
        started: float | None = None,
        produced: int = 0,
        end: StreamEnd | None = None,
    ) -> None:
        backend = self.backends.get(str(name))
        attempt = FailoverAttempt(
            backend=ServingBackend(str(name)),
            started_at=started if started is not None else time.time(),
            result=result,
            request_id=run.request_id,
            worker_id=self.worker_id,
            model=(end.model if end and end.model else backend.spec.model if backend else None),
            tokens=produced,
            usage=end.usage if end else None,
        )
        run.attempts.append(attempt)
        try:
            # mark_failed=False: a retried 5xx/429 that then succeeds must not exclude its backend;
            # real failovers are marked by _fail_over.
            await self.manager.record_attempt(attempt, mark_failed=False)
        except CoordinatorUnavailableError as exc:  # history is observability; the answer matters more
            log.warning("could not record attempt for %s: %s", run.request_id, exc)

    async def _give_up(self, run: _Run, reason: str, *, error: GenerationError | None = None) -> GenerationError:
        """End the request as failed (followers see why) and build the caller's error."""
        cause = f"{reason}; last failure: {run.cause}" if run.cause is not None and error is None else reason
        error = error or GenerationError(run.request_id, f"request {run.request_id!r} failed: {cause}")
        error.attempts = list(run.attempts)
        with contextlib.suppress(LeaseLostError):
            await self.manager.fail(run.request_id, str(error), kind=type(error).__name__)
        return error


def _remaining_tokens(max_tokens: int | None, prefix: str) -> int | None:
    if max_tokens is None:
        return None
    return max(1, max_tokens - len(prefix.split()))


def _split(prompt_or_messages: PromptOrMessages) -> tuple[str | None, list[Any] | None]:
    if isinstance(prompt_or_messages, str):
        return prompt_or_messages, None
    if isinstance(prompt_or_messages, list):
        return None, prompt_or_messages
    kind = type(prompt_or_messages).__name__
    raise ValidationError(f"expected a prompt string or a list of chat messages, got {kind}")


def _backend_map(
    backends: Mapping[ServingBackend | str, Backend | BackendSpec] | Iterable[BackendSpec],
) -> dict[str, Backend]:
    if isinstance(backends, Mapping):
        items = list(backends.items())
    elif isinstance(backends, Iterable) and not isinstance(backends, str | bytes):
        items = [(getattr(spec, "name", None), spec) for spec in backends]
    else:
        raise ConfigError(f"backends must be a list of BackendSpec or a mapping, got {type(backends).__name__}")
    out: dict[str, Backend] = {}
    for key, value in items:
        if not (isinstance(value, BackendSpec) or callable(getattr(value, "stream", None))):
            raise ConfigError(f"each backend must be a BackendSpec or a Backend, got {type(value).__name__}")
        name = ServingBackend.parse(str(key)).value
        register_backend_secrets(getattr(value, "spec", value))  # its API key never reaches logs or Redis
        out[name] = make_backend(value) if isinstance(value, BackendSpec) else value
    if not out:
        raise ConfigError("a Coordinator needs at least one backend")
    return out


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
