-- limit_generate: the first round of one Generate call in the sharded key
-- layout of a Valkey Cluster, run in the client's shard. It counts the
-- request and applies the sliding-window rate limit. When the cache entry is
-- in the same shard, it also does the cache lookup and takes the
-- single-flight lock. It records no activity event, because the stream is in
-- another slot, so the caller adds the event. A rejected request is never
-- added to the window.
--
-- KEYS[1] window     sorted set, one member per admitted request, score = time in ms
-- KEYS[2] counters   hash: the shard's requests, hits, misses, blocked (all-time)
-- KEYS[3] requests   hash: the shard's requests per epoch second within the current minute
-- KEYS[4] blocked    hash: the shard's rejections per epoch second within the current minute
-- KEYS[5] consumers  sorted set: requests per client within the current minute
-- KEYS[6] cache      string, the cached response text; only when it is in this shard
-- KEYS[7] lock       string, token of the request generating KEYS[6]; only with KEYS[6]
-- ARGV[1] now, ms since the Unix epoch
-- ARGV[2] limit, requests per window
-- ARGV[3] window length, ms
-- ARGV[4] request id: the window member and the lock token, unique per call
-- ARGV[5] lock TTL, ms
-- ARGV[6] client identity
-- ARGV[7] "1" to use the cache, "0" to skip it
-- ARGV[8] TTL of the per-minute stats keys, s
--
-- Returns {outcome, remaining, reset_ms, retry_after_ms, cached text or false}
--   outcome: as in begin_generate (0 rejected, 1 hit, 2 miss, 3 wait,
--            4 cache skipped), or 5 admitted: the cache entry is in another
--            shard, where the caller claims it with claim_generate.

local now = tonumber(ARGV[1])
local second = math.floor(now / 1000)
local stats_ttl = ARGV[8]

count_request(KEYS[2], KEYS[3], KEYS[5], second, ARGV[6], stats_ttl)
local decision = admit(KEYS[1], KEYS[2], KEYS[4], now, tonumber(ARGV[2]), tonumber(ARGV[3]),
  ARGV[4], second, stats_ttl)
local remaining, reset, retry_after = decision[2], decision[3], decision[4]

if decision[1] == 0 then
  return {0, 0, reset, retry_after, false}
end

if ARGV[7] == '0' then
  redis.call('HINCRBY', KEYS[2], 'misses', 1)
  return {4, remaining, reset, 0, false}
end

if not KEYS[6] then
  return {5, remaining, reset, 0, false}
end

local claimed = claim_entry(KEYS[6], KEYS[7], KEYS[2], ARGV[4], ARGV[5])
return {claimed[1], remaining, reset, 0, claimed[2]}
