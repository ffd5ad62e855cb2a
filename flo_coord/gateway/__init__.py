"""``flo-coord serve``: an OpenAI-compatible HTTP gateway on every replica (docs/GATEWAY.md).

Needs the ``gateway`` extra (starlette, uvicorn, prometheus-client).
"""

from __future__ import annotations

from flo_coord.gateway.app import Gateway, HTTPError, failure
from flo_coord.store import IdempotencyConflictError, Presentation

__all__ = ["Gateway", "HTTPError", "IdempotencyConflictError", "Presentation", "failure"]
