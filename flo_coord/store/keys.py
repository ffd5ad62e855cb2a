"""Every Redis key flo_coord uses, in one place.

A request's keys share the hash tag ``{request_id}``, so Redis Cluster puts them in one
slot and one Lua script may touch all of them. Namespace-wide keys (history, index,
breakers, work queue) each live in their own slot; the in-flight counts of every
deployment share one (``{<namespace>:inflight}``) so one script picks among them; no script
touches two slots. Every key starts with ``<namespace>:``, so the ACL pattern
``~<namespace>:*`` covers all. The layout is README "Key layout" and docs/OPERATING.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestKeys:
    """The four keys of one request, all in the slot of its hash tag ``{request_id}``."""

    ctx: str  #: hash: the StreamingContext fields (prefix excluded) and ownership
    text: str  #: string: the committed answer text, grown with APPEND
    result: str  #: hash: outcome of a finished request, kept for the retention period
    feed: str  #: stream: commit notifications for followers; exists only while followed


@dataclass(frozen=True, slots=True)
class Keys:
    """The key names of one ``namespace`` (a validated namespace: no braces, no spaces).

    Every method returns a key name (str); none touches Redis.
    """

    namespace: str

    def request(self, request_id: str) -> RequestKeys:
        """The keys of request ``request_id``: ``<namespace>:{<request_id>}:ctx|text|result|feed``."""
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
        """Hash: shared circuit-breaker state of one backend (deployment name)."""
        return f"{self.namespace}:breaker:{backend}"

    def capability(self, backend: str, capability: str) -> str:
        """String with a PX expiry: ``backend`` (a deployment name) was seen unable to do
        ``capability`` (e.g. "prefill"); every worker skips it for that while."""
        return f"{self.namespace}:capability:{backend}:{capability}"

    def inflight(self, deployment: str) -> str:
        """Sorted set: ``<worker>/<request>`` -> deadline (ms) of the calls in flight on one
        deployment. Every deployment's set shares the slot ``{<namespace>:inflight}``."""
        return f"{self.namespace}:{{{self.namespace}:inflight}}:{deployment}"

    def worker(self, worker_id: str) -> str:
        """Hash: liveness record of one worker (for ``top`` and metrics)."""
        return f"{self.namespace}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        """Sorted set: worker id -> last seen (ms)."""
        return f"{self.namespace}:workers"

    def gateway(self, request_id: str) -> str:
        """Hash: how the gateway answers one request (object, model, created, include_usage);
        in the request's slot, kept as long as the request may be followed."""
        return f"{self.namespace}:{{{request_id}}}:gw"

    def idempotency(self, key_hash: str) -> str:
        """String: ``<body sha256> <request id>`` of the request an Idempotency-Key started."""
        return f"{self.namespace}:idem:{key_hash}"

    def probe(self) -> RequestKeys:
        """The keys ``functions.ensure`` reads at start to see whether flo_coord's library is
        loaded: those of request ``flo-probe`` (only ever read, so a real request of that id is safe)."""
        return self.request("flo-probe")

    @staticmethod
    def wait_anchor(key: str) -> str:
        """String: the key ``durability = "replica"`` writes (``SET <key>:wait``) before ``WAIT``,
        so the WAIT follows a write in the slot of ``key`` (the batch's first durable key)."""
        return f"{key}:wait"
