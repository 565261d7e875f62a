-- limit_simulate: the sliding-window limit on one client's Simulate calls.
-- Like the Generate limiter, it adds a call to the window only when admitted.
--
-- KEYS[1] window  sorted set, one member per admitted call, score = time in ms
-- ARGV[1] now, ms since the Unix epoch
-- ARGV[2] limit, calls per window
-- ARGV[3] window length, ms
-- ARGV[4] member for this call, unique per call
--
-- Returns {1, 0} when admitted, or {0, retry_after_ms} when rejected, where
-- retry_after_ms is the time until the oldest call leaves the window.

local now, limit, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.max(1, tonumber(oldest[2]) + window - now)}
