#!/usr/bin/env python
"""flo_coord benchmark: append latency, fleet throughput, server ceiling, takeover, memory, scaling.

    python scripts/bench.py [--quick] [--out results.json] [--redis-url URL] [--plot PATH]

By default it starts a throwaway ``redis-server`` (``flo_coord.testing.embedded.RedisServer``) and
runs everything against it; ``--redis-url`` uses another Redis instead (keys are confined to
fresh ``bench...`` namespaces and deleted afterwards; nothing is flushed or reconfigured).
Results go to stdout as a table (every figure against its target) and, with ``--out``, as
JSON. ``--quick`` runs a smaller version of every section in well under a minute.

Sections (``--sections`` picks some):

single    one stream, interleaved: fenced append through the batcher (``append_tokens``) and
          direct (``append_direct``) vs a raw ``HSET`` on the same asyncio client; sync too
          (``FailoverManager.append_tokens`` vs ``HSET`` on its client). Caller-supplied
          clients, ``seq`` omitted; targets on the p50 and mean ratios.
fleet     N streams offering tokens at a fixed rate (open loop, jittered start) through the
          batcher; the same load through the naive path (one awaited script call per token);
          the naive path's saturation; an executor-style closed loop; a sweep of offered load;
          and M streams (default 500) each awaiting its own appends back to back in one
          asyncio process, through ``append_tokens`` and through the naive path.
ceiling   the APPEND script driven by ``redis-benchmark`` (pipelined FCALL on prepared
          contexts), as the server's own limit; the M awaited streams' appends/s against it.
takeover  SIGKILL of worker processes -> first token committed by the replica that took over.
memory    MEMORY USAGE of one request (empty, 1,000 tokens, followed, finished).
scaling   stats() and orphans() at 1k / 10k / 100k active requests.
gateway   ``flo-coord serve`` vs the fake LLM server it fronts, side by side in one run: time to
          first token (sequential streams, interleaved) and tokens/s delivered to N concurrent
          streaming clients (default 200).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import functools
import gc
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis

from flo_coord import (
    AsyncFailoverManager,
    FailoverAttempt,
    FailoverManager,
    FailoverResult,
    ServingBackend,
    defaults,
)
from flo_coord.ownership import AsyncReaper
from flo_coord.store import functions
from flo_coord.store.batching import run_together
from flo_coord.store.connection import connect
from flo_coord.store.core import AppendAck
from flo_coord.store.scripts import APPEND
from flo_coord.testing.embedded import RedisServer, redis_server_binary

SECTIONS = ("single", "fleet", "ceiling", "takeover", "memory", "scaling", "gateway")
TOKEN = "tok "  # 4 bytes, one token (count_tokens counts whitespace-separated words)
PROMPT = "Summarise the history of the printing press in three paragraphs."
LONG_LEASE = 3600.0  # requests that must not expire while measured
pc = time.perf_counter


# --------------------------------------------------------------------------- helpers


def percentile(values: Any, p: float) -> float:
    """Nearest-rank percentile of a sequence (NaN when empty)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(xs)))
    return float(xs[min(len(xs), rank) - 1])


def summary(seconds: Any, scale: float = 1e6) -> dict[str, float]:
    xs = list(seconds)
    return {
        "p50": percentile(xs, 50) * scale,
        "p99": percentile(xs, 99) * scale,
        "mean": (sum(xs) / len(xs) * scale) if xs else math.nan,
        "n": len(xs),
    }


def with_query(url: str, **params: Any) -> str:
    """``url`` with query parameters set (redis-py reads e.g. ``max_connections`` from the URL)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update({k: str(v) for k, v in params.items()})
    return urlunsplit(parts._replace(query=urlencode(query)))


def namespace(tag: str) -> str:
    return f"bench{uuid.uuid4().hex[:8]}-{tag}"


def cleanup(client: redis.Redis, ns: str) -> int:
    """Delete every key of a benchmark namespace (SCAN + UNLINK; never FLUSH)."""
    removed, cursor = 0, 0
    while True:
        cursor, keys = client.scan(cursor, match=f"{ns}:*", count=5000)
        if keys:
            removed += client.unlink(*keys)
        if cursor == 0:
            return removed


def commandstats(client: redis.Redis) -> dict[str, dict[str, float]]:
    return {k.removeprefix("cmdstat_"): v for k, v in client.info("commandstats").items()}


def stat_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], cmd: str, key: str) -> float:
    return float(after.get(cmd, {}).get(key, 0)) - float(before.get(cmd, {}).get(key, 0))


async def start_many(mgr: AsyncFailoverManager, rids: list[str], chunk: int = 1000) -> None:
    """Start tracking many requests fast: each chunk's starts share one pipeline."""
    for i in range(0, len(rids), chunk):
        ops = [mgr.core.start_tracking(rid, PROMPT) for rid in rids[i : i + chunk]]
        for result in await run_together(mgr.shell, ops):
            if isinstance(result, BaseException):
                raise result


def server_time_ms(client: redis.Redis) -> float:
    sec, usec = client.time()
    return sec * 1000 + usec / 1000


async def aserver_time_ms(client: Any) -> float:
    sec, usec = await client.time()
    return float(sec) * 1000 + float(usec) / 1000


class CpuMeter:
    """Busy CPU of the whole machine vs this process (+ waited children) and the Redis server."""

    def __init__(self, redis_pid: int | None) -> None:
        self.redis_pid = redis_pid
        self.start = self._sample()

    @staticmethod
    def _proc_seconds(pid: int | None) -> float:
        if pid is None:
            return 0.0
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def _sample(self) -> tuple[float, float, float, float]:
        busy = math.nan
        with contextlib.suppress(OSError, ValueError):
            with open("/proc/stat") as fh:
                cpu = [int(x) for x in fh.readline().split()[1:]]
            idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)
            busy = (sum(cpu[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return time.monotonic(), busy, ours, self._proc_seconds(self.redis_pid)

    def report(self) -> dict[str, float]:
        end = self._sample()
        wall = end[0] - self.start[0]
        busy, ours, server = (end[i] - self.start[i] for i in (1, 2, 3))
        return {
            "wall_s": wall,
            "machine_busy_cores": busy / wall,
            "bench_cores": ours / wall,
            "redis_cores": server / wall,
            "other_cores": max(0.0, busy - ours - server) / wall,
        }


def machine_facts(client: redis.Redis) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = client.info("server")
    hiredis = False
    with contextlib.suppress(Exception):
        from redis.utils import HIREDIS_AVAILABLE

        hiredis = bool(HIREDIS_AVAILABLE)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "redis_version": info.get("redis_version"),
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "hiredis": hiredis,
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
    }


# ------------------------------------------------------------------- 1. single stream


async def _single_async(url: str, samples: int, warmup: int) -> dict[str, Any]:
    mgr = AsyncFailoverManager(redis=connect(url, asyncio=True), namespace=namespace("single"), lease_ttl=LONG_LEASE)
    client = mgr.redis
    hkey = f"{mgr.namespace}:hset"
    await mgr.start_tracking("batched", PROMPT)
    await mgr.start_tracking("direct", PROMPT)
    ops: dict[str, Callable[[], Awaitable[Any]]] = {
        "hset": lambda: client.hset(hkey, "f", "v"),
        "batched": lambda: mgr.append_tokens("batched", TOKEN),
        "direct": lambda: mgr.append_direct("direct", TOKEN),
    }
    times: dict[str, array.array[float]] = {name: array.array("d") for name in ops}
    names = list(ops)
    for i in range(warmup + samples):
        for name in names[i % 3 :] + names[: i % 3]:  # rotate the order: no position bias
            t = pc()
            await ops[name]()
            if i >= warmup:
                times[name].append(pc() - t)
    ns = mgr.namespace
    await mgr.aclose()
    return {"ns": ns, **{name: summary(xs) for name, xs in times.items()}}


def _single_sync(url: str, samples: int, warmup: int) -> dict[str, Any]:
    mgr = FailoverManager(redis=connect(url), namespace=namespace("single-sync"), lease_ttl=LONG_LEASE)
    client = mgr.redis  # the shell's client (it may rebuild one with a shorter timeout)
    hkey = f"{mgr.namespace}:hset"
    mgr.start_tracking("sync", PROMPT)
    ops: dict[str, Callable[[], Any]] = {
        "hset": lambda: client.hset(hkey, "f", "v"),
        "fenced": lambda: mgr.append_tokens("sync", TOKEN),
    }
    times: dict[str, array.array[float]] = {name: array.array("d") for name in ops}
    for i in range(warmup + samples):
        for name in ("hset", "fenced") if i % 2 else ("fenced", "hset"):
            t = pc()
            ops[name]()
            if i >= warmup:
                times[name].append(pc() - t)
    ns = mgr.namespace
    mgr.close()
    return {"ns": ns, **{name: summary(xs) for name, xs in times.items()}}


def bench_single(env: Env) -> dict[str, Any]:
    samples, warmup = (1000, 200) if env.quick else (5000, 500)
    a = asyncio.run(_single_async(env.url, samples, warmup))
    s = _single_sync(env.url, samples, warmup)
    for ns in (a.pop("ns"), s.pop("ns")):
        cleanup(env.client, ns)
    out: dict[str, Any] = {"samples": samples, "async": a, "sync": s, "unit": "us"}
    for p in ("p50", "p99", "mean"):
        a[f"ratio_batched_{p}"] = a["batched"][p] / a["hset"][p]
        a[f"ratio_direct_{p}"] = a["direct"][p] / a["hset"][p]
        s[f"ratio_{p}"] = s["fenced"][p] / s["hset"][p]
    return out


# ------------------------------------------------------------------------- 2. fleet


@dataclass
class LoadResult:
    mode: str
    streams: int
    offered_per_s: float  # inf for saturation runs
    duration: float
    committed: int = 0  # tokens acknowledged inside the measurement window
    appends: int = 0  # script calls acknowledged inside the window (open loop: coalesced)
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))
    censored: int = 0  # tokens due in the window and still unacknowledged at the end
    server: dict[str, float] = field(default_factory=dict)

    def report(self, window: float) -> dict[str, Any]:
        lat = self.latencies
        return {
            "mode": self.mode,
            "streams": self.streams,
            "offered_tokens_per_s": self.offered_per_s if math.isfinite(self.offered_per_s) else None,
            "duration_s": self.duration,
            "committed_tokens_per_s": self.committed / window,
            "appends_per_s": self.appends / window,
            "tokens_per_append": self.committed / self.appends if self.appends else math.nan,
            "latency_p50_ms": percentile(lat, 50) * 1e3,
            "latency_p99_ms": percentile(lat, 99) * 1e3,
            "latency_max_ms": max(lat) * 1e3 if lat else math.nan,
            "unacknowledged_at_end": self.censored,
            "latency_is_lower_bound": self.censored > 0,
            **self.server,
        }


async def _fleet_setup(url: str, streams: int, tag: str) -> tuple[AsyncFailoverManager, list[str]]:
    # redis-py 8's asyncio pool refuses more than 100 connections by default; the naive path
    # holds one per stream in flight, so let it have them.
    client = connect(with_query(url, max_connections=streams + 16), asyncio=True)
    mgr = AsyncFailoverManager(redis=client, namespace=namespace(tag), lease_ttl=LONG_LEASE)
    rids = [f"s{i}" for i in range(streams)]
    await start_many(mgr, rids)
    return mgr, rids


async def open_loop(url: str, streams: int, rate: float, duration: float, *, drain: float = 5.0) -> LoadResult:
    """Every stream offers one token every 1/rate s (jittered phase) without waiting for acks.

    Tokens go to ``AsyncFailoverManager.offer_tokens`` (the future form of ``append_tokens``,
    input validation included); latency is from a token's scheduled offer time to its
    acknowledgement, so a late producer counts too.
    """
    mgr, rids = await _fleet_setup(url, streams, "fleet")
    sync_client = redis.Redis.from_url(url)
    result = LoadResult("batched-open-loop", streams, streams * rate, duration)
    period = 1.0 / rate
    rng = random.Random(streams * 1000 + int(rate))
    phases = sorted((rng.random() * period, rid) for rid in rids)
    t0 = pc() + 0.05
    end = t0 + duration
    warm = t0 + min(1.0, duration / 5)
    lat = result.latencies
    outstanding = [0]
    closed = [False]

    def acked(dues: list[float], future: asyncio.Future[AppendAck | None]) -> None:
        now = pc()
        outstanding[0] -= len(dues)
        if closed[0] or future.cancelled() or future.exception() is not None:
            return
        lat.extend([now - due for due in dues if due >= warm])
        if warm <= now < end:
            result.committed += len(dues)
            result.appends += 1

    last: dict[str, tuple[asyncio.Future[AppendAck | None], list[float]]] = {}
    before = commandstats(sync_client)
    k = idx = 0
    due = t0 + phases[0][0]
    while due < end:
        now = pc()
        while due <= now and due < end:
            rid = phases[idx][1]
            future = mgr.offer_tokens(rid, TOKEN)
            outstanding[0] += 1
            group = last.get(rid)
            if group is not None and group[0] is future:
                group[1].append(due)
            else:
                dues = [due]
                last[rid] = (future, dues)
                future.add_done_callback(functools.partial(acked, dues))
            idx += 1
            if idx == streams:
                idx, k = 0, k + 1
            due = t0 + k * period + phases[idx][0]
        await asyncio.sleep(max(0.001, due - pc()))
    stop = pc() + drain
    while outstanding[0] and pc() < stop:
        await asyncio.sleep(0.005)
    cut = pc()
    closed[0] = True
    for future, dues in last.values():  # still unacknowledged: count as lower bounds
        if not future.done():
            lat.extend([cut - d for d in dues if d >= warm])
            result.censored += len(dues)
    after = commandstats(sync_client)
    result.server = _server_cost(before, after)
    await _fleet_teardown(mgr, sync_client)
    return result


def _server_cost(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, float]:
    calls = stat_delta(before, after, "fcall", "calls")
    usec = stat_delta(before, after, "fcall", "usec")
    return {"server_script_calls": calls, "server_us_per_script_call": usec / calls if calls else math.nan}


async def _fleet_teardown(mgr: AsyncFailoverManager, sync_client: redis.Redis) -> None:
    ns = mgr.namespace
    await mgr.aclose()
    cleanup(sync_client, ns)
    sync_client.close()


async def closed_loop(url: str, streams: int, rate: float | None, duration: float, *, path: str) -> LoadResult:
    """One coroutine per stream, awaiting each token's append before the next (as the executor does).

    ``path="direct"`` is the naive path (``append_direct``: one awaited script call per token);
    ``path="batched"`` awaits ``append_tokens`` (the batcher). ``rate=None`` appends back to
    back: the saturation throughput.
    """
    mgr, rids = await _fleet_setup(url, streams, f"closed-{path}")
    sync_client = redis.Redis.from_url(url)
    append = mgr.append_direct if path == "direct" else mgr.append_tokens
    offered = math.inf if rate is None else streams * rate
    result = LoadResult(f"{path}-closed-loop", streams, offered, duration)
    period = 0.0 if rate is None else 1.0 / rate
    rng = random.Random(streams * 7 + (0 if rate is None else int(rate)))
    t0 = pc() + 0.05
    end = t0 + duration
    warm = t0 + min(1.0, duration / 5)
    lat = result.latencies

    async def stream(rid: str, phase: float) -> None:
        k = 0
        while True:
            due = pc() if rate is None else t0 + phase + k * period
            if due >= end or pc() >= end:  # behind schedule at the end: the rest is never sent
                break
            if rate is None and due < t0:
                await asyncio.sleep(t0 - due)
                continue
            wait = due - pc()
            if wait > 0:
                await asyncio.sleep(wait)
            await append(rid, TOKEN)
            now = pc()
            if due >= warm:
                lat.append(now - due)
            if warm <= now < end:
                result.committed += 1
                result.appends += 1
            k += 1
        if rate is not None:  # tokens that came due but were never sent: lower bounds
            while True:
                due = t0 + phase + k * period
                if due >= end:
                    break
                if due >= warm:
                    lat.append(end - due)
                    result.censored += 1
                k += 1

    before = commandstats(sync_client)
    await asyncio.gather(*(stream(rid, rng.random() * period) for rid in rids))
    result.server = _server_cost(before, commandstats(sync_client))
    await _fleet_teardown(mgr, sync_client)
    return result


def bench_fleet(env: Env) -> dict[str, Any]:
    args = env.args
    n, rate, d = args.streams, args.rate, args.duration
    window = d - min(1.0, d / 5)
    out: dict[str, Any] = {"streams": n, "rate_per_stream": rate, "duration_s": d, "window_s": window}

    def run(coro: Awaitable[LoadResult]) -> dict[str, Any]:
        res = asyncio.run(coro)  # type: ignore[arg-type]
        rep = res.report(window)
        env.log(
            f"  {rep['mode']:>22} N={rep['streams']:<5} offered={rep['offered_tokens_per_s'] or 'max'!s:>7} "
            f"committed={rep['committed_tokens_per_s']:9.0f}/s p50={rep['latency_p50_ms']:8.1f}ms "
            f"p99={rep['latency_p99_ms']:8.1f}ms"
        )
        return rep

    out["batched"] = run(open_loop(env.url, n, rate, d))
    out["naive"] = run(closed_loop(env.url, n, rate, d, path="direct"))
    sat_levels = sorted({n, min(n, 50)})
    out["naive_saturation"] = {str(c): run(closed_loop(env.url, c, None, d, path="direct")) for c in sat_levels}
    out["naive_saturation_best_tokens_per_s"] = max(
        r["committed_tokens_per_s"] for r in out["naive_saturation"].values()
    )
    out["closed_loop_batched"] = run(closed_loop(env.url, n, rate, d, path="batched"))
    m = args.awaited_streams
    awaited = out["awaited"] = {"streams": m}
    awaited["batched"] = run(closed_loop(env.url, m, None, d, path="batched"))
    awaited["naive"] = run(closed_loop(env.url, m, None, d, path="direct"))
    awaited["ratio_vs_naive"] = (
        awaited["batched"]["committed_tokens_per_s"] / awaited["naive"]["committed_tokens_per_s"]
    )
    sweep = []
    for load in args.sweep:
        same = math.isclose(load, n * rate)
        sweep.append(out["batched"] if same else run(open_loop(env.url, n, load / n, d)))
    out["sweep"] = sweep
    b = out["batched"]
    out["ratio_vs_naive_same_load"] = b["committed_tokens_per_s"] / out["naive"]["committed_tokens_per_s"]
    out["ratio_vs_naive_saturation"] = b["committed_tokens_per_s"] / out["naive_saturation_best_tokens_per_s"]
    out["peak_committed_tokens_per_s"] = max(r["committed_tokens_per_s"] for r in [b, *sweep])
    return out


# ----------------------------------------------------------------------- 3. ceiling


def _benchmark_args(url: str) -> list[str]:
    parts = urlsplit(url)
    argv = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
    if parts.password:
        argv += ["-a", unquote(parts.password)]
        if parts.username:
            argv += ["--user", unquote(parts.username)]
    db = parts.path.strip("/")
    if db and db != "0":
        argv += ["--dbnum", db]
    return argv


def _redis_benchmark(binary: str, url: str, requests: int, command: list[str], *, keyspace: int) -> dict[str, Any]:
    argv = [binary, *_benchmark_args(url), "-c", "50", "-P", "32", "-n", str(requests), "-r", str(keyspace)]
    argv += ["--csv", *command]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    rows = [line for line in proc.stdout.splitlines() if line.startswith('"') and not line.startswith('"test"')]
    if proc.returncode != 0 or not rows:
        raise RuntimeError(f"redis-benchmark failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    cells = [c.strip('"') for c in rows[-1].split('","')]
    shown = ["***" if i and argv[i - 1] == "-a" else a for i, a in enumerate(argv)]
    return {"rps": float(cells[1]), "p50_ms": float(cells[4]), "p99_ms": float(cells[6]), "argv": shlex.join(shown)}


def bench_ceiling(env: Env, contexts: tuple[str, str, int] | None) -> dict[str, Any]:
    """redis-benchmark runs the APPEND script itself: pipelined EVALSHA on prepared contexts.

    ``redis-benchmark`` can only randomise arguments, not count: each command hits a random
    one of K prepared requests with a random seq, so some calls take the duplicate-seq path.
    Both paths are counted exactly (the script calls APPEND only when it applies a token,
    STRLEN only for a duplicate); a second run with seq 0 (all duplicates) gives that path's
    rate, and the applied-path rate follows. An estimate from the server's own accounting
    (commandstats usec per call) is given as well.
    """
    client = env.client
    binary = shutil.which("redis-benchmark")
    own = contexts is None
    if contexts is None:
        k = 10_000 if env.quick else 50_000
        mgr = AsyncFailoverManager(
            redis=connect(env.url, asyncio=True), namespace=namespace("ceiling"), lease_ttl=LONG_LEASE
        )
        asyncio.run(_start_and_close(mgr, [f"c{i:012d}" for i in range(k)]))
        contexts = (mgr.namespace, mgr.worker_id, k)
    ns, worker_id, k = contexts
    out: dict[str, Any] = {"contexts": k, "redis_benchmark": binary}
    functions.install(client)  # the scripts run as Redis Functions (FCALL)
    append_fn = functions.function_name(APPEND)
    tag = f"{ns}:{{c__rand_int__}}"
    keys = [f"{tag}:ctx", f"{tag}:result", f"{tag}:text", f"{tag}:feed"]
    requests = max(k, 20_000)
    try:
        if binary is None:
            out["skipped"] = "redis-benchmark not found"
        else:
            before = commandstats(client)
            mixed = _redis_benchmark(
                binary,
                env.url,
                requests,
                ["FCALL", append_fn, "4", *keys, worker_id, "1", "__rand_int__", TOKEN, "1"],
                keyspace=k,
            )
            after = commandstats(client)
            calls = stat_delta(before, after, "fcall", "calls")
            applied = stat_delta(before, after, "append", "calls")
            dup_calls = stat_delta(before, after, "strlen", "calls")
            dup = _redis_benchmark(
                binary,
                env.url,
                requests,
                ["FCALL", append_fn, "4", *keys, worker_id, "1", "0", TOKEN, "1"],
                keyspace=k,
            )
            hset = _redis_benchmark(
                binary, env.url, max(requests, 200_000), ["HSET", f"{ns}:hb", "f__rand_int__", "v"], keyspace=k
            )
            f = applied / calls if calls else math.nan
            t_mixed, t_dup = 1 / mixed["rps"], 1 / dup["rps"]
            t_applied = (t_mixed - (1 - f) * t_dup) / f if f > 0 else math.nan
            out.update(
                {
                    "mixed": mixed,
                    "applied_fraction": f,
                    "duplicate_fraction": dup_calls / calls if calls else math.nan,
                    "duplicate_only": dup,
                    "hset": hset,
                    "append_rps": 1 / t_applied if t_applied > 0 else mixed["rps"],
                    "server_us_per_call": stat_delta(before, after, "fcall", "usec") / calls if calls else math.nan,
                }
            )
        if "append_rps" not in out:  # no binary: the server's own accounting of script time
            out["append_rps"] = math.nan
        # the script time of the redis-benchmark run alone (the server's lifetime average would
        # also count the batcher's APPEND_MANY calls, hundreds of appends each)
        us = out.get("server_us_per_call")
        if not us:
            us = float(commandstats(client).get("fcall", {}).get("usec_per_call") or 0)
        out["server_exec_ceiling_rps"] = 1e6 / us if us else math.nan
        if math.isnan(out["append_rps"]):
            out["append_rps"] = out["server_exec_ceiling_rps"]
            out["append_rps_source"] = "commandstats"
        else:
            out["append_rps_source"] = "redis-benchmark"
    finally:
        if own:
            cleanup(client, ns)
        client.delete(f"{ns}:hb")
    return out


async def _start_and_close(mgr: AsyncFailoverManager, rids: list[str]) -> None:
    await start_many(mgr, rids)
    await mgr.aclose()


# ---------------------------------------------------------------------- 4. takeover


def worker_main(params: dict[str, Any]) -> int:
    """A worker process for the takeover benchmark: hold requests, stream into them, heartbeat."""
    mgr = FailoverManager(
        redis=connect(params["url"]),
        namespace=params["ns"],
        worker_id=params["worker_id"],
        lease_ttl=params["lease_ttl"],
    )
    for rid in params["rids"]:
        mgr.start_tracking(rid, PROMPT)
        mgr.append_tokens(rid, TOKEN)
    mgr.start_heartbeat()

    def watch_stdin() -> None:  # the parent went away: exit
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    while True:
        time.sleep(0.05)
        for rid in params["rids"]:
            mgr.append_tokens(rid, TOKEN)


async def _takeover(env: Env, reap_interval: float | None) -> dict[str, Any]:
    args = env.args
    lease = args.lease_ttl
    kills, per_wave, per_worker = args.kills, min(args.kills, args.wave), args.requests_per_worker
    ns = namespace("takeover")
    mgr = AsyncFailoverManager(redis=connect(env.url, asyncio=True), namespace=ns, lease_ttl=lease)
    client = mgr.redis
    commits: dict[str, float] = {}
    claims: dict[str, float] = {}

    async def on_claim(ctx: Any) -> None:
        await mgr.append_tokens(ctx.request_id, "resumed ")
        commits[ctx.request_id] = await aserver_time_ms(client)  # just after Redis acknowledged it
        claims[ctx.request_id] = ctx.lease_deadline * 1000 - lease * 1000  # server time of the claim

    heartbeat = mgr.start_heartbeat()
    reaper = AsyncReaper(mgr, on_claim, reap_interval)
    reaper.start()
    procs: list[asyncio.subprocess.Process] = []
    samples: list[dict[str, Any]] = []

    async def spawn(wave: int, count: int) -> list[tuple[asyncio.subprocess.Process, list[str]]]:
        group = []
        for w in range(count):
            wid = f"w{wave}-{w}"
            rids = [f"{wid}-r{j}" for j in range(per_worker)]
            params = {"url": env.url, "ns": ns, "worker_id": wid, "lease_ttl": lease, "rids": rids}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, os.path.abspath(__file__), "--worker", json.dumps(params),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            procs.append(proc)
            group.append((proc, rids))
        return group

    async def ready(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"takeover worker {proc.pid} exited before it was ready")

    async def kill_later(proc: asyncio.subprocess.Process, rids: list[str], delay: float) -> None:
        await asyncio.sleep(delay)
        pipe = client.pipeline(transaction=False)
        for rid in rids:
            pipe.hget(mgr.core.keys.request(rid).ctx, "lease")
        pipe.time()
        *leases, (sec, usec) = await pipe.execute()
        kill_ms = float(sec) * 1000 + float(usec) / 1000
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        for rid, lease_ms in zip(rids, leases, strict=True):
            samples.append({"rid": rid, "worker_pid": proc.pid, "kill_ms": kill_ms, "lease_ms": float(lease_ms or 0)})

    try:
        waves = math.ceil(kills / per_wave)
        for wave in range(waves):
            # A wave starts once the previous one is taken over: starting interpreters would
            # otherwise compete for the CPU with the reaper being measured.
            current = await spawn(wave, min(per_wave, kills - wave * per_wave))
            await asyncio.gather(*(ready(p) for p, _ in current))
            hb = lease * defaults.HEARTBEAT_FRACTION
            # kill each worker at a random phase of its heartbeat cycle
            await asyncio.gather(*(kill_later(p, r, env.rng.uniform(0.2, 0.2 + hb)) for p, r in current))
            wanted = [rid for _, rids in current for rid in rids]
            limit = time.monotonic() + lease + 10 + (reap_interval or lease * defaults.REAPER_FRACTION)
            while any(rid not in commits for rid in wanted) and time.monotonic() < limit:
                await asyncio.sleep(0.05)
            env.log(f"  takeover wave {wave + 1}/{waves}: {sum(r in commits for r in wanted)}/{len(wanted)} taken over")
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await reaper.stop()
        await heartbeat.stop()
        await mgr.aclose()
    latencies, expiry, detect, commit = [], [], [], []
    missing = 0
    for s in samples:
        rid = s["rid"]
        if rid in commits:
            latencies.append((commits[rid] - s["kill_ms"]) / 1000)
            expiry.append((s["lease_ms"] - s["kill_ms"]) / 1000)  # lease left at the kill
            detect.append((claims[rid] - s["lease_ms"]) / 1000)  # expiry -> claimed by the reaper
            commit.append((commits[rid] - claims[rid]) / 1000)  # claim -> first token acknowledged
        else:
            missing += 1
    reap = reap_interval if reap_interval is not None else lease * defaults.REAPER_FRACTION
    return {
        "ns": ns,
        "lease_ttl_s": lease,
        "heartbeat_interval_s": lease * defaults.HEARTBEAT_FRACTION,
        "reaper_interval_s": reap,
        "kills": kills,
        "requests_per_worker": per_worker,
        "samples": len(latencies),
        "not_taken_over": missing,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies) if latencies else math.nan,
        "min_s": min(latencies) if latencies else math.nan,
        "target_s": lease + 0.5,
        "lease_left_at_kill_s": {"p50": percentile(expiry, 50), "max": max(expiry, default=math.nan)},
        "expiry_to_claim_s": {
            "p50": percentile(detect, 50),
            "p99": percentile(detect, 99),
            "max": max(detect, default=math.nan),
        },
        "claim_to_first_token_s": {"p50": percentile(commit, 50), "max": max(commit, default=math.nan)},
        "latencies_s": sorted(latencies),
    }


def bench_takeover(env: Env) -> dict[str, Any]:
    out = asyncio.run(_takeover(env, env.args.reap_interval))
    cleanup(env.client, out.pop("ns"))
    compare = env.args.compare_reap_interval
    if compare and compare != out["reaper_interval_s"]:
        env.log(f"  again with the reaper every {compare:g}s ...")
        alt = asyncio.run(_takeover(env, compare))
        cleanup(env.client, alt.pop("ns"))
        out["with_reaper_interval"] = alt
    return out


# ------------------------------------------------------------------------ 5. memory


def bench_memory(env: Env) -> dict[str, Any]:
    mgr = FailoverManager(redis=connect(env.url), namespace=namespace("memory"), lease_ttl=LONG_LEASE)
    client = mgr.redis
    tokens = 1000

    def usage(key: str) -> int:
        return int(client.memory_usage(key, samples=0) or 0)

    def request_bytes(rid: str) -> dict[str, int]:
        rk = mgr.core.keys.request(rid)
        ctx, text = usage(rk.ctx), usage(rk.text)
        return {"ctx_hash": ctx, "text_string": text, "total": ctx + text}

    prompt_bytes = len(PROMPT.encode())
    prefix_bytes = len(TOKEN.encode()) * tokens
    try:
        mgr.start_tracking("empty", PROMPT)
        empty = request_bytes("empty")
        mgr.start_tracking("full", PROMPT)
        for _ in range(tokens):
            mgr.append_tokens("full", TOKEN)
        full = request_bytes("full")
        # The same text written in one go: what the string costs without APPEND's spare capacity.
        copy = f"{mgr.namespace}:text-copy"
        client.set(copy, client.get(mgr.core.keys.request("full").text) or b"")
        full["text_string_exact"] = usage(copy)
        client.delete(copy)
        # A followed request: its feed stream exists while someone follows it.
        mgr.start_tracking("followed", PROMPT)
        mgr.shell.run(mgr.core.follow_read("followed", 0), "follow_read")
        for _ in range(tokens):
            mgr.append_tokens("followed", TOKEN)
        feed = usage(mgr.core.keys.request("followed").feed)
        # A finished request keeps its text and outcome for the retention period.
        mgr.complete("full")
        rk = mgr.core.keys.request("full")
        finished = usage(rk.result) + usage(rk.text)
        index_before = usage(mgr.core.keys.active)
    finally:
        mgr.close()
        cleanup(env.client, mgr.namespace)
    return {
        "prompt_bytes": prompt_bytes,
        "prefix_bytes_1000_tokens": prefix_bytes,
        "empty": {**empty, "beyond_prompt_and_prefix": empty["total"] - prompt_bytes},
        "tokens_1000": {
            **full,
            "beyond_prompt_and_prefix": full["total"] - prompt_bytes - prefix_bytes,
            "append_slack": full["text_string"] - full["text_string_exact"],
            "beyond_excluding_slack": full["ctx_hash"] + full["text_string_exact"] - prompt_bytes - prefix_bytes,
        },
        "feed_stream_while_followed": feed,
        "finished_result_and_text": finished,
        "finished_beyond_prefix": finished - prefix_bytes,
        "active_index_small_zset": index_before,
        "target_bytes": 1024,
    }


# ----------------------------------------------------------------------- 6. scaling


async def _scaling(env: Env, sizes: list[int], keep: bool) -> dict[str, Any]:
    mgr = AsyncFailoverManager(
        redis=connect(env.url, asyncio=True), namespace=namespace("scaling"), lease_ttl=LONG_LEASE
    )
    reps = 100 if env.quick else 300
    for i in range(defaults.HISTORY_MAXLEN):  # a full history: stats() decodes all of it
        result = FailoverResult.Success if i % 4 else FailoverResult.Timeout
        await mgr.record_attempt(FailoverAttempt(backend=ServingBackend.Vllm, started_at=time.time(), result=result))
    created = 0
    rows = []

    async def timed(fn: Callable[[], Awaitable[Any]]) -> dict[str, float]:
        for _ in range(10):
            await fn()
        xs = []
        for _ in range(reps):
            t = pc()
            await fn()
            xs.append(pc() - t)
        return summary(xs, 1e3)

    for size in sizes:
        t = pc()
        await start_many(mgr, [f"c{i:012d}" for i in range(created, size)])
        create_s = pc() - t
        created = size
        row: dict[str, Any] = {"active": size, "create_s": create_s, "create_per_s": size / create_s if create_s else 0}
        row["stats_ms"] = await timed(mgr.stats)
        row["orphans_none_expired_ms"] = await timed(mgr.orphans)
        # 100 requests whose lease has ended: orphans() confirms each of them in its own hash
        expired = [f"c{i:012d}" for i in range(size - 100, size)]
        await run_together(mgr.shell, [mgr.core.release(rid) for rid in expired])
        found = await mgr.orphans()
        row["orphans_100_expired_ms"] = await timed(mgr.orphans)
        row["orphans_found"] = len(found)
        await mgr.claim_orphans(100)  # back to live, for the next size
        row["active_index_bytes"] = int(await mgr.redis.memory_usage(mgr.core.keys.active, samples=0) or 0)
        row["index_bytes_per_request"] = row["active_index_bytes"] / size
        stats = await mgr.stats()
        row["stats_active_contexts"] = stats.active_contexts
        rows.append(row)
        env.log(
            f"  scaling {size:>7}: stats p50 {row['stats_ms']['p50']:.3f} ms, orphans p50 "
            f"{row['orphans_none_expired_ms']['p50']:.3f} / {row['orphans_100_expired_ms']['p50']:.3f} ms (100 expired)"
        )
    ns, wid = mgr.namespace, mgr.worker_id
    await mgr.aclose()
    first, last = rows[0], rows[-1]
    return {
        "ns": ns,
        "worker_id": wid,
        "keep": keep,
        "sizes": sizes,
        "rows": rows,
        "stats_p50_ratio": last["stats_ms"]["p50"] / first["stats_ms"]["p50"],
        "orphans_p50_ratio": last["orphans_none_expired_ms"]["p50"] / first["orphans_none_expired_ms"]["p50"],
        "orphans_expired_p50_ratio": last["orphans_100_expired_ms"]["p50"] / first["orphans_100_expired_ms"]["p50"],
    }


def bench_scaling(env: Env, keep: bool) -> dict[str, Any]:
    return asyncio.run(_scaling(env, env.args.sizes, keep))


GATEWAY_TOKENS = 256  # tokens per answer: about 5 s per stream, so the start of 200 requests is not all it measures


def _spawn_logged(argv: list[str], ready: str, timeout: float = 30.0) -> tuple[subprocess.Popen[str], str]:
    """Start a process and wait for a stdout line containing ``ready``; returns it and that line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if ready in line:
            return proc, line
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{argv[:5]} did not print {ready!r}")


def _delta_text(line: str) -> str:
    choices = json.loads(line[6:]).get("choices") or [{}]
    return str(choices[0].get("delta", {}).get("content") or "")


async def _first_token(client: Any, url: str, body: dict[str, Any]) -> float:
    """Seconds from sending a streaming request to the first event that carries text."""
    started, elapsed = pc(), None
    async with client.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():  # read to the end: the connection goes back to the pool
            if elapsed is None and line.startswith("data: {") and _delta_text(line):
                elapsed = pc() - started
    if elapsed is None:
        raise RuntimeError(f"no text from {url}")
    return elapsed


async def _stream_tokens(client: Any, url: str, body: dict[str, Any]) -> int:
    """Tokens (whitespace-separated words) of one streamed chat answer."""
    text = []
    async with client.stream("POST", url, json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                text.append(_delta_text(line))
    return len("".join(text).split())


async def _gateway_runs(direct: str, gateway: str, samples: int, streams: int, tokens: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        def body(tag: str, model: str) -> dict[str, Any]:
            return {"model": model, "stream": True, "messages": [{"role": "user", "content": tag}]}

        ttft: dict[str, list[float]] = {"direct": [], "gateway": []}
        for i in range(samples + 10):  # interleaved, so both see the same machine load
            for name, url in (("direct", direct), ("gateway", gateway)):
                seconds = await _first_token(client, f"{url}/v1/chat/completions", body(f"ttft {i}", "bench-m"))
                if i >= 10:  # warm-up
                    ttft[name].append(seconds)
        out: dict[str, Any] = {"samples": samples, "streams": streams, "tokens_per_answer": tokens}
        for name, values in ttft.items():
            out[f"ttft_{name}_ms"] = summary(values, 1e3)
        for name, url in (("direct", direct), ("gateway", gateway)):
            started = pc()
            counts = await asyncio.gather(
                *(_stream_tokens(client, f"{url}/v1/chat/completions", body(f"tput {name} {i}", "slow-m"))
                  for i in range(streams))
            )  # fmt: skip
            wall = pc() - started
            out[f"throughput_{name}"] = {"tokens": sum(counts), "wall_s": wall, "tokens_per_s": sum(counts) / wall}
    out["ttft_added_p50_ms"] = out["ttft_gateway_ms"]["p50"] - out["ttft_direct_ms"]["p50"]
    out["ttft_added_p99_ms"] = out["ttft_gateway_ms"]["p99"] - out["ttft_direct_ms"]["p99"]
    out["throughput_ratio"] = out["throughput_gateway"]["tokens_per_s"] / out["throughput_direct"]["tokens_per_s"]
    return out


def bench_gateway(env: Env) -> dict[str, Any]:
    """TTFT and throughput through one ``flo-coord serve`` replica vs straight to the fake server.

    The fake server answers ``bench-m`` at once (TTFT) and ``slow-m`` at 50 tokens/s per
    stream (throughput: the offered load is N x 50 tokens/s, the same for both paths).
    """
    samples = env.args.gateway_samples or (50 if env.quick else 200)
    streams = env.args.gateway_streams or (50 if env.quick else 200)
    tokens = 64 if env.quick else GATEWAY_TOKENS
    ns = namespace("gateway")
    fake, line = _spawn_logged(
        [sys.executable, "-m", "flo_coord.testing.fakellm", "--port", "0", "--tokens", str(tokens),
         "--model-delay", "slow-m=0.02"],
        "listening on", 30,
    )  # fmt: skip
    direct = line.split("listening on ")[1].split()[0]
    serve_argv = [
        sys.executable, "-m", "flo_coord", "serve", "--redis-url", env.url, "--namespace", ns, "--port", "0",
        "--backend", f"Vllm={direct},bench-m", "--backend", f"Together={direct},slow-m", "--log-level", "warning",
    ]  # fmt: skip
    gateway_proc = None
    try:
        gateway_proc, line = _spawn_logged(serve_argv, "listening on", 60)
        gateway = line.split("listening on ")[1].split()[0]
        result = asyncio.run(_gateway_runs(direct, gateway, samples, streams, tokens))
    finally:
        for proc in (gateway_proc, fake):
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
                if proc.poll() is None:
                    proc.kill()
        cleanup(env.client, ns)
    return result


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    key: str
    label: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None


def figures(results: dict[str, Any]) -> list[Figure]:
    """Every figure of the run, flat, with its target where the brief sets one."""
    out: list[Figure] = []

    def add(key: str, label: str, value: Any, unit: str, target: str = "", ok: bool | None = None) -> None:
        out.append(Figure(key, label, float(value) if value is not None else math.nan, unit, target, ok))

    def at_most(key: str, label: str, value: float, unit: str, limit: float) -> None:
        add(key, label, value, unit, f"<= {limit:g}", value <= limit)

    s = results.get("single")
    if s:
        a, y = s["async"], s["sync"]
        for p in ("p50", "p99"):
            add(f"single.async.hset.{p}", f"async HSET round trip {p}", a["hset"][p], "us")
            add(f"single.async.batched.{p}", f"async fenced append_tokens (batcher) {p}", a["batched"][p], "us")
            add(f"single.async.direct.{p}", f"async fenced append_direct {p}", a["direct"][p], "us")
        add("single.async.hset.mean", "async HSET round trip mean", a["hset"]["mean"], "us")
        add("single.async.batched.mean", "async fenced append_tokens (batcher) mean", a["batched"]["mean"], "us")
        add("single.async.direct.mean", "async fenced append_direct mean", a["direct"]["mean"], "us")
        # the targets: p50 and mean (issue 12); p99 is reported, a tail of scheduling noise on a shared machine
        for p in ("p50", "mean", "p99"):
            ratio, direct = a[f"ratio_batched_{p}"], a[f"ratio_direct_{p}"]
            if p == "p99":
                add(f"single.async.ratio_batched.{p}", f"append_tokens / HSET at {p}", ratio, "x")
                add(f"single.async.ratio_direct.{p}", f"append_direct / HSET at {p}", direct, "x")
            else:
                at_most(f"single.async.ratio_batched.{p}", f"append_tokens / HSET at {p}", ratio, "x", 1.3)
                at_most(f"single.async.ratio_direct.{p}", f"append_direct / HSET at {p}", direct, "x", 1.3)
        for p in ("p50", "p99", "mean"):
            add(f"single.sync.hset.{p}", f"sync HSET round trip {p}", y["hset"][p], "us")
            add(f"single.sync.fenced.{p}", f"sync fenced append (FailoverManager) {p}", y["fenced"][p], "us")
        for p in ("p50", "mean", "p99"):
            if p == "p99":
                add(f"single.sync.ratio.{p}", f"sync fenced / HSET at {p}", y[f"ratio_{p}"], "x")
            else:
                at_most(f"single.sync.ratio.{p}", f"sync fenced / HSET at {p}", y[f"ratio_{p}"], "x", 1.3)
    f = results.get("fleet")
    if f:
        b, nv, cl = f["batched"], f["naive"], f["closed_loop_batched"]
        offered = b["offered_tokens_per_s"]
        fleet = f"{f['streams']} streams x {f['rate_per_stream']:g} tok/s"
        committed = b["committed_tokens_per_s"]
        add("fleet.batched.committed", f"fleet committed tok/s ({fleet})", committed, "tok/s",
            f">= 98% of {offered:.0f}", committed >= 0.98 * offered)  # fmt: skip
        add("fleet.batched.p50", "fleet commit latency p50 (offer -> ack)", b["latency_p50_ms"], "ms")
        at_most("fleet.batched.p99", "fleet commit latency p99 (offer -> ack)", b["latency_p99_ms"], "ms", 20)
        at_most("fleet.batched.unacknowledged", "fleet tokens never acknowledged", b["unacknowledged_at_end"], "", 0)
        add("fleet.batched.tokens_per_append", "fleet tokens coalesced per append", b["tokens_per_append"], "tok")
        add("fleet.batched.server_us", "server time per APPEND script call", b["server_us_per_script_call"], "us")
        add("fleet.naive.committed", "naive path, same load: committed tok/s", nv["committed_tokens_per_s"], "tok/s")
        add("fleet.naive.p50", "naive path latency p50 (lower bound)", nv["latency_p50_ms"], "ms")
        add("fleet.naive.p99", "naive path latency p99 (lower bound)", nv["latency_p99_ms"], "ms")
        due = nv["offered_tokens_per_s"] * f["window_s"]
        add(
            "fleet.naive.never_sent",
            "naive path: share of due tokens never sent",
            nv["unacknowledged_at_end"] / due,
            "",
        )
        add("fleet.naive.saturation", "naive path saturation tok/s", f["naive_saturation_best_tokens_per_s"], "tok/s")
        add("fleet.ratio_vs_naive_same_load", "batched / naive, same load", f["ratio_vs_naive_same_load"], "x")
        add("fleet.ratio_vs_naive_saturation", "batched / naive at its saturation", f["ratio_vs_naive_saturation"], "x")
        add(
            "fleet.closed_loop.committed",
            "executor-style closed loop: committed",
            cl["committed_tokens_per_s"],
            "tok/s",
        )
        add("fleet.closed_loop.p50", "executor-style closed loop: latency p50", cl["latency_p50_ms"], "ms")
        add("fleet.closed_loop.p99", "executor-style closed loop: latency p99", cl["latency_p99_ms"], "ms")
        aw = f["awaited"]
        m = aw["streams"]
        add("fleet.awaited.batched", f"{m} awaiting streams, append_tokens: appends/s",
            aw["batched"]["committed_tokens_per_s"], "/s")  # fmt: skip
        add("fleet.awaited.naive", f"{m} awaiting streams, naive path: appends/s",
            aw["naive"]["committed_tokens_per_s"], "/s")  # fmt: skip
        r = aw["ratio_vs_naive"]
        add("fleet.awaited.ratio_vs_naive", f"{m} awaiting streams: append_tokens / naive", r, "x", ">= 5", r >= 5)
        add("fleet.awaited.p50", f"{m} awaiting streams, append_tokens: latency p50", aw["batched"]["latency_p50_ms"],
            "ms")  # fmt: skip
        for rep in f["sweep"]:
            load = round(rep["offered_tokens_per_s"])
            add(f"sweep.{load}.committed", f"sweep {load} tok/s: committed", rep["committed_tokens_per_s"], "tok/s")
            add(f"sweep.{load}.p50", f"sweep {load} tok/s: latency p50", rep["latency_p50_ms"], "ms")
            add(f"sweep.{load}.p99", f"sweep {load} tok/s: latency p99", rep["latency_p99_ms"], "ms")
        add("fleet.peak_committed", "peak committed tok/s (batched)", f["peak_committed_tokens_per_s"], "tok/s")
    c = results.get("ceiling")
    if c:
        add("ceiling.append_rps", f"server ceiling, APPEND calls/s ({c['append_rps_source']})", c["append_rps"], "/s")
        add("ceiling.server_exec_rps", "server ceiling, script time only", c["server_exec_ceiling_rps"], "/s")
        if "mixed" in c:
            add("ceiling.hset_rps", "server ceiling, HSET/s (redis-benchmark)", c["hset"]["rps"], "/s")
            add("ceiling.mixed_rps", "redis-benchmark APPEND as run (mixed)", c["mixed"]["rps"], "/s")
            add("ceiling.applied_fraction", "  share of those calls that applied", c["applied_fraction"], "")
        if f:
            ceiling = c["append_rps"]
            add(
                "ceiling.fleet_utilisation",
                "fleet APPEND calls/s / ceiling",
                f["batched"]["appends_per_s"] / ceiling,
                "",
            )
            peak = f["peak_committed_tokens_per_s"] / ceiling
            add("ceiling.peak_tokens_fraction", "peak committed tok/s / ceiling calls/s", peak, "")
            share = f["awaited"]["batched"]["committed_tokens_per_s"] / ceiling
            label = f"{f['awaited']['streams']} awaiting streams' appends/s / ceiling"
            add("ceiling.awaited_fraction", label, share, "", ">= 0.4", share >= 0.4)
    t = results.get("takeover")
    if t:
        add("takeover.p50", f"takeover kill -> first token p50 (lease {t['lease_ttl_s']:g}s)", t["p50_s"], "s")
        at_most("takeover.p99", "takeover kill -> first token p99", t["p99_s"], "s", t["target_s"])
        add("takeover.max", "takeover kill -> first token max", t["max_s"], "s")
        add("takeover.samples", f"takeovers measured ({t['kills']} kills)", t["samples"], "")
        at_most("takeover.not_taken_over", "requests never taken over", t["not_taken_over"], "", 0)
        alt = t.get("with_reaper_interval")
        if alt:
            label = f"  same, reaper every {alt['reaper_interval_s']:g}s"
            at_most("takeover.alt.p99", f"{label}: p99", alt["p99_s"], "s", alt["target_s"])
            add("takeover.alt.max", f"{label}: max", alt["max_s"], "s")
    m = results.get("memory")
    if m:
        e, full = m["empty"], m["tokens_1000"]
        add("memory.empty.total", "request memory, empty prefix", e["total"], "B")
        at_most("memory.empty.beyond", "  beyond prompt bytes", e["beyond_prompt_and_prefix"], "B", 1024)
        add("memory.1000.total", "request memory, 1,000 tokens", full["total"], "B")
        at_most("memory.1000.beyond", "  beyond prompt and prefix bytes", full["beyond_prompt_and_prefix"], "B", 1024)
        slack = full["beyond_excluding_slack"]
        at_most("memory.1000.beyond_excluding_slack", "  same, without APPEND's spare capacity", slack, "B", 1024)
        add("memory.feed", "feed stream while followed", m["feed_stream_while_followed"], "B")
        add("memory.finished", "finished request beyond prefix", m["finished_beyond_prefix"], "B")
    sc = results.get("scaling")
    if sc:
        for row in sc["rows"]:
            n = row["active"]
            add(f"scaling.{n}.stats", f"stats() p50, {n} active", row["stats_ms"]["p50"], "ms")
            add(f"scaling.{n}.orphans", f"orphans() p50, {n} active", row["orphans_none_expired_ms"]["p50"], "ms")
            add(f"scaling.{n}.orphans_expired", f"orphans() p50, {n} active, 100 expired",
                row["orphans_100_expired_ms"]["p50"], "ms")  # fmt: skip
            add(f"scaling.{n}.index_bytes", f"active-index bytes/request, {n}", row["index_bytes_per_request"], "B")
        span = f"{sc['sizes'][-1]} / {sc['sizes'][0]}"
        at_most("scaling.stats_p50_ratio", f"stats() p50, {span}", sc["stats_p50_ratio"], "x", 2)
        at_most("scaling.orphans_p50_ratio", f"orphans() p50, {span}", sc["orphans_p50_ratio"], "x", 2)
        at_most("scaling.orphans_expired_p50_ratio", f"orphans() p50 (100 expired), {span}",
                sc["orphans_expired_p50_ratio"], "x", 2)  # fmt: skip
    g = results.get("gateway")
    if g:
        for p in ("p50", "p99"):
            add(f"gateway.ttft_direct.{p}", f"TTFT straight to the fake server {p}", g["ttft_direct_ms"][p], "ms")
            add(f"gateway.ttft_gateway.{p}", f"TTFT through flo-coord serve {p}", g["ttft_gateway_ms"][p], "ms")
        at_most("gateway.ttft_added_p50", "TTFT added by the gateway, p50", g["ttft_added_p50_ms"], "ms", 3)
        add("gateway.ttft_added_p99", "TTFT added by the gateway, p99", g["ttft_added_p99_ms"], "ms")
        n = g["streams"]
        add("gateway.tput_direct", f"tokens/s to {n} clients, direct", g["throughput_direct"]["tokens_per_s"], "tok/s")
        add("gateway.tput_gateway", f"tokens/s to {n} clients, one replica",
            g["throughput_gateway"]["tokens_per_s"], "tok/s")  # fmt: skip
        ratio = g["throughput_ratio"]
        add("gateway.tput_ratio", "gateway / direct throughput", ratio, "x", ">= 0.5", ratio >= 0.5)
    return out


def render(figs: list[Figure]) -> str:
    lines = [f"{'figure':<62} {'value':>14} {'unit':<8} {'target':<18} met"]
    lines.append("-" * len(lines[0]))
    for fig in figs:
        if math.isnan(fig.value):
            value = "n/a"
        elif abs(fig.value) >= 1000:
            value = f"{fig.value:,.0f}"
        elif abs(fig.value) >= 10:
            value = f"{fig.value:.1f}"
        else:
            value = f"{fig.value:.3f}"
        met = "" if fig.met is None else ("yes" if fig.met else "NO")
        lines.append(f"{fig.label[:62]:<62} {value:>14} {fig.unit:<8} {fig.target:<18} {met}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fleet = results["fleet"]
    sweep = sorted(fleet["sweep"], key=lambda r: r["offered_tokens_per_s"])
    x = [r["offered_tokens_per_s"] / 1000 for r in sweep]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(x, [r["latency_p50_ms"] for r in sweep], "o-", label="batched p50")
    ax.plot(x, [r["latency_p99_ms"] for r in sweep], "s-", label="batched p99")
    nv = fleet["naive"]
    nx = nv["offered_tokens_per_s"] / 1000
    ax.plot(
        [nx], [nv["latency_p50_ms"]], "v", color="grey", label="naive: one awaited call per token, p50 (lower bound)"
    )
    ax.plot([nx], [nv["latency_p99_ms"]], "^", color="black", label="naive p99 (lower bound)")
    ax.set_yscale("log")
    ax.set_xlabel(f"offered load (thousand tokens/s, {fleet['streams']} streams)")
    ax.set_ylabel("commit latency, offer -> Redis ack (ms, log)")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, [r["committed_tokens_per_s"] / 1000 for r in sweep], "d--", color="tab:green", alpha=0.6,
             label="batched committed")  # fmt: skip
    ax2.plot(x, x, ":", color="tab:green", alpha=0.4, label="offered")
    ax2.set_ylabel("committed (thousand tokens/s)", color="tab:green")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="lower right", fontsize=8)
    meta = results["meta"]
    ax.set_title(f"flo_coord commit latency vs offered load ({meta['nproc']} cores, Redis {meta['redis_version']})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


@dataclass
class Env:
    args: argparse.Namespace
    url: str
    client: redis.Redis
    server: RedisServer | None
    rng: random.Random

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small version of every section (well under a minute)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--redis-url", help="use this Redis instead of starting a throwaway redis-server")
    p.add_argument("--plot", help="latency plot path (default docs/bench-latency.png on a full run, none with --quick)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--streams", type=int, help="fleet streams (default 1000; quick 200)")
    p.add_argument("--rate", type=float, default=50.0, help="tokens/s offered per stream (default 50)")
    p.add_argument("--duration", type=float, help="seconds per fleet run (default 10; quick 2)")
    p.add_argument(
        "--awaited-streams",
        type=int,
        default=500,
        help="streams awaiting their own appends, back to back (default 500)",
    )
    p.add_argument(
        "--sweep", type=_ints, help="offered loads for the plot, tokens/s (default 10k,15k,20k,25k,35k,50k,75k,100k)"
    )
    p.add_argument("--kills", type=int, help="worker processes to SIGKILL (default 30; quick 5)")
    p.add_argument("--wave", type=int, default=10, help="workers killed per wave (default 10)")
    p.add_argument("--requests-per-worker", type=int, default=3)
    p.add_argument("--lease-ttl", type=float, default=defaults.LEASE_TTL)
    p.add_argument("--reap-interval", type=float, default=None, help="reaper interval (default lease_ttl * 1/5)")
    p.add_argument(
        "--compare-reap-interval",
        type=float,
        help="also measure takeover with this reaper interval (default 0.25 on a full run; 0 = skip)",
    )
    p.add_argument("--sizes", type=_ints, help="active requests for stats/orphans (default 1k,10k,100k; quick 1k,10k)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gateway-samples", type=int, help="TTFT streams per path (default 200; quick 50)")
    p.add_argument("--gateway-streams", type=int, help="concurrent streaming clients (default 200; quick 50)")
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() the objects that exist after start-up, as a long-running service may (fewer, shorter "
        "full collections); off by default",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.streams = args.streams or (200 if q else 1000)
    args.duration = args.duration or (2.0 if q else 10.0)
    args.kills = args.kills or (5 if q else 30)
    if args.compare_reap_interval is None:
        args.compare_reap_interval = 0.0 if q else 0.25
    args.sizes = args.sizes or ([1000, 10_000] if q else [1000, 10_000, 100_000])
    if args.sweep is None:
        base = args.streams * args.rate
        args.sweep = (
            [int(base * f) for f in (0.5, 1.0, 2.0)]
            if q
            else [10_000, 15_000, 20_000, 25_000, 35_000, 50_000, 75_000, 100_000]
        )
    if args.plot is None and not q:
        args.plot = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "bench-latency.png")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


@contextlib.contextmanager
def redis_target(args: argparse.Namespace) -> Iterator[tuple[str, RedisServer | None]]:
    if args.redis_url:
        yield args.redis_url, None
        return
    if redis_server_binary() is None:
        raise SystemExit("redis-server not found: install it, set FLO_REDIS_SERVER, or pass --redis-url")
    with RedisServer() as server:
        yield server.url, server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the throwaway redis-server and workers are stopped.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    with redis_target(args) as (url, server):
        client = redis.Redis.from_url(url)
        env = Env(args, url, client, server, random.Random(args.seed))
        meta = machine_facts(client)
        meta.update(
            {
                "command": shlex.join(["python", "scripts/bench.py", *(sys.argv[1:] if argv is None else argv)]),
                "redis": "embedded redis-server" if server else "external (--redis-url)",
                "quick": args.quick,
                "gc_freeze": args.gc_freeze,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            }
        )
        cpu = CpuMeter(server.pid if server else None)
        results: dict[str, Any] = {"meta": meta}
        sections = args.sections
        if "single" in sections:
            env.log("single-stream latency ...")
            results["single"] = bench_single(env)
        if "fleet" in sections:
            env.log("fleet load ...")
            results["fleet"] = bench_fleet(env)
        contexts = None
        if "scaling" in sections:
            env.log("stats/orphans scaling ...")
            results["scaling"] = sc = bench_scaling(env, keep="ceiling" in sections)
            contexts = (sc["ns"], sc["worker_id"], sc["sizes"][-1])
        if "ceiling" in sections:
            env.log("server ceiling (redis-benchmark) ...")
            results["ceiling"] = bench_ceiling(env, contexts)
        if "scaling" in results:
            cleanup(client, results["scaling"].pop("ns"))
        if "memory" in sections:
            env.log("memory per request ...")
            results["memory"] = bench_memory(env)
        if "takeover" in sections:
            env.log("takeover latency ...")
            results["takeover"] = bench_takeover(env)
        if "gateway" in sections:
            env.log("gateway TTFT and throughput ...")
            results["gateway"] = bench_gateway(env)
        meta["cpu"] = cpu.report()
        meta["loadavg_end"] = list(os.getloadavg())
        meta["elapsed_s"] = time.time() - started
        client.close()
    figs = figures(results)
    results["figures"] = [fig.__dict__ for fig in figs]
    print(render(figs))
    c = meta["cpu"]
    print(
        f"\n{meta['nproc']} x {meta['cpu_model']}, Redis {meta['redis_version']}, Python {meta['python']}; "
        f"{meta['elapsed_s']:.0f}s; CPU busy {c['machine_busy_cores']:.2f} cores (bench {c['bench_cores']:.2f}, "
        f"redis {c['redis_cores']:.2f}, other processes {c['other_cores']:.2f})"
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2, default=_json_default)
            fh.write("\n")
    if args.plot and "fleet" in results:
        plot(results, args.plot)
        env.log(f"plot written to {os.path.relpath(args.plot)}")
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, array.array):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
