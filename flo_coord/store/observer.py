"""What a facade reports to an optional observer (metrics, readiness): ``StoreObserver``.

A facade built with ``observer=`` calls these hooks after the calls they name; without
one it calls nothing (one ``is None`` check per call). Hooks run inline, on the caller's
thread or event loop, so they must be quick and must not raise (an exception in a hook
propagates to the caller of the facade method). ``flo_coord.metrics.WorkerMetrics`` is
the Prometheus implementation (README "Metrics and logs").
"""

from __future__ import annotations


class StoreObserver:
    """Hooks a facade calls; every one does nothing here, so an observer overrides only what it needs."""

    def on_started(self) -> None:
        """``start_tracking`` returned: this worker started tracking one request."""

    def on_appended(self, chars: int, seconds: float) -> None:
        """``append_tokens`` returned: ``chars`` characters (``len`` of the text) were
        acknowledged by Redis ``seconds`` (wall time, perf_counter) after the call began."""

    def on_lease_lost(self) -> None:
        """``append_tokens`` raised LeaseLostError: another worker owns the request now."""

    def on_attempt(self, backend: str, result: str) -> None:
        """``record_attempt`` was called with an attempt that has a result: ``backend`` is
        its backend name, ``result`` the ``FailoverResult`` variant name (``Success``,
        ``Timeout``, ``BackendError``, ``NoBackendsAvailable``). Called before the write."""

    def on_claimed(self, prefix_chars: int) -> None:
        """``claim`` or ``claim_orphans`` won one request whose committed answer is ``prefix_chars`` characters."""

    def on_heartbeat(self, renewed: int) -> None:
        """``heartbeat`` returned: ``renewed`` leases were renewed (0 included)."""

    def on_finished(self, state: str) -> None:
        """``complete`` or ``fail`` ended a request: ``state`` is ``"completed"`` or ``"failed"``."""
