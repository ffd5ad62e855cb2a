"""Every default flo_coord uses, in one place (README "Configuration" and docs/OPERATING.md mirror it).

Other modules import these names instead of repeating the values. Units: seconds unless a
name says bytes, ms or a count. The failover policy defaults are batuta's
(``serve::failover::FailoverConfig::default``, failover.rs).
"""

from __future__ import annotations

# ------------------------------------------------------------------------------ Redis

#: Environment variable holding the Redis URL; used when no client or URL is given (the
#: Python API), and as ``[redis] url`` by the CLI (``settings.ENVIRONMENT``).
REDIS_URL_ENV = "FLO_REDIS_URL"
REDIS_URL = "redis://localhost:6379/0"
#: Prefix of every key; two namespaces on one Redis never see each other's requests.
NAMESPACE = "flo"
#: "primary": a write is acknowledged by the primary; "replica": WAIT for one replica too.
DURABILITY = "primary"
#: Connections of one asyncio client built from a URL (Redis's own default maxclients).
MAX_CONNECTIONS = 10_000
#: Socket timeout of clients flo_coord builds from a URL.
SOCKET_TIMEOUT = 5.0

# -------------------------------------------------------------------------- ownership

#: Seconds a worker owns a request without renewing its lease. A dead worker's requests
#: are claimable this long after its last heartbeat.
LEASE_TTL = 5.0
#: Heartbeats run every ``lease_ttl * HEARTBEAT_FRACTION`` seconds (3 renewals per lease).
HEARTBEAT_FRACTION = 1 / 3
#: Seconds between two checks of the cancel flags of the requests a Coordinator holds
#: (``Coordinator.cancel`` from another replica stops the owner's generation within this).
CANCEL_POLL = 0.25
#: Seconds between reaper passes (claiming orphans), as a fraction of the lease. A pass
#: costs one O(log N) index lookup, so reaping often keeps takeover close to the lease.
REAPER_FRACTION = 1 / 20
#: Keys of a request that nobody completes expire after this many seconds.
MAX_AGE = 24 * 3600.0
#: A finished request's answer, outcome and chunk feed are kept this long for ``follow``.
RETENTION = 3600.0
#: A follower's notification feed lives this long after its last read.
FEED_TTL = 60.0
#: How often (seconds) a blocked ``follow`` re-checks the request while nothing arrives.
FOLLOW_POLL = 1.0
#: The attempt history stream keeps exactly the newest entries (XADD MAXLEN).
HISTORY_MAXLEN = 100
#: Seconds ``Coordinator.aclose`` spends handing requests back (all at once) before it
#: gives up on the rest and reports them (their leases then expire).
HAND_BACK_TIMEOUT = 3.0

# ---------------------------------------------------------------------- Redis faults

#: Total seconds one idempotent operation may spend retrying transient Redis faults.
RETRY_DEADLINE = 10.0
#: First and largest pause between retries (exponential with full jitter in between).
RETRY_INITIAL = 0.05
RETRY_MAX = 1.0
#: Waiting out a Redis outage (workers, heartbeats, reaper): first and largest pause
#: between tries, exponential with full jitter in between.
OUTAGE_BACKOFF_INITIAL = 0.1
OUTAGE_BACKOFF_MAX = 5.0

# ------------------------------------------------------- failover policy (batuta's)

#: Failovers allowed per request.
MAX_RETRIES = 2
#: Seconds one request may spend failing over.
FAILOVER_TIMEOUT = 30.0
#: Committed tokens (whitespace-separated words) before a takeover continues the answer.
MIN_TOKENS_FOR_RECOVERY = 5
#: ServingBackend names tried in order when a request names no model group.
FALLBACK_ORDER = ("Realizar", "Ollama", "Together", "Groq")

# ------------------------------------------------------- executor (a failing call)

#: Seconds to the first token before failing over.
FIRST_TOKEN_TIMEOUT = 30.0
#: Longest silence (seconds) between two chunks.
STALL_TIMEOUT = 15.0
#: Retries of the same backend after a 5xx.
SAME_BACKEND_RETRIES = 1
#: Waits on the same backend after a 429.
RATE_LIMIT_RETRIES = 2
#: A longer Retry-After (seconds) fails over at once.
RATE_LIMIT_MAX_WAIT = 30.0
#: First and largest backoff (seconds) after a 429 without Retry-After.
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 8.0

# ------------------------------------------------------------------ circuit breaker

#: Failures within ``BREAKER_WINDOW`` seconds that open a backend's shared breaker.
BREAKER_THRESHOLD = 3
BREAKER_WINDOW = 30.0
#: Seconds an open breaker stays open before one probe may try the backend.
BREAKER_COOLDOWN = 10.0
#: Seconds a half-open probe holds its claim (a probe that died frees it after this).
BREAKER_PROBE_TTL = 30.0

# ------------------------------------------------------------------------- backends

#: Seconds to connect to a backend (and to wait for a pooled connection).
CONNECT_TIMEOUT = 5.0
#: Connections per backend pool when neither the spec nor the Coordinator says.
BACKEND_MAX_CONNECTIONS = 1000

#: Seconds a runtime prefill rejection is remembered for every worker (capability memory).
CAPABILITY_TTL = 300.0

# -------------------------------------------------------------------------- gateway

GATEWAY_HOST = "127.0.0.1"
GATEWAY_PORT = 8080
#: Seconds a client that left has to come back before ``on_disconnect = "cancel"`` applies.
DISCONNECT_GRACE = 10.0
#: Seconds a resume (``GET /v1/requests/{id}``) waits for a request to appear.
FOLLOW_WAIT = 5.0

# ----------------------------------------------------------------------- input limits

#: Input limits (configurable through ``Limits``).
MAX_REQUEST_ID_LENGTH = 128
MAX_WORKER_ID_LENGTH = 128
MAX_NAMESPACE_LENGTH = 64
MAX_PROMPT_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 10
MAX_MESSAGES = 1024
#: Backend, model, finish reason and error-kind labels, in UTF-8 bytes.
MAX_LABEL_BYTES = 256
#: A chat message's role, in UTF-8 bytes.
MAX_ROLE_BYTES = 64
#: Largest gateway request body: the largest prompt plus room for the JSON around it.
MAX_BODY_BYTES = MAX_PROMPT_BYTES + 65536
#: Largest duration accepted anywhere (lease, age, retention, timeouts, waits): ten years.
MAX_SECONDS = 10 * 365 * 86400.0
