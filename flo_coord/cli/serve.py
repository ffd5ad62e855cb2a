"""Long-running subcommands: worker, serve-fake-llm; and bench (scripts/bench.py)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from flo_coord.cli.common import (
    UsageError,
    check_redis,
    load,
    pick,
    run,
    setup_logging,
    unused_backends,
    wait_for_redis,
)

log = logging.getLogger("flo_coord.cli")

# --------------------------------------------------------------------- worker


def cmd_worker(args: Any) -> int:
    from flo_coord.store import default_worker_id, validation

    settings = load(args)
    worker_id = pick(args.worker_id, "worker_id", str, "a worker id", "") or default_worker_id()
    validation.worker_id(worker_id, validation.Limits())
    concurrency = pick(args.concurrency, "concurrency", int, "a whole number", 64)
    metrics_port = pick(args.metrics_port, "metrics_port", int, "a TCP port", None)
    if concurrency < 1:
        raise UsageError(f"concurrency must be at least 1, got {concurrency}")
    if metrics_port is not None and not 0 <= metrics_port <= 65535:
        raise UsageError(f"metrics port must be 0-65535, got {metrics_port}")
    setup_logging(args, "INFO", worker_id=worker_id)
    if not settings.backends:
        raise UsageError(
            "no backends configured: add --backend NAME=URL,MODEL[,KIND] (e.g. Vllm=http://localhost:8000,llama) "
            "or [[backends]] in the TOML file (--config or FLO_CONFIG)"
        )
    _register_secrets(settings)
    for name in unused_backends(settings):
        log.warning("backend %s is configured but not in failover.fallback_order: it is never used", name)
    metrics = None
    if metrics_port is not None:
        from flo_coord.metrics import WorkerMetrics

        metrics = WorkerMetrics()
        try:
            bound = metrics.serve(metrics_port, args.metrics_addr)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {args.metrics_addr}:{metrics_port}: {exc.strerror}") from None
        log.info("metrics on http://%s:%d/metrics", args.metrics_addr, bound)
    try:
        check_redis(settings.redis.url, unreachable_ok=True)  # a bad URL or credentials: exit 2; down: wait
        _check_functions(settings)
        return run(_worker(settings, worker_id, concurrency, args.grace, metrics, args.exit_with_parent))
    finally:
        if metrics is not None:
            metrics.stop()


def _check_functions(settings: Any) -> None:
    """Exit at start (code 2, one line) when the Functions library is missing and cannot be loaded."""
    import redis.exceptions as rex

    from flo_coord.store import connect, ensure_functions

    client = connect(settings.redis.url)
    try:
        ensure_functions(client, settings.redis.namespace)
    except (rex.ConnectionError, rex.TimeoutError, OSError):
        pass  # Redis is down: the worker waits for it, and its shell loads the library on first use
    finally:
        client.close()


def _register_secrets(settings: Any) -> None:
    """Every credential the worker holds is redacted from its logs and stored errors (flo_coord.redact)."""
    from flo_coord.redact import register_backend_secrets

    for spec in settings.backends:
        register_backend_secrets(spec)


async def watch_parent(stop: Any, interval: float = 0.5) -> None:
    """Call ``stop()`` once the process that started this one exits (polled every ``interval`` seconds)."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(interval)
    log.warning("parent process %d exited; stopping", parent)
    stop()


async def _worker(
    settings: Any, worker_id: str, concurrency: int, grace: float, metrics: Any, exit_with_parent: bool
) -> int:
    from flo_coord.execution.coordinator import Coordinator
    from flo_coord.execution.worker import Worker

    manager = None
    if metrics is not None:
        from flo_coord.store.facade import AsyncFailoverManager

        options = settings.manager_options()
        manager = AsyncFailoverManager(settings.failover, worker_id=worker_id, observer=metrics, **options)
        metrics.track_active(manager)
    options = settings.coordinator_options()
    coordinator = Coordinator(**options, manager=manager, worker_id=worker_id, concurrency=concurrency)
    worker = Worker(coordinator, concurrency=concurrency, grace=grace)
    worker.install_signal_handlers()
    watch = asyncio.create_task(watch_parent(worker.request_stop)) if exit_with_parent else None
    backends = ", ".join(f"{s.name}={s.safe_url} ({s.model})" for s in settings.backends)  # no URL credentials
    log.info("backends: %s; lease %.1fs; concurrency %d", backends, settings.ownership.lease_ttl, concurrency)
    try:
        if not await wait_for_redis(worker.manager, settings.redis.url, worker.stopping):
            log.info("stopped while waiting for Redis")
            await coordinator.aclose()
            return 0
        # The group exists from here on, so anything submitted now is taken (Worker.run creates it too).
        await worker.manager.queue.ensure_group()
        log.info("ready: worker %s taking requests from namespace %s", worker_id, settings.redis.namespace)
        await worker.run()
    finally:
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
    return 0


# ------------------------------------------------------------- serve-fake-llm


def cmd_fake_llm(args: Any) -> int:
    from flo_coord.cli.reference import fault_grammar
    from flo_coord.testing import fakellm

    argv = [
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--token-delay",
        str(args.token_delay),
        "--tokens",
        str(args.tokens),
    ]
    for value in args.fault:
        model, sep, spec = value.partition("=")
        if not sep or not model:
            raise UsageError(f"--fault must look like MODEL=SPEC (e.g. my-model=cut:5), got {value!r}")
        try:
            fakellm.parse_fault(spec)
        except ValueError as exc:
            valid = ", ".join(grammar for grammar, _ in fault_grammar())
            raise UsageError(f"--fault {value!r}: {exc}; SPEC is one of {valid} (optionally *TIMES)") from None
        argv += ["--fault", value]
    for value in args.model_delay:
        model, sep, delay = value.partition("=")
        try:
            if not sep or not model or float(delay) < 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"--model-delay must look like MODEL=SECONDS, got {value!r}") from None
        argv += ["--model-delay", value]
    try:
        fakellm.main(argv)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


# ---------------------------------------------------------------------- bench


def _bench_script() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "scripts" / "bench.py", Path.cwd() / "scripts" / "bench.py"]
    return next((p for p in candidates if p.is_file()), None)


def _load_script(path: Path, name: str) -> Any:
    """Import the script at ``path`` as module ``name``.

    The module is registered in ``sys.modules`` before it runs, as a regular import would: ``dataclasses`` (and
    ``typing.get_type_hints``) look a class's module up there to resolve string annotations, and fail without it.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def cmd_bench(args: Any) -> int:
    path = _bench_script()
    if path is None:
        raise UsageError(
            "bench runs scripts/bench.py from a source checkout, and none was found; "
            "run it from the repository root (git clone, then flo-coord bench)"
        )
    module = _load_script(path, "flo_coord_bench")
    main = getattr(module, "main", None)
    if main is None:
        raise UsageError(f"{path} has no main(argv) function")
    forwarded = list(args.bench_args)
    if forwarded[:1] == ["--"]:
        forwarded = forwarded[1:]
    result = main(forwarded)
    return int(result or 0)
