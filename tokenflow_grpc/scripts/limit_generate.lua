-- limit_generate: the first round of one Generate call in the sharded key
-- layout of a Valkey Cluster, run in the client's shard. It counts the
-- request and applies the limit policy and token budget (limit_call). When the cache entry is
-- in the same shard, it also does the cache lookup and takes the
-- single-flight lock. It records no activity event, because the stream is in
-- another slot, so the caller adds the event. A rejected request is never
-- added to the window.
--
-- KEYS[1] state      the client's state under its policy's algorithm (see limit_call)
-- KEYS[2] counters   hash: the shard's requests, hits, misses, blocked (all-time)
-- KEYS[3] requests   hash: the shard's requests per epoch second within the current minute
-- KEYS[4] blocked    hash: the shard's rejections per epoch second within the current minute
-- KEYS[5] consumers  sorted set: requests per client within the current minute
-- KEYS[6] tokens     hash, the client's token-budget counter (untouched without a budget)
-- KEYS[7] cache      string, the cached response text; only when it is in this shard
-- KEYS[8] lock       string, token of the request generating KEYS[7]; only with KEYS[7]
-- ARGV[1] now, ms since the Unix epoch
-- ARGV[2] limit, requests per window
-- ARGV[3] window length, ms
-- ARGV[4] request id: the window member and the lock token, unique per call
-- ARGV[5] lock TTL, ms
-- ARGV[6] client identity
-- ARGV[7] "1" to use the cache, "0" to skip it
-- ARGV[8] TTL of the per-minute stats keys, s
-- ARGV[9]  algorithm: sliding_log, sliding_window or token_bucket
-- ARGV[10] token bucket capacity, requests
-- ARGV[11] "1" for a shadow policy, which never rejects
-- ARGV[12] token budget per token window; 0 for none
-- ARGV[13] tokens this call is admitted with (its estimate)
-- ARGV[14] token window length, ms
--
-- Returns {outcome, remaining, reset_ms, retry_after_ms, cached text or false,
--          reason, tokens remaining, tokens reset_ms, shadow_rejected}, the last four as
--          returned by limit_call
--   outcome: as in begin_generate (0 rejected, 1 hit, 2 miss, 3 wait,
--            4 cache skipped), or 5 admitted: the cache entry is in another
--            shard, where the caller claims it with claim_generate.

local now = tonumber(ARGV[1])
local second = math.floor(now / 1000)
local stats_ttl = ARGV[8]
local policy = {ARGV[9], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[10]), ARGV[4],
  ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])}

count_request(KEYS[2], KEYS[3], KEYS[5], second, ARGV[6], stats_ttl)
local decision = limit_call(KEYS[1], KEYS[6], KEYS[2], KEYS[4], now, second, stats_ttl, policy)
local remaining, reset, retry_after = decision[2], decision[3], decision[4]
local reason, tokens_left, tokens_reset, shadow_rejected = decision[5], decision[6], decision[7],
  decision[8]

if decision[1] == 0 then
  return {0, 0, reset, retry_after, false, reason, tokens_left, tokens_reset, 0}
end

if ARGV[7] == '0' then
  redis.call('HINCRBY', KEYS[2], 'misses', 1)
  return {4, remaining, reset, 0, false, reason, tokens_left, tokens_reset, shadow_rejected}
end

if not KEYS[7] then
  return {5, remaining, reset, 0, false, reason, tokens_left, tokens_reset, shadow_rejected}
end

local claimed = claim_entry(KEYS[7], KEYS[8], KEYS[2], ARGV[4], ARGV[5], '0')
return {claimed[1], remaining, reset, 0, claimed[2], reason, tokens_left, tokens_reset,
  shadow_rejected}
