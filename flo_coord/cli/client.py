"""Client subcommands: submit, follow, inspect, stats, history."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, TextIO

from flo_coord.cli import render
from flo_coord.cli.common import CommandFailedError, UsageError, client_manager, load, redis_time, run, setup_logging
from flo_coord.store import CHAT_ROLES

if TYPE_CHECKING:
    from flo_coord.store import AsyncFailoverManager

RECONNECT_PAUSE = 1.0


def _emit_json(obj: Any) -> None:
    from flo_coord.redact import redact_secrets

    print(redact_secrets(json.dumps(obj, indent=2, ensure_ascii=False, default=str)))


def _builtins(struct: Any) -> Any:
    from flo_coord.store import as_builtins

    return as_builtins(struct)


# ------------------------------------------------------------------ streaming


async def stream_answer(
    manager: AsyncFailoverManager,
    request_id: str,
    offset: int,
    *,
    wait: float,
    timeout: float,
    out: TextIO,
) -> int:
    """Write the answer from ``offset`` to ``out`` as it is committed; returns the characters written.

    A broken connection to Redis is not the end: following resumes at the offset reached.
    """
    import redis.exceptions as rex

    from flo_coord.errors import CoordinatorUnavailableError
    from flo_coord.execution.delivery import follow

    written = 0
    deadline = time.monotonic() + timeout
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    async for chunk in follow(manager, request_id, offset + written, wait=wait):
                        out.write(chunk)
                        out.flush()
                        written += len(chunk)
                    return written
                except (CoordinatorUnavailableError, rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                    if time.monotonic() + RECONNECT_PAUSE >= deadline:
                        raise
                    print(
                        f"\nflo-coord: lost Redis while following ({type(exc).__name__}); "
                        f"resuming at offset {offset + written}",
                        file=sys.stderr,
                    )
                    await asyncio.sleep(RECONNECT_PAUSE)
    except TimeoutError:
        raise CommandFailedError(
            f"gave up after {timeout:g}s; the request goes on: "
            f"flo-coord follow {request_id} --offset {offset + written}"
        ) from None


async def _answer_chars(manager: AsyncFailoverManager, request_id: str) -> int:
    """Characters of ``request_id``'s committed answer (0 when nothing is stored)."""
    answer = await manager.committed_text(request_id)
    return len(answer) if answer is not None else 0


async def _check_offset(manager: AsyncFailoverManager, request_id: str, offset: int) -> None:
    """An answer that ended before ``offset`` printed nothing: say so (exit 2) rather than succeed silently."""
    length = await _answer_chars(manager, request_id)
    if offset > length:
        raise UsageError(
            f"--offset {offset} is past the end of the answer of {request_id} ({length} chars); "
            f"use an offset from 0 to {length}"
        )


async def _finish_stream(
    manager: AsyncFailoverManager, request_id: str, offset: int, wait: float, timeout: float, not_found: str | None
) -> int:
    from flo_coord.errors import RequestFailedError, UnknownRequestError

    try:
        written = await stream_answer(manager, request_id, offset, wait=wait, timeout=timeout, out=sys.stdout)
        if not written and offset:
            await _check_offset(manager, request_id, offset)
    except RequestFailedError as exc:
        print(file=sys.stdout, flush=True)
        raise CommandFailedError(str(exc)) from None
    except UnknownRequestError:
        if not_found is None:
            raise
        raise CommandFailedError(not_found) from None
    finally:
        await manager.aclose()
    if written or offset == 0:
        print(file=sys.stdout, flush=True)
    return 0


# --------------------------------------------------------------------- submit


def _prompt(args: Any) -> str:
    if args.prompt_file and args.prompt:
        raise UsageError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"cannot read --prompt-file {args.prompt_file!r}: {exc.strerror}") from None
    if args.prompt == "-":
        return sys.stdin.read()
    if not args.prompt:
        raise UsageError(
            "no prompt: give one as an argument, with --prompt-file FILE, '-' to read stdin, "
            "or chat messages with --message ROLE=TEXT or --messages-file FILE"
        )
    return str(args.prompt)


def _message(value: str) -> dict[str, str]:
    role, sep, content = value.partition("=")
    if not sep or role not in CHAT_ROLES or not content:
        raise UsageError(
            f"--message must look like ROLE=TEXT with ROLE one of {', '.join(CHAT_ROLES)} and some TEXT, got {value!r}"
        )
    return {"role": role, "content": content}


def _messages_file(path: str) -> list[dict[str, str]]:
    """A JSON list of ``{"role", "content"}`` objects, or an object with such a ``"messages"`` list."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read --messages-file {path!r}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--messages-file {path!r} is not JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("messages")
    shape = 'a JSON list of {"role": ROLE, "content": TEXT} objects (or {"messages": [...]})'
    if not isinstance(data, list) or not data:
        raise UsageError(f"--messages-file {path!r} must hold {shape}")
    for i, item in enumerate(data):
        ok = isinstance(item, dict) and item.get("role") in CHAT_ROLES and isinstance(item.get("content"), str)
        if not ok or set(item) != {"role", "content"}:
            raise UsageError(
                f'--messages-file {path!r}: message {i} must be {{"role": ROLE, "content": TEXT}} '
                f"with ROLE one of {', '.join(CHAT_ROLES)}, got {json.dumps(item)[:80]}"
            )
    return [{"role": item["role"], "content": item["content"]} for item in data]


def _chat(args: Any) -> list[dict[str, str]] | None:
    """The chat messages of ``submit`` (``--message`` or ``--messages-file``), or None for a prompt."""
    if not args.message and not args.messages_file:
        return None
    if args.message and args.messages_file:
        raise UsageError("give chat messages with --message or with --messages-file, not both")
    if args.prompt or args.prompt_file:
        raise UsageError("give a prompt or chat messages (--message / --messages-file), not both")
    return _messages_file(args.messages_file) if args.messages_file else [_message(v) for v in args.message]


def cmd_submit(args: Any) -> int:
    setup_logging(args)
    messages = _chat(args)
    prompt = _prompt(args) if messages is None else None
    settings = load(args)
    if args.primary:
        from flo_coord.errors import ConfigError
        from flo_coord.models import ServingBackend, is_deployment_name

        try:
            args.primary = ServingBackend.parse(args.primary).value
        except ConfigError:
            if not is_deployment_name(args.primary):
                raise
        # a deployment name: the worker that takes the request knows its deployments
    manager = client_manager(settings)
    request_id = args.request_id or f"req-{uuid.uuid4().hex[:12]}"
    return run(_submit(manager, request_id, prompt, messages, args))


async def _submit(manager: AsyncFailoverManager, request_id: str, prompt: str | None, messages: Any, args: Any) -> int:
    from flo_coord.store import Submission

    try:
        if await _known(manager, request_id):
            raise UsageError(f"request id {request_id!r} is already in use; choose another --request-id")
        submission = Submission(
            request_id=request_id,
            prompt=prompt,
            messages=messages,
            primary=args.primary,
            max_tokens=args.max_tokens,
            model=args.model,
        )
        await manager.queue.submit(submission)
    except BaseException:
        await manager.aclose()
        raise
    namespace = manager.namespace
    if args.no_follow:
        await manager.aclose()
        print(request_id)
        return 0
    print(f"flo-coord: request {request_id} queued (namespace {namespace})", file=sys.stderr, flush=True)
    hint = (
        f"no worker took request {request_id} within {args.wait:g}s; is a worker running on namespace "
        f"{namespace!r} (flo-coord worker --namespace {namespace} ...)? It stays queued: "
        f"flo-coord follow {request_id} --wait 60"
    )
    return await _finish_stream(manager, request_id, 0, args.wait, args.timeout, hint)


# --------------------------------------------------------------------- follow


def cmd_follow(args: Any) -> int:
    setup_logging(args)
    manager = client_manager(load(args))
    return run(_finish_stream(manager, args.request_id, args.offset, args.wait, args.timeout, None))


# -------------------------------------------------------------------- inspect


def cmd_inspect(args: Any) -> int:
    setup_logging(args)
    manager = client_manager(load(args))
    return run(_inspect(manager, args))


async def _inspect(manager: AsyncFailoverManager, args: Any) -> int:
    from flo_coord.errors import UnknownRequestError

    rid = args.request_id
    try:
        ctx = await manager.get_context(rid)
        outcome = None if ctx is not None else await manager.outcome(rid)
        if ctx is None and outcome is None:
            raise UnknownRequestError(rid)
        now = await redis_time(manager)
        answer = None if ctx is not None else await manager.committed_text(rid)
    finally:
        await manager.aclose()
    limit = 10**9 if args.full else 70
    if ctx is not None:
        remaining = ctx.lease_remaining(now)
        if args.json:
            _emit_json({"kind": "context", "lease_remaining": remaining, "context": _builtins(ctx)})
            return 0
        rows = [
            ("request", ctx.request_id),
            ("state", ctx.state + (f" ({ctx.state_reason})" if ctx.state_reason else "")),
            ("owner", ctx.owner),
            ("epoch", ctx.epoch),
            ("lease remaining", render.seconds(remaining) if remaining is not None else None),
            ("model group", ctx.model_group),
            ("primary backend", ctx.primary_backend),
            ("current backend", ctx.current_backend),
            ("failed backends", ", ".join(ctx.failed_backends)),
            ("takeovers", ctx.takeovers),
            ("tokens", ctx.token_count),
            ("answer chars", len(ctx.generated_prefix)),
            ("last seq", ctx.last_seq),
            ("age", render.seconds(now - ctx.created_at) if ctx.created_at else None),
            ("prompt", render.shorten(ctx.prompt, limit)),
            ("answer so far", render.shorten(ctx.generated_prefix, limit, tail=True)),
        ]
        print(render.pairs(rows))
        return 0
    assert outcome is not None
    answer = answer if answer is not None else ""
    if args.json:
        _emit_json({"kind": "outcome", "outcome": _builtins(outcome), "answer": answer})
        return 0
    rows = [
        ("request", outcome.request_id),
        ("state", outcome.state),
        ("finished by", outcome.owner),
        ("epoch", outcome.epoch),
        ("backend", outcome.backend),
        ("model", outcome.model),
        ("tokens", outcome.token_count),
        (
            "finished",
            f"{render.clock(outcome.finished_at)} ({render.seconds(now - outcome.finished_at)} ago)"
            if outcome.finished_at
            else None,
        ),
        ("error", f"{outcome.error_kind}: {outcome.error}" if outcome.error else None),
        ("answer", render.shorten(answer, limit)),
    ]
    print(render.pairs(rows))
    return 0


# ---------------------------------------------------------------------- stats


def cmd_stats(args: Any) -> int:
    setup_logging(args)
    manager = client_manager(load(args))
    return run(_stats(manager, args))


async def _stats(manager: AsyncFailoverManager, args: Any) -> int:
    try:
        stats = await manager.stats()
    finally:
        await manager.aclose()
    if args.json:
        _emit_json({**_builtins(stats), "success_rate": stats.success_rate(), "namespace": manager.namespace})
        return 0
    print(
        render.pairs(
            [
                ("namespace", manager.namespace),
                ("active requests", stats.active_contexts),
                ("attempts", stats.total_attempts),
                ("successful", stats.successful),
                ("timeouts", stats.timeouts),
                ("success rate", f"{stats.success_rate():.1f} %"),
                ("takeovers", stats.takeovers),
            ]
        )
    )
    print("(attempts, timeouts and takeovers count the newest 100 history entries)")
    return 0


# -------------------------------------------------------------------- history


def cmd_history(args: Any) -> int:
    setup_logging(args)
    manager = client_manager(load(args))
    return run(_history(manager, args))


def history_row(entry: Any) -> list[Any]:
    from flo_coord.models import Takeover

    if isinstance(entry, Takeover):
        detail = f"from {entry.old_owner or '-'} at epoch {entry.epoch}, {entry.prefix_chars} chars carried over"
        return [render.clock(entry.at), "takeover", entry.request_id, entry.new_owner, "-", detail]
    result = entry.result.name if entry.result is not None else "-"
    if entry.result is not None and entry.result.message:
        result += f": {render.shorten(entry.result.message, 50)}"
    detail = f"{result} ({entry.tokens} chunks{', ' + entry.model if entry.model else ''})"
    return [
        render.clock(entry.started_at),
        "attempt",
        entry.request_id or "-",
        entry.worker_id or "-",
        str(entry.backend),
        detail,
    ]


async def _known(manager: AsyncFailoverManager, request_id: str) -> bool:
    """Whether ``request_id`` is live or has a stored outcome."""
    return await manager.get_context(request_id) is not None or await manager.outcome(request_id) is not None


async def _history(manager: AsyncFailoverManager, args: Any) -> int:
    from flo_coord.errors import UnknownRequestError

    rid = args.request_id
    try:
        entries = await manager.history(100 if rid else min(args.count, 100))
        if rid:
            entries = [e for e in entries if e.request_id == rid][-args.count :]
            if not entries and not await _known(manager, rid):
                raise UnknownRequestError(rid)
    finally:
        await manager.aclose()
    if args.json:
        _emit_json([_builtins(e) for e in entries])
        return 0
    if not entries:
        about = f" for request {rid!r} among the newest 100 entries" if rid else ""
        print(f"no history{about} in namespace {manager.namespace!r}")
        return 0
    headers = ["TIME", "KIND", "REQUEST", "WORKER", "BACKEND", "RESULT"]
    print(render.table(headers, [history_row(e) for e in entries]))
    return 0
