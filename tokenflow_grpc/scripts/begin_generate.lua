-- begin_generate: the hot path of one Generate call in one round trip, for
-- the one-shard key layout where every key shares one slot: the limit
-- policy and token budget (limit_call), request counters, the cache lookup and single-flight lock
-- (claim), and the activity event. A rejected request is never added to the window.
--
-- KEYS[1] state      the client's state under its policy's algorithm (see limit_call)
-- KEYS[2] cache      string, the cached response text
-- KEYS[3] lock       string, token of the request generating KEYS[2]
-- KEYS[4] counters   hash: requests, hits, misses, blocked (all-time)
-- KEYS[5] requests   hash: requests per epoch second within the current minute
-- KEYS[6] blocked    hash: rejected requests per epoch second within the current minute
-- KEYS[7] consumers  sorted set: requests per client within the current minute
-- KEYS[8] activity   stream
-- KEYS[9] tokens     hash, the client's token-budget counter (untouched without a budget)
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
-- ARGV[12] algorithm: sliding_log, sliding_window or token_bucket
-- ARGV[13] token bucket capacity, requests
-- ARGV[14] "1" for a shadow policy, which never rejects
-- ARGV[15] token budget per token window; 0 for none
-- ARGV[16] tokens this call is admitted with (its estimate)
-- ARGV[17] token window length, ms
--
-- Returns {outcome, remaining, reset_ms, retry_after_ms, cached text or false, event id or false,
--          reason, tokens remaining, tokens reset_ms, shadow_rejected}, the last four as
--          returned by limit_call
--   outcome: 0 rejected, 1 cache hit, 2 miss (caller holds the lock and must
--            generate), 3 wait (another request holds the lock; counted as
--            a hit, see claim_entry), 4 cache skipped (counted as a miss)
--   reset_ms: time in ms since the epoch when the window frees a request (see limit_call)
--   retry_after_ms: ms until a request would be admitted, 0 when admitted

local now = tonumber(ARGV[1])
local second = math.floor(now / 1000)
local stats_ttl = ARGV[11]
local client, prompt, model, cap = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local policy = {ARGV[12], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[13]), ARGV[4],
  ARGV[14], tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])}

count_request(KEYS[4], KEYS[5], KEYS[7], second, client, stats_ttl)
local decision = limit_call(KEYS[1], KEYS[9], KEYS[4], KEYS[6], now, second, stats_ttl, policy)
local remaining, reset, retry_after = decision[2], decision[3], decision[4]
local reason, tokens_left, tokens_reset, shadow_rejected = decision[5], decision[6], decision[7],
  decision[8]

if decision[1] == 0 then
  local id = record_event(KEYS[8], now, cap, 'rate_limited', client, prompt, model, '0', '1')
  return {0, 0, reset, retry_after, false, id, reason, tokens_left, tokens_reset, 0}
end

if ARGV[10] == '0' then
  redis.call('HINCRBY', KEYS[4], 'misses', 1)
  local id = record_event(KEYS[8], now, cap, 'request', client, prompt, model, '0', '0')
  return {4, remaining, reset, 0, false, id, reason, tokens_left, tokens_reset, shadow_rejected}
end

local claimed = claim(KEYS[2], KEYS[3], KEYS[4], KEYS[8], ARGV[4], ARGV[5], '0', now, cap,
  client, prompt, model)
return {claimed[1], remaining, reset, 0, claimed[2], claimed[3], reason, tokens_left, tokens_reset,
  shadow_rejected}
