"""Operator subcommands: top (live table of active requests) and reap (one reaper pass)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from flo_coord.cli import render
from flo_coord.cli.common import check_redis, client_manager, load, redis_time, run, setup_logging

if TYPE_CHECKING:
    from flo_coord.store import AsyncFailoverManager

TOP_HEADERS = ["REQUEST", "OWNER", "EPOCH", "LEASE", "BACKEND", "TOKENS", "CHARS", "TAKEOVERS", "STATE", "AGE"]

# ------------------------------------------------------------------------ top


async def top_rows(manager: AsyncFailoverManager, limit: int) -> list[dict[str, Any]]:
    """One snapshot of the active requests (the index confirmed by each request's own hash)."""
    active = await manager.active_requests(limit)
    contexts = await asyncio.gather(*(manager.get_context(rid) for rid, _ in active))
    now = await redis_time(manager)
    rows = []
    for ctx in contexts:
        if ctx is None:  # finished between the two reads
            continue
        rows.append(
            {
                "request_id": ctx.request_id,
                "owner": ctx.owner,
                "epoch": ctx.epoch,
                "lease_remaining": ctx.lease_remaining(now),
                "backend": ctx.current_backend or ctx.primary_backend,
                "tokens": ctx.token_count,
                "chars": len(ctx.generated_prefix),
                "takeovers": ctx.takeovers,
                "state": ctx.state,
                "age": now - ctx.created_at if ctx.created_at else None,
            }
        )
    return rows


def _lease(remaining: float | None) -> str:
    if remaining is None:
        return "-"
    return f"{remaining:.1f}s" if remaining > 0 else "EXPIRED"


def top_frame(namespace: str, rows: list[dict[str, Any]]) -> str:
    title = f"flo-coord top · namespace {namespace} · {len(rows)} active · {time.strftime('%H:%M:%S')}"
    if not rows:
        return f"{title}\n(no active requests)"
    cells = [
        [
            r["request_id"],
            r["owner"] or "-",
            r["epoch"],
            _lease(r["lease_remaining"]),
            r["backend"] or "-",
            r["tokens"],
            r["chars"],
            r["takeovers"],
            r["state"],
            render.seconds(r["age"]),
        ]
        for r in rows
    ]
    return f"{title}\n{render.table(TOP_HEADERS, cells, right=(2, 3, 5, 6, 7, 9))}"


def cmd_top(args: Any) -> int:
    setup_logging(args)
    manager = client_manager(load(args))
    try:
        return run(_top(manager, args))
    except KeyboardInterrupt:
        return 0


async def _top(manager: AsyncFailoverManager, args: Any) -> int:
    live = sys.stdout.isatty() and not args.once
    try:
        while True:
            rows = await top_rows(manager, args.limit)
            if args.json:
                print(json.dumps({"namespace": manager.namespace, "active": rows}), flush=True)
            elif live:
                sys.stdout.write("\x1b[H\x1b[2J" + top_frame(manager.namespace, rows) + "\n")
                sys.stdout.flush()
            else:
                print(top_frame(manager.namespace, rows) + ("" if args.once else "\n"), flush=True)
            if args.once:
                return 0
            await asyncio.sleep(args.interval)
    finally:
        await manager.aclose()


# ----------------------------------------------------------------------- reap


def cmd_reap(args: Any) -> int:
    setup_logging(args)
    settings = load(args)
    worker_id = args.worker_id or f"reaper-{socket.gethostname()[:40]}-{os.getpid()}"
    if settings.backends:
        check_redis(settings.redis.url)
        return run(_reap_and_resume(settings, worker_id, args))
    return run(_reap_report(client_manager(settings, worker_id), args))


def _claimed_rows(claimed: list[Any]) -> list[dict[str, Any]]:
    return [{"request_id": c.request_id, "epoch": c.epoch, "prefix_chars": len(c.generated_prefix)} for c in claimed]


async def _reap_report(manager: AsyncFailoverManager, args: Any) -> int:
    try:
        if args.claim:
            claimed = await manager.claim_orphans(args.limit)
            orphans = [c.request_id for c in claimed]
        else:
            claimed, orphans = [], await manager.orphans(args.limit)
    finally:
        await manager.aclose()
    if args.json:
        print(json.dumps({"orphans": orphans, "claimed": _claimed_rows(claimed), "resumed": []}))
        return 0
    if not orphans:
        print(f"no orphaned requests in namespace {manager.namespace!r}")
        return 0
    if not args.claim:
        print(f"{len(orphans)} orphaned request(s) (lease expired, owner gone):")
        print("\n".join(f"  {rid}" for rid in orphans))
        print("claim them with --claim; resume them by configuring backends (--backend or [[backends]])")
        return 0
    rows = [[c["request_id"], c["epoch"], c["prefix_chars"]] for c in _claimed_rows(claimed)]
    print(render.table(["CLAIMED", "EPOCH", "CHARS"], rows, right=(1, 2)))
    print(
        f"no backends configured: not resumed. These leases expire in {manager.lease_ttl:g}s, "
        "then any worker takes the requests over."
    )
    return 0


async def _reap_and_resume(settings: Any, worker_id: str, args: Any) -> int:
    from flo_coord.execution.coordinator import Coordinator

    coordinator = Coordinator(**settings.coordinator_options(), worker_id=worker_id)
    try:
        await coordinator.start(reap=False)  # heartbeats keep what we claim; no background reaper
        claimed = await coordinator.manager.claim_orphans(args.limit)
        await asyncio.gather(*(coordinator.resume_in_background(ctx) for ctx in claimed))
        outcomes = await asyncio.gather(*(coordinator.outcome(ctx.request_id) for ctx in claimed))
    finally:
        await coordinator.aclose()
    resumed = [
        {**row, "state": o.state if o else "unknown", "error": o.error if o else None}
        for row, o in zip(_claimed_rows(claimed), outcomes, strict=True)
    ]
    if args.json:
        print(
            json.dumps(
                {"orphans": [c.request_id for c in claimed], "claimed": _claimed_rows(claimed), "resumed": resumed}
            )
        )
        return 0
    if not claimed:
        print(f"no orphaned requests in namespace {settings.redis.namespace!r}")
        return 0
    rows = [[r["request_id"], r["epoch"], r["prefix_chars"], r["state"]] for r in resumed]
    print(render.table(["RESUMED", "EPOCH", "CHARS CARRIED", "RESULT"], rows, right=(1, 2)))
    return 0 if all(r["state"] == "Completed" for r in resumed) else 1
