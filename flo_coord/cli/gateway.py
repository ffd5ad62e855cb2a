"""``flo-coord serve``: the OpenAI-compatible gateway, which is also a worker (docs/GATEWAY.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

import msgspec

from flo_coord.cli.common import UsageError, check_redis, load, pick, setup_logging, wait_for_redis

log = logging.getLogger("flo_coord.cli")


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, plus: the first SIGTERM/SIGINT starts the gateway's drain."""

        def __init__(self, config: Any, front: Any, grace: float) -> None:
            super().__init__(config)
            self.front, self.grace = front, grace
            self.draining: asyncio.Task[None] | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if self.draining is None:
                streams = len(self.front.live)
                log.info("signal %d: draining %d local streams for %.1fs, then handing back", sig, streams, self.grace)
                self.draining = asyncio.get_running_loop().create_task(self.front.drain(self.grace))

    return Server


def gateway_settings(args: Any, settings: Any) -> Any:
    """The [gateway] section with the flags applied (flags > env > TOML > defaults)."""
    flags = {
        "host": args.host,
        "port": args.port,
        "on_disconnect": args.on_disconnect,
        "disconnect_grace": args.disconnect_grace,
        "cors_origins": args.cors_origin or None,
        "keys_env": args.key_env or None,
    }
    changes = {name: value for name, value in flags.items() if value is not None}
    return msgspec.structs.replace(settings.gateway, **changes)


def bearer_keys(gateway: Any, environ: dict[str, str] | None = None, source: str = "[gateway] keys_env") -> set[str]:
    """SHA-256 digests of the accepted keys: from the variables named by ``keys_env`` and
    ``key_hashes``. A named variable that is unset or empty is a usage error naming
    ``source``, where the names came from (the TOML key, or ``--key-env``)."""
    from flo_coord.store import key_hash

    environ = dict(os.environ) if environ is None else environ
    digests = {h.removeprefix("sha256:") for h in gateway.key_hashes}
    for name in gateway.keys_env:
        value = environ.get(name, "")
        if not value:
            raise UsageError(f"{source} names ${name}, which is not set")
        digests.add(key_hash(value))
    return digests


def check_port(host: str, port: int) -> None:
    """UsageError (exit 2, one line) when ``host``:``port`` cannot be listened on (in use, not
    an address of this machine, privileged), checked before waiting for Redis, as uvicorn binds
    (SO_REUSEADDR: a port in TIME_WAIT is free). Port 0 (any free port) is not checked."""
    import errno
    import socket

    if port == 0:
        return
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use") from None
        raise UsageError(f"cannot listen on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}") from None


def cmd_serve(args: Any) -> int:
    from flo_coord.store import default_worker_id, validation

    settings = load(args)
    gateway = gateway_settings(args, settings)
    worker_id = pick(args.worker_id, "worker_id", str, "a worker id", "") or default_worker_id()
    validation.worker_id(worker_id, validation.Limits())
    setup_logging(args, "INFO", worker_id=worker_id)
    if not settings.backends:
        raise UsageError(
            "no backends configured: add --backend NAME=URL,MODEL[,KIND] (e.g. Vllm=http://localhost:8000,llama) "
            "or [[backends]] in the TOML file (--config or FLO_CONFIG)"
        )
    keys = bearer_keys(gateway, source="--key-env" if args.key_env else "[gateway] keys_env")
    check_port(gateway.host, gateway.port)
    check_redis(settings.redis.url, unreachable_ok=True)  # a bad URL or credentials: exit 2; down: wait
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(settings, gateway, worker_id, keys, args))


async def _redis_or_signal(manager: Any, url: str) -> bool:
    """Wait for Redis (an outage of any length) before serving; False on SIGTERM/SIGINT meanwhile.
    The handlers are ours only while waiting: uvicorn installs its own when it starts."""
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        ready = await wait_for_redis(manager, url, stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    if not ready:
        log.info("stopped while waiting for Redis")
    return ready


async def _run_server(server: Any) -> None:
    """uvicorn's ``serve``, without its ``sys.exit(3)`` when it cannot start (it logged why;
    e.g. the port was taken after ``check_port``): the caller reports it as a usage error."""
    with contextlib.suppress(SystemExit):
        await server.serve()


def _loop_factory() -> Any:
    """uvloop's event loop when installed (the gateway extra brings it): less time per event."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(settings: Any, gateway: Any, worker_id: str, keys: set[str], args: Any) -> int:
    import uvicorn

    from flo_coord.execution.coordinator import Coordinator
    from flo_coord.gateway import Gateway
    from flo_coord.gateway.metrics import GatewayMetrics
    from flo_coord.store.facade import AsyncFailoverManager

    metrics = GatewayMetrics()
    options = settings.manager_options()
    manager = AsyncFailoverManager(settings.failover, worker_id=worker_id, observer=metrics, **options)
    metrics.track_active(manager)
    if not await _redis_or_signal(manager, settings.redis.url):
        await manager.aclose()
        return 0
    coordinator = Coordinator(**settings.coordinator_options(), manager=manager)
    grouped = {entry.name for group in coordinator.router.groups.values() for entry in group.entries}
    for name in coordinator.backends:
        if name not in grouped:  # only with [[models]]: the default groups hold every deployment
            log.warning("backend %s is in no model group ([[models]]): the gateway never uses it", name)
    front = Gateway(
        coordinator,
        gateway,
        keys=keys,
        retention=settings.ownership.max_age,
        metrics=metrics,
        reap_interval=args.reap_interval,
    )
    config = uvicorn.Config(
        front.app(),
        host=gateway.host,
        port=gateway.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(args.grace) + 5,  # a backstop: drain() ends our streams first
        lifespan="on",
    )
    server = _server_class()(config, front, args.grace)
    task = asyncio.create_task(_run_server(server))
    watch = None
    if args.exit_with_parent:
        from flo_coord.cli.serve import watch_parent

        # as a SIGTERM would: drain, then stop (a demo's replicas never outlive the demo)
        watch = asyncio.create_task(watch_parent(lambda: server.handle_exit(signal.SIGTERM, None)))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        auth = "bearer keys required" if keys else "no authentication"
        log.info("serving on http://%s:%d (worker %s, %s)", host, port, worker_id, auth)
        print(f"flo-coord serve: listening on http://{host}:{port} as {worker_id}", file=sys.stdout, flush=True)
    await task
    if watch is not None:
        watch.cancel()
    if not server.started:
        check_port(gateway.host, gateway.port)  # the usual reason, in the usual words
        raise UsageError(f"could not start listening on {gateway.host}:{gateway.port} (see the error above)")
    return 0
