-- charge_tokens: replace a call's admission estimate with the tokens it
-- used, in the token-budget counter it was charged in. A charge whose fixed
-- window has left the counter is not changed. Counts never go below 0.
--
-- KEYS[1] tokens  hash: window (fixed window index), current, previous token counts
-- ARGV[1] index of the fixed window the call was charged in
-- ARGV[2] tokens to add, negative to refund
-- ARGV[3] token budget per window
-- ARGV[4] window length, ms
-- ARGV[5] now, ms since the Unix epoch
--
-- Returns the tokens remaining in the budget now, rounded down, at least 0.

local charged_index, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local budget, window_ms, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local fields = redis.call('HMGET', KEYS[1], 'window', 'current', 'previous')
local stored = tonumber(fields[1])
local current, previous = tonumber(fields[2]) or 0, tonumber(fields[3]) or 0

if stored == charged_index then
  current = math.max(current + delta, 0)
  redis.call('HSET', KEYS[1], 'current', string.format('%.0f', current))
elseif stored == charged_index + 1 then
  previous = math.max(previous + delta, 0)
  redis.call('HSET', KEYS[1], 'previous', string.format('%.0f', previous))
end

local index = math.floor(now / window_ms)
if stored == index - 1 then
  current, previous = 0, current
elseif stored ~= index then
  current, previous = 0, 0
end
local elapsed = now - index * window_ms
local used = previous * (window_ms - elapsed) / window_ms + current
return math.max(math.floor(budget - used), 0)
