"""Every default flo_coord uses, in one place. README's configuration table mirrors this file."""

from __future__ import annotations

#: Environment variable holding the Redis URL; used when no client or URL is given.
REDIS_URL_ENV = "FLO_REDIS_URL"
REDIS_URL = "redis://localhost:6379/0"

#: Prefix of every key; two namespaces on one Redis never see each other's requests.
NAMESPACE = "flo"

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

#: Total seconds one idempotent operation may spend retrying transient Redis faults.
RETRY_DEADLINE = 10.0
#: First and largest pause between retries (exponential with full jitter in between).
RETRY_INITIAL = 0.05
RETRY_MAX = 1.0
#: Waiting out a Redis outage (workers, heartbeats, reaper): first and largest pause
#: between tries, exponential with full jitter in between.
OUTAGE_BACKOFF_INITIAL = 0.1
OUTAGE_BACKOFF_MAX = 5.0
#: Seconds ``Coordinator.aclose`` spends handing requests back (all at once) before it
#: gives up on the rest and reports them (their leases then expire).
HAND_BACK_TIMEOUT = 3.0
#: Connections of one asyncio client built from a URL (Redis's own default maxclients).
MAX_CONNECTIONS = 10_000
#: Socket timeout of clients flo_coord builds from a URL.
SOCKET_TIMEOUT = 5.0

#: Input limits (configurable through ``Limits``).
MAX_REQUEST_ID_LENGTH = 128
MAX_WORKER_ID_LENGTH = 128
MAX_NAMESPACE_LENGTH = 64
MAX_PROMPT_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 10
MAX_MESSAGES = 1024
