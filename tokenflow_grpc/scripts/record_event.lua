-- record_event: add one activity event to the stream. On a cluster it is the
-- last round of a Generate call, because no shard shares the stream's slot.
--
-- KEYS[1] activity  stream
-- ARGV[1] now, ms since the Unix epoch
-- ARGV[2] activity stream cap (approximate)
-- ARGV[3] event type: request, cache_hit, cache_miss or rate_limited
-- ARGV[4] client identity
-- ARGV[5] prompt excerpt
-- ARGV[6] model
-- ARGV[7] "1" for a cache hit, else "0"
-- ARGV[8] "1" when rejected by the rate limiter, else "0"
--
-- Returns the event id, "<ms>-<n>" (see record_event in _common.lua).

return record_event(KEYS[1], tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
  ARGV[7], ARGV[8])
