"""Lua scripts: every read-then-write flo_coord does on Redis is one of these.

Every ``Script`` made joins ``registry()``; flo_coord.store.functions turns the registry into one
Redis Functions library run with FCALL (EVALSHA where Redis has no Functions). Define
scripts in this module, so that ``flo-coord install-functions`` (which imports only this
module) loads them all; names must be unique (they name the functions).
Per-request scripts take the request's keys in one fixed order, all in one hash slot:

    KEYS[1] ctx   KEYS[2] result   KEYS[3] text   KEYS[4] feed

Times come from the Redis server clock (``TIME``), in milliseconds.
Replies start with a status: OK, DUP (seq already applied), LOST (fenced out),
GONE (no such request) or LIVE (lease not expired). Data that flo_coord did not write
aborts the script with an error starting ``FLOCORRUPT`` before anything changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())
        _REGISTERED[self.name] = self
        _created[0] += 1


_REGISTERED: dict[str, Script] = {}
_created = [0]


def registry() -> tuple[Script, ...]:
    """Every script defined so far, in definition order (flo_coord.store.functions loads them all)."""
    return tuple(_REGISTERED.values())


def registry_version() -> tuple[int, int]:
    """Changes whenever ``registry()`` may have: (scripts made so far, scripts registered now).

    A cheap check for the callers that cache what they derive from the registry (the
    library's function names); the second number catches a script taken out again.
    """
    return _created[0], len(_REGISTERED)


_PRELUDE = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Every number flo_coord stores is an integer below 2^53 (ms, epochs, counts): nan, inf,
-- 1e400, 1.5 or 40 digits are foreign data, refused here rather than compared or returned.
local function num(v, what)
  if not v then return 0 end
  local n = tonumber(v)
  if n == nil or n ~= n or math.abs(n) >= 2^53 or n ~= math.floor(n) then
    error('FLOCORRUPT field ' .. what .. ' is not an integer')
  end
  return n
end
-- A key written later in a script must have the right type before the first write: a
-- script that fails half-way keeps its earlier writes (Redis does not roll back).
local function expect_type(key, t)
  if redis.call('EXISTS', key) == 1 and redis.call('TYPE', key)['ok'] ~= t then
    error('FLOCORRUPT key ' .. key .. ' is not a ' .. t)
  end
end
-- A breaker state must be one flo_coord writes.
local function breaker_state(v)
  if v and v ~= 'closed' and v ~= 'open' and v ~= 'half_open' then error('FLOCORRUPT breaker state') end
  return v or 'closed'
end
-- Why a write was refused: the request is gone, finished by someone, or owned by another.
local function refusal(ctx, result)
  if redis.call('EXISTS', ctx) == 1 then error('FLOCORRUPT ownership fields missing') end
  local r = redis.call('HMGET', result, 'owner', 'epoch')
  if r[2] then return {'LOST', r[1] or '', r[2], 1} end
  return {'GONE'}
end
-- nil when (owner, epoch) holds the request, else the refusal reply.
local function fence(ctx, result, owner, epoch)
  local f = redis.call('HMGET', ctx, 'owner', 'epoch')
  if not f[2] then return refusal(ctx, result) end
  if f[1] ~= owner or num(f[2], 'epoch') ~= tonumber(epoch) then return {'LOST', f[1] or '', f[2], 0} end
  return nil
end
"""


def _script(name: str, body: str) -> Script:
    return Script(name, _PRELUDE + body)


# Fenced intake: create a request only if nobody ever created it (no context, no outcome).
_START_BODY = r"""
local now = now_ms()
local epoch = old + 1
local lease = now + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'request_id', ARGV[1], 'prompt', ARGV[2], 'primary_backend', ARGV[3],
  'owner', ARGV[4], 'epoch', epoch, 'lease', lease, 'last_seq', 0, 'token_count', 0,
  'state', 'Pending', 'created', now, 'messages', ARGV[7], 'max_tokens', ARGV[8], 'params', ARGV[9] or '',
  'model_group', ARGV[10] or '')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('SET', KEYS[3], '', 'PX', ARGV[6])
return {'OK', epoch, lease, now}
"""

START = _script(
    "start",
    r"""
-- Track a request, overwriting any previous one with this id (as the original does).
-- ARGV: request_id, prompt, primary_backend, owner, lease_ttl_ms, max_age_ms, messages_json, max_tokens,
--       params_json, model_group (both may be absent or empty)
local old = math.max(num(redis.call('HGET', KEYS[1], 'epoch'), 'epoch'),
                     num(redis.call('HGET', KEYS[2], 'epoch'), 'epoch'))
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
"""
    + _START_BODY,
)

START_NEW = _script(
    "start_new",
    r"""
-- Start a queued request: refused (EXISTS) when the request exists or has an outcome,
-- so a late or duplicate queue delivery can never overwrite or redo a request.
-- ARGV: as START
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return {'EXISTS'} end
local old = 0
"""
    + _START_BODY,
)

REJECT = _script(
    "reject",
    r"""
-- End a request that cannot be run (a poison queue entry or a corrupt stored context) as
-- Failed, so its followers see why. Refused (EXISTS) when it already has an outcome, and
-- (LIVE) when its context names a live lease: only a request nobody runs is ended here.
-- ARGV: owner, error, error_kind, retention_ms
if redis.call('EXISTS', KEYS[2]) == 1 then return {'EXISTS'} end
local epoch = 1
-- pcall: a key of another type is foreign data, replaced (no TYPE: the worker ACL lacks it)
local read, f = pcall(redis.call, 'HMGET', KEYS[1], 'lease', 'epoch')
if read then
  local lease, old = tonumber(f[1] or ''), tonumber(f[2] or '')
  if lease and old and lease > now_ms() then return {'LIVE', f[2]} end
  if old and old == old and old >= 0 and old < 2^53 then epoch = math.floor(old) + 1 end
end
redis.call('DEL', KEYS[1])
local got, text = pcall(redis.call, 'GET', KEYS[3])
if not got then redis.call('DEL', KEYS[3]); text = false end
redis.call('HSET', KEYS[2], 'state', 'Failed', 'owner', ARGV[1], 'epoch', epoch, 'error', ARGV[2],
  'error_kind', ARGV[3], 'backend', '', 'model', '', 'token_count', 0, 'finished', now_ms())
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], text or '', 'PX', ARGV[4])
if not pcall(redis.call, 'XADD', KEYS[4], 'MAXLEN', '~', 32, '*', 'end', 'Failed') then
  redis.call('DEL', KEYS[4])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 32, '*', 'end', 'Failed')
end
redis.call('PEXPIRE', KEYS[4], ARGV[4])
return {'OK', epoch}
""",
)

# The fenced append of one request, shared by APPEND and APPEND_MANY.
_APPEND_ONE = r"""
-- Append committed text, fenced by (owner, epoch); a seq not above the last applied one
-- is acknowledged without being applied again (retry after a lost reply).
-- One HMGET reads every field it needs and one EXISTS serves both the feed's type check and
-- its notification: each redis.call is server time on every token.
local function append_one(ctx, result, text, feed, owner, epoch, seq, chunk, increment)
  local f = redis.call('HMGET', ctx, 'owner', 'epoch', 'last_seq', 'state', 'token_count')
  if not f[2] then return refusal(ctx, result) end
  if f[1] ~= owner or num(f[2], 'epoch') ~= tonumber(epoch) then return {'LOST', f[1] or '', f[2], 0} end
  seq = tonumber(seq)
  local last = num(f[3], 'last_seq')
  local followed = redis.call('EXISTS', feed) == 1
  if followed and redis.call('TYPE', feed)['ok'] ~= 'stream' then
    error('FLOCORRUPT key ' .. feed .. ' is not a stream')
  end
  local tokens = num(f[5], 'token_count')  -- checked first, so HINCRBY cannot fail after APPEND
  if seq <= last then
    return {'DUP', last, redis.call('STRLEN', text), tokens}
  end
  local len = redis.call('APPEND', text, chunk)
  local count = redis.call('HINCRBY', ctx, 'token_count', increment)
  if f[4] == 'Pending' then
    redis.call('HSET', ctx, 'last_seq', seq, 'state', 'Streaming')
  else
    redis.call('HSET', ctx, 'last_seq', seq)
  end
  if followed then
    redis.call('XADD', feed, 'MAXLEN', '~', 32, '*', 'n', len)
  end
  return {'OK', seq, len, count}
end
"""

APPEND = _script(
    "append",
    _APPEND_ONE
    + r"""
-- ARGV: owner, epoch, seq, text, token_increment
return append_one(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
""",
)

APPEND_MANY = _script(
    "append_many",
    _APPEND_ONE
    + r"""
-- The appends of several requests in one call (one Redis, never a Cluster: the keys span
-- slots). KEYS: 4 per request, in the usual order. ARGV: count, then per request the 5
-- APPEND arguments. Replies: one APPEND reply per request; a request whose data is
-- corrupt gets its own error reply and does not disturb the others.
local replies = {}
for i = 1, tonumber(ARGV[1]) do
  local k, a = (i - 1) * 4, 1 + (i - 1) * 5
  local done, reply = pcall(append_one, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4],
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5])
  if done then
    replies[i] = reply
  else
    if type(reply) == 'table' then reply = reply.err or 'error' end
    replies[i] = redis.error_reply(tostring(reply))
  end
end
return replies
""",
)

HEARTBEAT = _script(
    "heartbeat",
    r"""
-- Renew the lease of one request this worker holds. ARGV: owner, epoch, lease_ttl_ms
local refused = fence(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if refused then return refused end
local lease = now_ms() + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease', lease)
return {'OK', lease}
""",
)

UPDATE = _script(
    "update",
    r"""
-- Fenced field updates. ARGV: owner, epoch, then name/value pairs; the name
-- '+failed' adds a backend to the comma-separated failed_backends set.
local refused = fence(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if refused then return refused end
for i = 3, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if name == '+failed' then
    local cur = redis.call('HGET', KEYS[1], 'failed_backends') or ''
    if not string.find(',' .. cur .. ',', ',' .. value .. ',', 1, true) then
      if cur == '' then cur = value else cur = cur .. ',' .. value end
      redis.call('HSET', KEYS[1], 'failed_backends', cur)
    end
  else
    redis.call('HSET', KEYS[1], name, value)
  end
end
return {'OK'}
""",
)

FINISH = _script(
    "finish",
    r"""
-- Complete (or fail) a request: delete its context, keep its text and outcome for the
-- retention period, and tell followers. Retrying a finish that already happened is OK.
-- ARGV: owner, epoch, state, error, error_kind, backend, model, retention_ms, then optional
-- extra outcome field/value pairs (finish_reason, usage)
local f = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'token_count')
if not f[2] then
  local r = redis.call('HMGET', KEYS[2], 'owner', 'epoch')
  if r[2] and r[1] == ARGV[1] and num(r[2], 'epoch') == tonumber(ARGV[2]) then return {'OK', 'again'} end
  return refusal(KEYS[1], KEYS[2])
end
if f[1] ~= ARGV[1] or num(f[2], 'epoch') ~= tonumber(ARGV[2]) then return {'LOST', f[1] or '', f[2], 0} end
expect_type(KEYS[2], 'hash')
expect_type(KEYS[3], 'string')
expect_type(KEYS[4], 'stream')
local now = now_ms()
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'state', ARGV[3], 'owner', ARGV[1], 'epoch', ARGV[2], 'error', ARGV[4],
  'error_kind', ARGV[5], 'backend', ARGV[6], 'model', ARGV[7], 'token_count', f[3] or 0, 'finished', now)
for i = 9, #ARGV - 1, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[2], ARGV[8])
-- Rewrite the text once: APPEND's spare capacity is not kept for the retention period.
redis.call('SET', KEYS[3], redis.call('GET', KEYS[3]) or '', 'PX', ARGV[8])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 32, '*', 'end', ARGV[3])
  redis.call('PEXPIRE', KEYS[4], ARGV[8])
end
return {'OK', 'done'}
""",
)

CLAIM = _script(
    "claim",
    r"""
-- Take over a request whose lease expired: new owner, epoch + 1. A retry with the
-- same nonce returns the same win. ARGV: new_owner, lease_ttl_ms, nonce, max_age_ms
local f = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'lease', 'claim_nonce')
if not f[2] then return refusal(KEYS[1], KEYS[2]) end
local now = now_ms()
local old_owner = f[1] or ''
if not (f[4] == ARGV[3] and f[1] == ARGV[1]) then
  local lease = num(f[3], 'lease')
  if lease > now then return {'LIVE', old_owner, f[2], lease} end
  local epoch = num(f[2], 'epoch') + 1
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', epoch, 'lease', now + tonumber(ARGV[2]),
    'claim_nonce', ARGV[3], 'state', 'Recovered', 'previous_owner', old_owner)
  redis.call('HINCRBY', KEYS[1], 'takeovers', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
else
  old_owner = redis.call('HGET', KEYS[1], 'previous_owner') or ''
end
return {'OK', old_owner, now, redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[3]) or ''}
""",
)

READ = _script(
    "read",
    r"""
-- A consistent snapshot of one request: server time, context fields, committed text.
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {'GONE', now_ms()} end
return {'OK', now_ms(), fields, redis.call('GET', KEYS[3]) or ''}
""",
)

LEASE_STATUS = _script(
    "lease_status",
    r"""
-- Whether a request exists and when its lease ends (confirms an index hint).
local f = redis.call('HMGET', KEYS[1], 'lease', 'owner', 'epoch')
if not f[3] then
  if redis.call('EXISTS', KEYS[1]) == 1 then error('FLOCORRUPT ownership fields missing') end
  return {'GONE', now_ms()}
end
return {'OK', now_ms(), num(f[1], 'lease'), f[2] or '', f[3]}
""",
)

FOLLOW_READ = _script(
    "follow_read",
    r"""
-- Start or continue following: make sure the notification feed exists (so every later
-- commit lands in it), then return its last id, the text from a byte offset and the
-- outcome if the request finished. ARGV: from_byte, feed_ttl_ms
if redis.call('EXISTS', KEYS[3]) == 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[2]) == 0 then return {'GONE'} end
end
local len = redis.call('STRLEN', KEYS[3])
expect_type(KEYS[4], 'stream')
expect_type(KEYS[2], 'hash')
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 32, '*', 'n', len)
end
-- A live request's feed lives while followed; a finished one's as long as its outcome.
local outcome_ttl = redis.call('PTTL', KEYS[2])
if outcome_ttl > 0 then redis.call('PEXPIRE', KEYS[4], outcome_ttl) else redis.call('PEXPIRE', KEYS[4], ARGV[2]) end
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1][1]
local text = ''
if tonumber(ARGV[1]) < len then text = redis.call('GETRANGE', KEYS[3], ARGV[1], -1) end
return {'OK', last, text, redis.call('HGETALL', KEYS[2])}
""",
)

# ------------------------------------------------------------- namespace-wide keys

INDEX_TOUCH = Script(
    "index_touch",
    _PRELUDE
    + r"""
-- Set the active-index hint of some requests to now + ttl (server clock).
-- KEYS[1] active index. ARGV: lease_ttl_ms, mode ('add' or 'xx'), request ids...
local score = now_ms() + tonumber(ARGV[1])
local n = 0
for i = 3, #ARGV do
  if ARGV[2] == 'xx' then n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', score, ARGV[i])
  else n = n + redis.call('ZADD', KEYS[1], 'CH', score, ARGV[i]) end
end
return n
""",
)

ORPHAN_CANDIDATES = Script(
    "orphan_candidates",
    _PRELUDE
    + r"""
-- Request ids whose indexed lease deadline has passed; cost O(log N + limit).
-- KEYS[1] active index. ARGV: limit
local now = now_ms()
return {now, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))}
""",
)

BREAKER_ALLOW = Script(
    "breaker_allow",
    _PRELUDE
    + r"""
-- May this worker use the backend now? CLOSED, PROBE (you are the one half-open probe)
-- or OPEN (skip it; second value = ms until it may be probed).
-- KEYS[1] breaker hash. ARGV: worker_id, probe_ttl_ms
local f = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'probe_until', 'probe_owner')
local state = breaker_state(f[1])
if state == 'closed' then return {'CLOSED', 0} end
local now = now_ms()
local open_until = num(f[2], 'open_until')
if state == 'open' and now < open_until then return {'OPEN', open_until - now} end
local probe_until = num(f[3], 'probe_until')
if state == 'half_open' and now < probe_until and f[4] ~= ARGV[1] then return {'OPEN', probe_until - now} end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_until', now + tonumber(ARGV[2]), 'probe_owner', ARGV[1])
return {'PROBE', 0}
""",
)

BREAKER_RECORD = Script(
    "breaker_record",
    _PRELUDE
    + r"""
-- Count a success (close) or a failure (open after `threshold` failures within
-- `window_ms`, or at once when the failed call was the half-open probe).
-- KEYS[1] breaker hash. ARGV: 'ok' or 'fail', threshold, window_ms, cooldown_ms
local now = now_ms()
if ARGV[1] == 'ok' then
  redis.call('DEL', KEYS[1])
  return {'closed', 0}
end
local f = redis.call('HMGET', KEYS[1], 'state', 'failures', 'window_start')
breaker_state(f[1])
local failures = num(f[2], 'failures')
if now - num(f[3], 'window_start') > tonumber(ARGV[3]) then
  failures = 0
  redis.call('HSET', KEYS[1], 'window_start', now)
end
failures = failures + 1
redis.call('HSET', KEYS[1], 'failures', failures)
if f[1] == 'half_open' or failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', now + tonumber(ARGV[4]))
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[3]) + 60000)
  return {'open', failures}
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 60000)
return {f[1] or 'closed', failures}
""",
)

INFLIGHT_PICK = Script(
    "inflight_pick",
    _PRELUDE
    + r"""
-- Pick the deployment to call and count the call as in flight on it, in one step.
-- The least busy by in-flight calls per unit of weight wins; ties go by weighted chance.
-- KEYS: one in-flight sorted set per candidate deployment (member -> deadline ms), all in
-- one hash slot. ARGV: member, ttl_ms, a random number in [0, 1), then one weight per key.
-- Members whose deadline passed (their worker died) are dropped first: self-healing.
-- Reply: {index of the chosen key (1-based), in-flight count of every key before the pick}.
local now = now_ms()
local ties, best, counts, total = {}, nil, {}, 0
for i = 1, #KEYS do
  -- ZRANGEBYSCORE + ZREM rather than ZREMRANGEBYSCORE: the worker ACL (docs/OPERATING.md) allows these
  local dead = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'LIMIT', 0, 1000)
  if #dead > 0 then redis.call('ZREM', KEYS[i], unpack(dead)) end
  counts[i] = redis.call('ZCARD', KEYS[i])
  local load = counts[i] / tonumber(ARGV[3 + i])
  if best == nil or load < best then
    ties, best = {i}, load
  elseif load == best then
    ties[#ties + 1] = i
  end
end
for _, i in ipairs(ties) do total = total + tonumber(ARGV[3 + i]) end
local left, chosen = tonumber(ARGV[3]) * total, ties[#ties]
for _, i in ipairs(ties) do
  left = left - tonumber(ARGV[3 + i])
  if left < 0 then chosen = i break end
end
redis.call('ZADD', KEYS[chosen], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[chosen], tonumber(ARGV[2]))
return {chosen, counts}
""",
)

INFLIGHT_RENEW = Script(
    "inflight_renew",
    _PRELUDE
    + r"""
-- Push the deadline of this worker's calls still in flight on one deployment (XX: a call
-- already released stays released). KEYS[1] in-flight sorted set. ARGV: ttl_ms, members...
local deadline = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i]) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) end
return {'OK'}
""",
)

CANCEL = _script(
    "cancel",
    r"""
-- Ask for a request to be cancelled (any replica may): flag its context; the owner's
-- cancel watcher sees the flag and ends the request, fenced, as failed ("cancelled").
-- KEYS: the usual four. Replies: {'OK', owner, epoch}, {'DONE', state} or {'GONE'}.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  local f = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
  return {'OK', f[1] or '', f[2] or ''}
end
local state = redis.call('HGET', KEYS[2], 'state')
if state then return {'DONE', state} end
return {'GONE'}
""",
)

IDEMPOTENCY_CLAIM = Script(
    "idempotency_claim",
    r"""
-- Bind an idempotency key (its hash) to a request unless it is bound already.
-- KEYS[1] the key's string. ARGV: value ('<body sha256> <request id>'), ttl_ms.
-- Replies: {'NEW'} when bound now, {'OLD', value} with the earlier binding.
local old = redis.call('GET', KEYS[1])
if old then return {'OLD', old} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {'NEW'}
""",
)

ALL: tuple[Script, ...] = (
    START,
    START_NEW,
    REJECT,
    APPEND,
    APPEND_MANY,
    HEARTBEAT,
    UPDATE,
    FINISH,
    CLAIM,
    READ,
    LEASE_STATUS,
    FOLLOW_READ,
    INDEX_TOUCH,
    ORPHAN_CANDIDATES,
    BREAKER_ALLOW,
    BREAKER_RECORD,
    INFLIGHT_PICK,
    INFLIGHT_RENEW,
    CANCEL,
    IDEMPOTENCY_CLAIM,
)
