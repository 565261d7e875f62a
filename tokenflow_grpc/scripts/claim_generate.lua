-- claim_generate: read the cache entry, or take the single-flight lock when
-- it is missing and free. On a cluster it is the cache round of a Generate
-- call whose entry is in another shard than its client. It is also each
-- polling step of a request that waits for an identical request to fill the
-- cache, and it takes the lock over when that request finished without
-- filling the cache.
--
-- KEYS[1] cache      string, the cached response text
-- KEYS[2] lock       string, token of the request generating KEYS[1]
-- KEYS[3] counters   hash: requests, hits, misses, blocked of the entry's shard
-- KEYS[4] activity   stream; optional: without it no event is recorded
-- ARGV[1] lock token of this request
-- ARGV[2] lock TTL, ms
-- ARGV[3] "1" for a polling step of a waiting request (see claim_entry), else "0"
-- ARGV[4] activity stream cap (approximate)
-- ARGV[5] client identity
-- ARGV[6] prompt excerpt for the activity event
-- ARGV[7] model
-- ARGV[8] now, ms since the Unix epoch: the time of the activity event
--
-- Returns {outcome, cached text or false, event id or false}, outcome as in claim_entry().

if not KEYS[4] then
  local claimed = claim_entry(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
  return {claimed[1], claimed[2], false}
end
return claim(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[8]),
  ARGV[4], ARGV[5], ARGV[6], ARGV[7])
