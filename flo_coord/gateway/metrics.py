"""The gateway's Prometheus metrics, in the same registry as its worker's (one /metrics)."""

from __future__ import annotations

import time
from typing import Any

from flo_coord.metrics import WorkerMetrics, _prometheus


class GatewayMetrics(WorkerMetrics):
    """WorkerMetrics plus HTTP requests by route and status, and open streams; and, for
    ``/readyz``, ``last_heartbeat``: when (``time.monotonic()``) a heartbeat last returned."""

    last_heartbeat: float | None = None

    def __init__(self, registry: Any = None) -> None:
        super().__init__(registry)
        prometheus = _prometheus()
        self.requests = prometheus.Counter(
            "flo_gateway_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.streams = prometheus.Gauge("flo_gateway_streams", "SSE streams open now", registry=self.registry)

    def on_heartbeat(self, renewed: int) -> None:
        super().on_heartbeat(renewed)
        self.last_heartbeat = time.monotonic()
