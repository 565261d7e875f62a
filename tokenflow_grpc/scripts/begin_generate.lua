-- begin_generate: the hot path of one Generate call in one round trip:
-- sliding-window rate limit, request counters, then the cache lookup and
-- single-flight lock (claim). A rejected request is never added to the window.
--
-- KEYS[1] window     sorted set, one member per admitted request, score = time in ms
-- KEYS[2] cache      string, the cached response text
-- KEYS[3] lock       string, token of the request generating KEYS[2]
-- KEYS[4] counters   hash: requests, hits, misses, blocked (all-time)
-- KEYS[5] requests   hash: requests per epoch second within the current minute
-- KEYS[6] blocked    hash: rejected requests per epoch second within the current minute
-- KEYS[7] consumers  sorted set: requests per client within the current minute
-- KEYS[8] activity   stream
-- ARGV[1]  now, ms since the Unix epoch
-- ARGV[2]  limit, requests per window
-- ARGV[3]  window length, ms
-- ARGV[4]  request id: the window member and the lock token, unique per call
-- ARGV[5]  lock TTL, ms
-- ARGV[6]  client identity
-- ARGV[7]  prompt excerpt for the activity event
-- ARGV[8]  model
-- ARGV[9]  activity stream cap (approximate)
-- ARGV[10] "1" to use the cache, "0" to skip it
-- ARGV[11] TTL of the per-minute stats keys, s
--
-- Returns {outcome, remaining, reset_ms, retry_after_ms, cached text or false, event id or false}
--   outcome: 0 rejected, 1 cache hit, 2 miss (caller holds the lock and must
--            generate), 3 wait (another request holds the lock; only the
--            request itself was counted), 4 cache skipped (counted as a miss)
--   reset_ms: time in ms since the epoch when the oldest request in the window expires
--   retry_after_ms: ms until a request would be admitted, 0 when admitted

local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local second = math.floor(now / 1000)
local stats_ttl = ARGV[11]
local client, prompt, model, cap = ARGV[6], ARGV[7], ARGV[8], ARGV[9]

redis.call('HINCRBY', KEYS[4], 'requests', 1)
redis.call('HINCRBY', KEYS[5], second, 1)
redis.call('EXPIRE', KEYS[5], stats_ttl)
redis.call('ZINCRBY', KEYS[7], 1, client)
redis.call('EXPIRE', KEYS[7], stats_ttl)

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])

if count >= limit then
  -- The window admits again once its (count - limit + 1)-th oldest entry
  -- expires; count can exceed limit after the limit was lowered.
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local freeing = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
  local reset = tonumber(oldest[2]) + window
  local retry_after = math.max(tonumber(freeing[2]) + window - now, 1)
  redis.call('HINCRBY', KEYS[4], 'blocked', 1)
  redis.call('HINCRBY', KEYS[6], second, 1)
  redis.call('EXPIRE', KEYS[6], stats_ttl)
  local id = record_event(KEYS[8], cap, 'rate_limited', client, prompt, model, '0', '1')
  return {0, 0, reset, retry_after, false, id}
end

redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
local remaining = limit - count - 1
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local reset = tonumber(oldest[2]) + window

if ARGV[10] == '0' then
  redis.call('HINCRBY', KEYS[4], 'misses', 1)
  local id = record_event(KEYS[8], cap, 'request', client, prompt, model, '0', '0')
  return {4, remaining, reset, 0, false, id}
end

local claimed = claim(KEYS[2], KEYS[3], KEYS[4], KEYS[8], ARGV[4], ARGV[5], cap, client, prompt, model)
return {claimed[1], remaining, reset, 0, claimed[2], claimed[3]}
