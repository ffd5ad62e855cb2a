"""Smoke test of the benchmark: ``scripts/bench.py --quick`` runs end to end and reports every figure.

A benchmark smoke test, not a timed test: it checks that every figure is present and a
finite number, never how fast anything is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_redis_server

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"

#: Figures every quick run reports (the sweep and scaling ones depend on the sizes used).
EXPECTED = [
    *(f"single.async.{what}.{p}" for what in ("hset", "batched", "direct") for p in ("p50", "p99")),
    *(f"single.async.ratio_{what}.{p}" for what in ("batched", "direct") for p in ("p50", "p99")),
    *(f"single.sync.{what}.{p}" for what in ("hset", "fenced", "ratio") for p in ("p50", "p99")),
    "fleet.batched.committed",
    "fleet.batched.p50",
    "fleet.batched.p99",
    "fleet.batched.tokens_per_append",
    "fleet.batched.server_us",
    "fleet.naive.committed",
    "fleet.naive.p50",
    "fleet.naive.p99",
    "fleet.naive.never_sent",
    "fleet.naive.saturation",
    "fleet.ratio_vs_naive_same_load",
    "fleet.ratio_vs_naive_saturation",
    "fleet.closed_loop.committed",
    "fleet.closed_loop.p50",
    "fleet.closed_loop.p99",
    "fleet.peak_committed",
    "ceiling.append_rps",
    "ceiling.server_exec_rps",
    "ceiling.fleet_utilisation",
    "ceiling.peak_tokens_fraction",
    "takeover.p50",
    "takeover.p99",
    "takeover.max",
    "takeover.samples",
    "takeover.not_taken_over",
    "memory.empty.total",
    "memory.empty.beyond",
    "memory.1000.total",
    "memory.1000.beyond",
    "memory.1000.beyond_excluding_slack",
    "memory.feed",
    "memory.finished",
    "scaling.stats_p50_ratio",
    "scaling.orphans_p50_ratio",
    "scaling.orphans_expired_p50_ratio",
]
#: Only measured when the redis-benchmark binary exists.
WITH_REDIS_BENCHMARK = ["ceiling.hset_rps", "ceiling.mixed_rps", "ceiling.applied_fraction"]
SIZES = (1000, 10_000)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    require_redis_server()
    out = tmp_path / "tmp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert proc.returncode == 0, f"bench.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(out.read_text())
    figures = {f["key"]: f for f in results["figures"]}

    expected = list(EXPECTED)
    expected += [
        f"scaling.{n}.{what}" for n in SIZES for what in ("stats", "orphans", "orphans_expired", "index_bytes")
    ]
    expected += [
        f"sweep.{round(r['offered_tokens_per_s'])}.{w}"
        for r in results["fleet"]["sweep"]
        for w in ("committed", "p50", "p99")
    ]
    if shutil.which("redis-benchmark"):
        expected += WITH_REDIS_BENCHMARK
    missing = [key for key in expected if key not in figures]
    assert not missing, f"figures missing from the report: {missing}"
    assert len(results["fleet"]["sweep"]) >= 2

    for key, fig in figures.items():
        value = fig["value"]
        assert isinstance(value, int | float) and not isinstance(value, bool), f"{key}: {value!r} is not a number"
        assert math.isfinite(value), f"{key}: {value!r} is not finite"
        assert fig["met"] in (True, False, None), f"{key}: met={fig['met']!r}"
        assert fig["unit"] is not None and fig["label"], key
        if fig["target"]:
            assert fig["met"] is not None, f"{key} has a target but no verdict"

    meta = results["meta"]
    for fact in ("nproc", "cpu_model", "redis_version", "python", "command"):
        assert meta.get(fact), f"machine fact {fact} missing"
    assert "cpu" in meta and all(math.isfinite(v) for v in meta["cpu"].values())
    # the readable table went to stdout, one line per figure
    for fig in results["figures"]:
        assert fig["label"][:40] in proc.stdout, f"{fig['key']} not in the printed table"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_flo_coord_bench_runs_the_real_benchmark(tmp_path: Path) -> None:
    """``flo-coord bench`` loads scripts/bench.py in-process (its dataclasses included) and runs it for real:
    the latency section and a takeover with 2 SIGKILLed worker processes (re-launched from the script's path)."""
    require_redis_server()
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLO_")}
    proc = subprocess.run(
        [sys.executable, "-m", "flo_coord", "bench", "--quick", "--sections", "single,takeover", "--kills", "2",
         "--wave", "2", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"flo-coord bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    figures = {f["key"]: f["value"] for f in json.loads(out.read_text())["figures"]}
    assert figures["takeover.samples"] >= 2 and figures["takeover.not_taken_over"] == 0
    assert 0 < figures["single.async.batched.p50"] <= figures["single.async.batched.p99"]
    assert "takeover" in proc.stdout and "fenced append" in proc.stdout  # the table went to stdout
