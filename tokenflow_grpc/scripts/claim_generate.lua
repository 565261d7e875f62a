-- claim_generate: one polling step of a request that waits for an identical
-- request to fill the cache: read the entry, or take over the lock when the
-- request that held it finished without filling the cache.
--
-- KEYS[1] cache      string, the cached response text
-- KEYS[2] lock       string, token of the request generating KEYS[1]
-- KEYS[3] counters   hash: requests, hits, misses, blocked
-- KEYS[4] activity   stream
-- ARGV[1] lock token of this request
-- ARGV[2] lock TTL, ms
-- ARGV[3] activity stream cap (approximate)
-- ARGV[4] client identity
-- ARGV[5] prompt excerpt for the activity event
-- ARGV[6] model
--
-- Returns {outcome, cached text or false, event id or false}, outcome as in claim().

return claim(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
