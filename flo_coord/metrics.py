"""Prometheus metrics of one worker (the optional ``metrics`` extra: ``pip install 'flo-coord[metrics]'``).

``prometheus_client`` is imported only when metrics are created, so the package works
without it. ``WorkerMetrics`` is a ``StoreObserver`` (``flo_coord.store.observer``): hand
it to a facade, ``AsyncFailoverManager(..., observer=metrics)``, and the facade reports
the calls a Coordinator makes through it (starts, appends, attempts, claims, heartbeats,
finishes); ``track_active(manager)`` adds the gauges read at each scrape. ``worker
--metrics-port`` does exactly that and serves ``/metrics`` (README "Metrics and logs").
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from flo_coord.errors import FloCoordError
from flo_coord.store import StoreObserver

if TYPE_CHECKING:
    from flo_coord.store.facade import AsyncFailoverManager

#: (name as exposed, type, help). Counters are exposed with the ``_total`` suffix.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("flo_active_requests", "gauge", "Requests this worker owns right now"),
    ("flo_requests_started_total", "counter", "Requests this worker started tracking"),
    ("flo_requests_finished_total", "counter", "Requests this worker finished, by state (completed|failed)"),
    ("flo_takeovers_total", "counter", "Requests this worker took over after their owner's lease expired"),
    ("flo_takeover_prefix_chars_total", "counter", "Committed answer characters carried over by takeovers"),
    ("flo_failover_attempts_total", "counter", "Backend attempts, by backend and result"),
    ("flo_append_latency_seconds", "histogram", "Time for a chunk's commit to be acknowledged by Redis"),
    ("flo_committed_chars_total", "counter", "Answer characters committed by this worker"),
    ("flo_lease_renewals_total", "counter", "Leases renewed by heartbeats"),
    ("flo_lease_lost_total", "counter", "Writes refused because another worker owns the request now"),
    ("flo_redis_available", "gauge", "1 while Redis answers this worker, 0 during an outage"),
    ("flo_redis_outages", "gauge", "Outages this worker has seen since it started (Redis stopped answering)"),
    ("flo_redis_last_success_age_seconds", "gauge", "Seconds since Redis last answered this worker"),
)

_APPEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class MetricsUnavailableError(FloCoordError, ImportError):
    """prometheus_client is not installed."""

    def __init__(self) -> None:
        super().__init__("metrics need prometheus-client: pip install 'flo-coord[metrics]'")


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise MetricsUnavailableError() from None
    return prometheus_client


def available() -> bool:
    try:
        _prometheus()
    except MetricsUnavailableError:
        return False
    return True


class WorkerMetrics(StoreObserver):
    """The metrics of one worker, in a registry of their own (several workers may share a process).

    ``registry``: a ``prometheus_client.CollectorRegistry`` (default: a new one). Raises
    MetricsUnavailableError without prometheus_client. Names, types and help: ``METRICS``.
    """

    def __init__(self, registry: Any = None) -> None:
        prom = _prometheus()
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        reg = {"registry": self.registry}
        self.active = prom.Gauge("flo_active_requests", METRICS[0][2], **reg)
        self.started = prom.Counter("flo_requests_started", METRICS[1][2], **reg)
        self.finished = prom.Counter("flo_requests_finished", METRICS[2][2], ["state"], **reg)
        self.takeovers = prom.Counter("flo_takeovers", METRICS[3][2], **reg)
        self.takeover_prefix_chars = prom.Counter("flo_takeover_prefix_chars", METRICS[4][2], **reg)
        self.attempts = prom.Counter("flo_failover_attempts", METRICS[5][2], ["backend", "result"], **reg)
        self.append_latency = prom.Histogram(
            "flo_append_latency_seconds", METRICS[6][2], buckets=_APPEND_BUCKETS, **reg
        )
        self.committed_chars = prom.Counter("flo_committed_chars", METRICS[7][2], **reg)
        self.lease_renewals = prom.Counter("flo_lease_renewals", METRICS[8][2], **reg)
        self.lease_lost = prom.Counter("flo_lease_lost", METRICS[9][2], **reg)
        self.redis_available = prom.Gauge("flo_redis_available", METRICS[10][2], **reg)
        self.redis_outages = prom.Gauge("flo_redis_outages", METRICS[11][2], **reg)
        self.redis_last_success_age = prom.Gauge("flo_redis_last_success_age_seconds", METRICS[12][2], **reg)
        self._server: Any = None

    def track_active(self, manager: AsyncFailoverManager) -> None:
        """Report ``manager``'s held requests as the active gauge, read at each scrape."""
        self.active.set_function(lambda: len(manager.held()))
        health = manager.health
        self.redis_available.set_function(lambda: 1.0 if health.available else 0.0)
        self.redis_outages.set_function(lambda: float(health.outages))
        self.redis_last_success_age.set_function(
            lambda: time.monotonic() - health.last_success if health.last_success is not None else float("nan")
        )

    # ------------------------------------------------ StoreObserver: what the facade reports

    def on_started(self) -> None:
        self.started.inc()

    def on_appended(self, chars: int, seconds: float) -> None:
        self.append_latency.observe(seconds)
        self.committed_chars.inc(chars)

    def on_lease_lost(self) -> None:
        self.lease_lost.inc()

    def on_attempt(self, backend: str, result: str) -> None:
        self.attempts.labels(backend=backend, result=result).inc()

    def on_claimed(self, prefix_chars: int) -> None:
        self.takeovers.inc()
        self.takeover_prefix_chars.inc(prefix_chars)

    def on_heartbeat(self, renewed: int) -> None:
        self.lease_renewals.inc(renewed)

    def on_finished(self, state: str) -> None:
        self.finished.labels(state=state).inc()

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the bound port.

        ``addr`` defaults to loopback: metrics name backends and workers, so exposing them
        (``addr="0.0.0.0"``, ``--metrics-addr``) is an explicit choice.
        """
        prom = _prometheus()
        started = prom.start_http_server(port, addr=addr, registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None
        return int(self._server.server_port) if self._server is not None else port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def render(self) -> bytes:
        """The exposition text (what ``/metrics`` serves)."""
        return bytes(_prometheus().generate_latest(self.registry))
