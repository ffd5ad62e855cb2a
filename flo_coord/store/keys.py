"""Every Redis key flo_coord uses, in one place.

A request's keys share the hash tag ``{request_id}``, so Redis Cluster puts them in one
slot and one Lua script may touch all of them. Namespace-wide keys (history, index,
breakers, work queue) each live in their own slot; no script touches two slots.
Every key starts with ``<namespace>:``, so the ACL pattern ``~<namespace>:*`` covers all.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestKeys:
    ctx: str  #: hash: the StreamingContext fields (prefix excluded) and ownership
    text: str  #: string: the committed answer text, grown with APPEND
    result: str  #: hash: outcome of a finished request, kept for the retention period
    feed: str  #: stream: commit notifications for followers; exists only while followed


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str

    def request(self, request_id: str) -> RequestKeys:
        tag = f"{self.namespace}:{{{request_id}}}"
        return RequestKeys(ctx=f"{tag}:ctx", text=f"{tag}:text", result=f"{tag}:result", feed=f"{tag}:feed")

    @property
    def history(self) -> str:
        """Stream of FailoverAttempt / Takeover entries, MAXLEN 100."""
        return f"{self.namespace}:history"

    @property
    def active(self) -> str:
        """Sorted set: request id -> lease deadline (ms). A hint; the request hash is the truth."""
        return f"{self.namespace}:active"

    @property
    def queue(self) -> str:
        """Stream of submitted requests that workers take with a consumer group."""
        return f"{self.namespace}:queue"

    def breaker(self, backend: str) -> str:
        """Hash: shared circuit-breaker state of one backend."""
        return f"{self.namespace}:breaker:{backend}"

    def worker(self, worker_id: str) -> str:
        """Hash: liveness record of one worker (for ``top`` and metrics)."""
        return f"{self.namespace}:worker:{worker_id}"

    def gateway(self, request_id: str) -> str:
        """Hash: how the gateway answers one request (object, model, created, include_usage);
        in the request's slot, kept as long as the request may be followed."""
        return f"{self.namespace}:{{{request_id}}}:gw"

    def idempotency(self, key_hash: str) -> str:
        """String: ``<body sha256> <request id>`` of the request an Idempotency-Key started."""
        return f"{self.namespace}:idem:{key_hash}"

    @property
    def workers(self) -> str:
        """Sorted set: worker id -> last seen (ms)."""
        return f"{self.namespace}:workers"
