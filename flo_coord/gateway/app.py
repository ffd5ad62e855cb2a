"""The OpenAI-compatible gateway: a Starlette app around one Coordinator.

Every replica is equal: it generates the requests it accepts (its Coordinator), takes
over orphans of dead replicas (its reaper) and serves any request's stream from any
offset (its own requests from memory, the others' from Redis). See docs/GATEWAY.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flo_coord.errors import (
    ContentPolicyError,
    CoordinatorUnavailableError,
    GenerationError,
    PrivacyTierError,
    UnknownModelError,
    UnknownRequestError,
    ValidationError,
)
from flo_coord.execution.backends import RateLimitedError
from flo_coord.execution.coordinator import AnswerStream, Coordinator
from flo_coord.gateway import protocol
from flo_coord.gateway.live import Live
from flo_coord.gateway.protocol import InvalidParameterError, Parsed, Shaper
from flo_coord.models import FailoverResult, count_tokens
from flo_coord.settings import GatewaySettings
from flo_coord.store import IdempotencyConflictError, Presentation, validation

log = logging.getLogger("flo_coord.gateway")
#: committed text from an offset: from this replica's memory, or followed from Redis
Chunks = AsyncGenerator[str, None] | AnswerStream
HEADER = "x-flo-request-id"
_MAX_KEY_LENGTH = 256


class HTTPError(Exception):
    """An answer other than success: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = protocol.error_body(message, kind, code, param)


def failure(exc: BaseException) -> HTTPError:
    """The HTTP status and error object for an exception (the table is in docs/GATEWAY.md)."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, IdempotencyConflictError):
        return HTTPError(409, str(exc), "invalid_request_error", "idempotency_key_reused", "Idempotency-Key")
    if isinstance(exc, ContentPolicyError):
        return HTTPError(400, str(exc), "invalid_request_error", "content_policy_violation")
    if isinstance(exc, UnknownRequestError):
        return HTTPError(404, str(exc), "invalid_request_error", "request_not_found")
    if isinstance(exc, UnknownModelError):
        return HTTPError(404, str(exc), "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, ValidationError):
        return HTTPError(400, str(exc), "invalid_request_error", "invalid_value", getattr(exc, "param", None))
    if isinstance(exc, CoordinatorUnavailableError):
        return HTTPError(503, f"coordination store unavailable: {exc}", "server_error", "store_unavailable")
    if isinstance(exc, GenerationError):
        failures = [a for a in exc.attempts or [] if _failed_call(a)]
        if _caused_by(exc, RateLimitedError) or (failures and all(_rate_limited(a) for a in failures)):
            return HTTPError(429, str(exc), "rate_limit_error", "rate_limit_exceeded")
        if isinstance(exc, PrivacyTierError):
            # every deployment the model's privacy tier allows failed; the others were never
            # tried: a server-side condition the client cannot fix by changing its request
            return HTTPError(503, str(exc), "server_error", "privacy_tier_unavailable")
        if not failures and "no backend available" in str(exc):
            return HTTPError(503, str(exc), "server_error", "no_backend_available")  # e.g. every breaker open
        return HTTPError(502, str(exc), "server_error", "backend_error")
    log.error("unexpected gateway error: %r", exc)
    return HTTPError(500, "internal error", "server_error", "internal_error")


#: the reason the Coordinator records for a cancelled request (its outcome's error, kind "Cancelled")
CANCELLED = "cancelled by the caller"


def cancelled(rid: str) -> HTTPError:
    """A cancelled request's answer: 409 ``cancelled``, worded as the stored outcome's error
    (``GET /v1/requests/{id}`` shows the same reason); a client's own decision, not a server error."""
    return HTTPError(409, f"request {rid!r} failed: {CANCELLED}", "invalid_request_error", "cancelled")


def _failed_call(attempt: Any) -> bool:
    """A backend call that failed (not the closing "no backend available" record)."""
    result = attempt.result
    return result is not None and result.is_failure() and result != FailoverResult.NoBackendsAvailable


def _rate_limited(attempt: Any) -> bool:
    """Whether a failed attempt was a 429 (attempts keep the failure as text: RateLimitedError's)."""
    return "HTTP 429" in (getattr(attempt.result, "message", None) or "")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


#: OpenAI's codes for the errors Starlette raises itself (unknown route, method not allowed)
_ROUTING_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own HTTP errors (no such route: 404, wrong method: 405) in OpenAI's error shape."""
    assert isinstance(exc, StarletteHTTPException)
    what = f"{request.method} {request.url.path}"
    message = {404: f"no such route: {what}", 405: f"method not allowed: {what}"}.get(exc.status_code, exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    body = protocol.error_body(message, kind, _ROUTING_CODES.get(exc.status_code))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _server_exception(_: Request, exc: Exception) -> Response:
    """Anything that escaped the routes (their own errors are mapped by ``failure``): a 500 in OpenAI's shape."""
    fail = failure(exc)
    return JSONResponse(fail.body, status_code=fail.status)


def _json(status: int, body: Any, request_id: str | None = None) -> JSONResponse:
    headers = {HEADER: request_id} if request_id else None
    return JSONResponse(body, status_code=status, headers=headers)


class Gateway:
    """Routes, state and lifecycle of one replica's HTTP front door.

    ``coordinator``: started and closed by the app's lifespan. ``keys``: SHA-256 hex
    digests of the accepted bearer keys (empty: no authentication). ``retention``:
    seconds idempotency keys and presentation records live.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        settings: GatewaySettings | None = None,
        *,
        keys: set[str] | frozenset[str] = frozenset(),
        retention: float = 86400.0,
        limits: validation.Limits | None = None,
        metrics: Any = None,
        reap_interval: float | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.manager = coordinator.manager
        self.settings = settings or GatewaySettings()
        self.router = coordinator.router  # the model groups (``[[models]]``, else one per deployment model)
        self.keys = frozenset(keys)
        self.retention = retention
        self.limits = limits or coordinator.manager.limits
        self.metrics = metrics
        self.reap_interval = reap_interval
        self.live: dict[str, Live] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.closing = False

    # ------------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        await self.coordinator.start(reap_interval=self.reap_interval)  # also its cancel watcher
        try:
            yield
        finally:
            await self.hand_back()
            await self.coordinator.aclose()

    async def drain(self, grace: float) -> None:
        """On SIGTERM: let streams run ``grace`` seconds, then hand back what is still generating.

        Local streams then end with an error event (503, ``replica_shutting_down``) instead of
        a cut connection, and their clients resume on another replica.
        """
        await asyncio.sleep(grace)
        await self.hand_back()

    async def hand_back(self) -> None:
        """Stop generating here; the requests go back to Redis for another replica (idempotent)."""
        self.closing = True
        # The Coordinator hands a request back (instead of failing it) when it is closing;
        # our generations must see that before they are cancelled.
        self.coordinator._closing = True
        running = list(self.tasks.values()) + list(self._background)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self._endpoint(self.chat), methods=["POST"]),
            Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            Route("/v1/requests/{request_id}", self._endpoint(self.status), methods=["GET"]),
            Route("/v1/requests/{request_id}", self._endpoint(self.cancel), methods=["DELETE"]),
            Route("/v1/requests/{request_id}/stream", self._endpoint(self.resume), methods=["GET"]),
            Route("/v1/models", self._endpoint(self.list_models), methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self._endpoint(self.readyz), methods=["GET"]),
            Route("/metrics", self._endpoint(self.render_metrics), methods=["GET"]),
        ]
        middleware = [Middleware(RequestIdHeader)]
        if self.settings.cors_origins:
            middleware.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=self.settings.cors_origins,
                    allow_methods=["GET", "POST", "DELETE"],
                    allow_headers=["authorization", "content-type", "idempotency-key", "last-event-id"],
                    expose_headers=[HEADER],
                )
            )
        handlers = {StarletteHTTPException: _http_exception, Exception: _server_exception}
        return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=self.lifespan)

    def _endpoint(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Authenticate, run, and turn every error into OpenAI's error JSON."""

        async def endpoint(request: Request) -> Response:
            try:
                self._authenticate(request)
                response = await handler(request)
            except Exception as exc:
                fail = failure(exc)
                response = _json(fail.status, fail.body, request.scope.get("flo_request_id"))
            if self.metrics is not None:
                self.metrics.requests.labels(handler.__name__, str(response.status_code)).inc()
            return response

        return endpoint

    def _authenticate(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest() if scheme.lower() == "bearer" else ""
        if not any(hmac.compare_digest(digest, key) for key in self.keys):
            raise HTTPError(
                401,
                "missing or invalid API key (Authorization: Bearer <key>)",
                "invalid_request_error",
                "invalid_api_key",
            )

    # ------------------------------------------------------------------ creating

    async def chat(self, request: Request) -> Response:
        return await self._create(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._create(request, chat=False)

    async def _create(self, request: Request, *, chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        request.scope["flo_request_id"] = rid
        raw = await self._body(request)
        parsed = protocol.parse(raw, chat=chat, limits=self.limits)
        if parsed.model not in self.router:
            raise UnknownModelError(f"the model {parsed.model!r} does not exist (GET /v1/models lists them)")
        self._check_served(parsed.model, chat)
        shape = Presentation(
            object="chat.completion" if chat else "text_completion",
            model=parsed.model,
            created=int(time.time()),
            include_usage=parsed.include_usage,
        )
        key = request.headers.get("idempotency-key")
        if key is not None:
            attached = await self._attach(request, key, raw, rid, parsed, shape)
            if attached is not None:
                return attached
        # written while the generation starts (no round trip added to the time to first token);
        # awaited before the response, so a client can resume only once it is there
        saved = asyncio.ensure_future(self.manager.gateway.save_presentation(rid, shape, self.retention))
        self._start(rid, parsed)
        try:
            await saved
        except BaseException:
            self.cancel_local(rid)
            raise
        return await self._respond(rid, shape, 0, parsed.stream, resumed=False)

    def _check_served(self, model: str, chat: bool) -> None:
        """A kind of request that no deployment the model routes to takes is the client's to
        fix: a 400 naming ``model``, before anything is stored (a privacy tier that leaves
        nothing is the 503 the generation reports)."""
        tiers, _ = self.router.route(model)
        names = [name for tier in tiers for name, _ in tier if name in self.coordinator.backends]
        if names and not any(self.coordinator.backends[n].spec.serves(chat=chat) for n in names):
            kind = "chat completions" if chat else "text completions (a prompt); use /v1/chat/completions"
            raise InvalidParameterError(f"no deployment of the model {model!r} serves {kind}", "model")

    async def _attach(
        self, request: Request, key: str, raw: bytes, rid: str, parsed: Parsed, shape: Presentation
    ) -> Response | None:
        """Bind the Idempotency-Key to ``rid``; when it was bound before, answer from that request
        (from ``Last-Event-ID`` when given) instead of starting another generation."""
        if not key or len(key) > _MAX_KEY_LENGTH:
            raise InvalidParameterError(f"Idempotency-Key must be 1-{_MAX_KEY_LENGTH} characters", "Idempotency-Key")
        earlier = await self.manager.gateway.claim_idempotency(key, protocol.body_hash(raw), rid, self.retention)
        if earlier is None:
            return None
        request.scope["flo_request_id"] = earlier
        offset, origin = self._offset(request, earlier)
        stored = await self.manager.gateway.load_presentation(earlier)
        return await self._respond(earlier, stored or shape, offset, parsed.stream, resumed=offset > 0, origin=origin)

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        too_big = HTTPError(
            413, f"the request body is larger than {limit} bytes", "invalid_request_error", "request_too_large"
        )
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_big
        return bytes(body)

    def _start(self, rid: str, parsed: Parsed) -> None:
        live = self.live[rid] = Live()
        task = asyncio.get_running_loop().create_task(self._produce(rid, live, parsed), name=f"gw-{rid}")
        self.tasks[rid] = task

    async def _produce(self, rid: str, live: Live, parsed: Parsed) -> None:
        """Generate to the end whatever the client does (it may leave and resume), through
        the model group the client named (stored with the request: a replica that takes it
        over routes it the same way)."""
        what: Any = parsed.messages if parsed.messages is not None else parsed.prompt
        stream = self.coordinator.stream(
            rid, what, model=parsed.model, max_tokens=parsed.max_tokens, params=parsed.params or None
        )
        try:
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    live.push(chunk)
            live.finish()
        except asyncio.CancelledError:
            if self.closing:
                why = "this replica is shutting down; the request goes on elsewhere: resume with Last-Event-ID"
                live.finish(HTTPError(503, why, "server_error", "replica_shutting_down"))
            else:
                live.finish(cancelled(rid))
        except Exception as exc:
            live.finish(exc)
        finally:
            self.live.pop(rid, None)
            self.tasks.pop(rid, None)

    # ----------------------------------------------------------------- answering

    def _source(self, rid: str, offset: int) -> Chunks:
        live = self.live.get(rid)
        if live is not None:
            return live.read(offset)
        return self.coordinator.follow(rid, offset, wait=self.settings.follow_wait)

    async def _respond(
        self, rid: str, shape: Presentation, offset: int, stream: bool, *, resumed: bool, origin: str = "offset"
    ) -> Response:
        """The answer of ``rid`` from character ``offset`` (streams only; ``origin`` names where
        the offset came from, for its 400): an SSE stream, or the whole completion object."""
        shaper = Shaper(rid, shape.object, shape.model, shape.created)
        headers = {HEADER: rid}
        chunks = self._source(rid, 0 if not stream else offset)
        if not stream:
            try:
                async with contextlib.aclosing(chunks) as parts:
                    text = "".join([part async for part in parts])
            except GenerationError as exc:
                raise await self._failure(rid, exc) from None
            reason, usage = await self._ending(rid, text)
            return JSONResponse(shaper.whole(text, reason, usage), headers=headers)
        try:
            first = await self._first(rid, chunks, offset, origin)
        except GenerationError as exc:
            await chunks.aclose()
            raise await self._failure(rid, exc) from None
        except BaseException:
            await chunks.aclose()
            raise
        events = self._events(rid, shape, shaper, offset, first, chunks, resumed)
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def _first(self, rid: str, chunks: Chunks, offset: int, origin: str) -> str | None:
        """The first chunk at ``offset`` (None: the answer ended exactly there).

        An offset past the committed text is a 400 naming the answer's length: at once when
        the answer ended before it; for a request still generating, after ``follow_wait``
        seconds in which the text did not reach it (waiting longer for a chunk is fine as long
        as the offset is within what is committed: a slow backend is no client mistake).
        """
        if not offset:  # the common case: no task of its own on the way to the first token
            try:
                return await anext(chunks)
            except StopAsyncIteration:
                return None
        following = asyncio.ensure_future(anext(chunks))
        try:
            while True:
                await asyncio.wait({following}, timeout=self.settings.follow_wait)
                if following.done():
                    break
                length = await self._committed(rid)
                if offset > length:
                    wait = f"{self.settings.follow_wait:g}"
                    raise self._past_end(rid, offset, length, origin, f" after waiting {wait}s for more")
            return await following
        except StopAsyncIteration:
            length = await self._committed(rid)
            if offset > length:
                raise self._past_end(rid, offset, length, origin, "") from None
            return None
        finally:
            if not following.done():
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)  # our own cancellation still propagates

    @staticmethod
    def _past_end(rid: str, offset: int, length: int, origin: str, waited: str) -> HTTPError:
        """The CLI's ``follow --offset`` wording, in OpenAI's error shape."""
        message = (
            f"{origin} {offset} is past the end of the answer of {rid} ({length} chars{waited}); "
            f"use an offset from 0 to {length}"
        )
        return HTTPError(400, message, "invalid_request_error", "offset_out_of_range", origin)

    async def _committed(self, rid: str) -> int:
        """Characters of ``rid``'s answer committed so far (this replica's memory, else Redis)."""
        live = self.live.get(rid)
        if live is not None:
            return live.length
        return await self.manager.gateway.committed_length(rid)

    async def _failure(self, rid: str, exc: Exception) -> HTTPError:
        """``failure(exc)``, except that a request whose outcome says it was cancelled (kind
        "Cancelled": by DELETE on any replica, or on_disconnect = "cancel") is ``cancelled(rid)``,
        however its end reached us (this replica's task, or the outcome followed from Redis)."""
        if isinstance(exc, GenerationError):
            with contextlib.suppress(Exception):
                outcome = await self.coordinator.outcome(rid)
                if outcome is not None and outcome.error_kind == "Cancelled":
                    return cancelled(rid)
        return failure(exc)

    async def _ending(self, rid: str, text: str) -> tuple[str, dict[str, int]]:
        outcome = await self.coordinator.outcome(rid)
        # finish_reason and usage come from RequestOutcome (contract 2); an outcome written
        # before they existed, or a backend that reports no usage, gets "stop" and a word count
        reason = getattr(outcome, "finish_reason", None) or "stop"
        usage = getattr(outcome, "usage", None)
        if not usage:
            completion = outcome.token_count if outcome is not None else count_tokens(text)
            usage = {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion}
        return reason, dict(usage)

    async def _events(
        self,
        rid: str,
        shape: Presentation,
        shaper: Shaper,
        offset: int,
        first: str | None,
        chunks: Chunks,
        resumed: bool,
    ) -> AsyncGenerator[bytes, None]:
        with_usage = shape.include_usage
        finished = False
        if self.metrics is not None:
            self.metrics.streams.inc()
        try:
            async with contextlib.aclosing(chunks):
                # the role chunk goes out in one write with the first text (one send less)
                head = protocol.sse(shaper.role(with_usage)) if shaper.chat and not resumed else b""
                position = offset
                pending = first
                while True:
                    if pending:
                        position += len(pending)
                        yield head + shaper.text_event(pending, with_usage, protocol.event_id(rid, position))
                        head = b""
                    elif head:
                        yield head
                        head = b""
                    try:
                        pending = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    except Exception as exc:  # after the stream started: one error event, then close
                        finished = True
                        yield protocol.sse((await self._failure(rid, exc)).body)
                        return
            reason, usage = await self._ending(rid, "")
            yield protocol.sse(shaper.finish(reason, with_usage), protocol.event_id(rid, position))
            if with_usage:
                yield protocol.sse(shaper.usage(usage))
            yield protocol.DONE
            finished = True
        finally:
            if self.metrics is not None:
                self.metrics.streams.dec()
            if not finished and self.settings.on_disconnect == "cancel":
                self._spawn(self._cancel_if_abandoned(rid))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_if_abandoned(self, rid: str) -> None:
        """on_disconnect = "cancel": after the grace period, cancel unless a reader came back."""
        await asyncio.sleep(self.settings.disconnect_grace)
        live = self.live.get(rid)
        if live is None or live.readers == 0:
            with contextlib.suppress(Exception):
                await self.coordinator.cancel(rid)

    def _offset(self, request: Request, rid: str) -> tuple[int, str]:
        """The resume position and where it came from: ``?offset=N`` ("offset"), else
        ``Last-Event-ID`` of this request ("Last-Event-ID"), else 0."""
        value = request.query_params.get("offset")
        if value is not None:
            if not value.isdigit():
                raise InvalidParameterError(f"offset must be a character count >= 0, got {value[:40]!r}", "offset")
            return int(value), "offset"
        last = request.headers.get("last-event-id")
        if not last:
            return 0, "offset"
        event_rid, offset = protocol.parse_event_id(last)
        if event_rid != rid:
            raise InvalidParameterError(f"Last-Event-ID belongs to request {event_rid[:80]!r}", "Last-Event-ID")
        return offset, "Last-Event-ID"

    # -------------------------------------------------------------- other routes

    async def resume(self, request: Request) -> Response:
        rid = validation.request_id(request.path_params["request_id"], self.limits)
        request.scope["flo_request_id"] = rid
        offset, origin = self._offset(request, rid)
        shape = await self.manager.gateway.load_presentation(rid)
        if shape is None:
            shape = await self._presentation_of_foreign(rid)
        return await self._respond(rid, shape, offset, True, resumed=offset > 0, origin=origin)

    async def _presentation_of_foreign(self, rid: str) -> Presentation:
        """How to present a request that did not come through a gateway (``flo-coord submit``,
        the Python API): a chat completion unless its context says it is a prompt, named by
        its model group (else its backend's model). UnknownRequestError when it does not exist."""
        ctx = await self.manager.get_context(rid)
        outcome = await self.coordinator.outcome(rid) if ctx is None else None
        if ctx is None and outcome is None:
            raise UnknownRequestError(rid)
        chat = ctx is None or ctx.messages is not None  # a finished request keeps no prompt: chat, the usual
        model = (ctx.model_group if ctx is not None else None) or (outcome.model if outcome is not None else None)
        return Presentation(
            object="chat.completion" if chat else "text_completion", model=model or "unknown", created=int(time.time())
        )

    async def status(self, request: Request) -> Response:
        rid = validation.request_id(request.path_params["request_id"], self.limits)
        request.scope["flo_request_id"] = rid
        ctx = await self.manager.get_context(rid)
        if ctx is not None:
            body: dict[str, Any] = {
                "id": rid,
                "object": "request",
                "state": ctx.state,
                "owner": ctx.owner,
                "epoch": ctx.epoch,
                "backend": ctx.current_backend,
                "model": None,
                "finish_reason": None,
                "usage": None,
                "error": None,
                "committed_chars": len(ctx.generated_prefix),
            }
            return _json(200, body, rid)
        outcome = await self.coordinator.outcome(rid)
        if outcome is None:
            raise UnknownRequestError(rid)
        body = {
            "id": rid,
            "object": "request",
            "state": outcome.state,
            "owner": outcome.owner,
            "epoch": outcome.epoch,
            "backend": outcome.backend,
            "model": outcome.model,
            "finish_reason": getattr(outcome, "finish_reason", None),
            "usage": getattr(outcome, "usage", None),
            "error": outcome.error,
            "committed_chars": await self._committed(rid),
        }
        return _json(200, body, rid)

    async def cancel(self, request: Request) -> Response:
        rid = validation.request_id(request.path_params["request_id"], self.limits)
        request.scope["flo_request_id"] = rid
        status, detail, local = await self.coordinator.cancel(rid)  # UnknownRequestError: 404
        if status == "DONE":
            raise HTTPError(
                409, f"request {rid!r} already ended ({detail})", "invalid_request_error", "request_finished"
            )
        return _json(202, {"id": rid, "object": "request.cancel", "owner": detail, "cancelled_here": local}, rid)

    def cancel_local(self, rid: str) -> bool:
        """Stop generating ``rid`` here (a request this replica started or took over)."""
        task = self.tasks.get(rid) or next(
            (t for t in asyncio.all_tasks() if t.get_name() == f"resume-{rid}" and not t.done()), None
        )
        if task is None:
            return False
        task.cancel()
        return True

    async def list_models(self, _: Request) -> Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "flo-coord"} for name in self.router.groups]
        return _json(200, {"object": "list", "data": data})

    async def healthz(self, _: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def readyz(self, _: Request) -> Response:
        problems = []
        try:
            await asyncio.wait_for(self.manager.ping(), 2.0)
        except Exception as exc:
            problems.append(f"redis unreachable: {type(exc).__name__}")
        beat = getattr(self.metrics, "last_heartbeat", None)
        stale = max(2.0, 2 * self.manager.lease_ttl)
        if beat is not None and time.monotonic() - beat > stale:
            problems.append(f"leases not renewed for {time.monotonic() - beat:.1f}s")
        if time.monotonic() - self.coordinator.cancel_watcher.last_ok > stale:
            problems.append("cancel checks are not reaching Redis")
        if not self.coordinator.backends:
            problems.append("no backend configured")
        if problems:
            return _json(503, {"status": "unready", "problems": problems})
        return _json(200, {"status": "ready", "worker_id": self.manager.worker_id})

    async def render_metrics(self, _: Request) -> Response:
        if self.metrics is None:
            raise HTTPError(404, "metrics are off (prometheus-client missing)", "invalid_request_error", "no_metrics")
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


class RequestIdHeader:
    """Pure ASGI middleware: every response carries ``x-flo-request-id`` (a fresh id when the
    route set none, e.g. /v1/models), without buffering streamed bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name == HEADER.encode() for name, _ in headers):
                    rid = scope.get("flo_request_id") or f"req-{uuid.uuid4().hex}"
                    headers.append((HEADER.encode(), str(rid).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)
