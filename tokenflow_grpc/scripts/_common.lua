-- Functions shared by the Generate scripts; prepended to each of them when
-- they are loaded, so every script stays one self-contained EVALSHA.

-- Append one activity event to the capped stream and return its id.
-- stream: stream key; cap: approximate number of entries kept (MAXLEN ~).
local function record_event(stream, cap, kind, client, prompt, model, cached, blocked)
  return redis.call('XADD', stream, 'MAXLEN', '~', cap, '*',
    'type', kind, 'client', client, 'prompt', prompt, 'model', model,
    'cached', cached, 'blocked', blocked)
end

-- Count one request in the stats keys of its shard.
--   counters   hash of all-time counters
--   requests   hash of requests per epoch second within the current minute
--   consumers  sorted set of requests per client within the current minute
--   stats_ttl  TTL of the per-minute keys, s
local function count_request(counters, requests, consumers, second, client, stats_ttl)
  redis.call('HINCRBY', counters, 'requests', 1)
  redis.call('HINCRBY', requests, second, 1)
  redis.call('EXPIRE', requests, stats_ttl)
  redis.call('ZINCRBY', consumers, 1, client)
  redis.call('EXPIRE', consumers, stats_ttl)
end

-- Apply the sliding-window limit: trim the window, count it, and add the
-- request only when it is admitted. A rejection is counted in counters and in
-- blocked (hash of rejections per epoch second within the current minute).
-- window: sorted set, one member per admitted request, score = time in ms;
-- now and window_ms in ms; member: the request id, unique per call.
-- Returns {admitted (1 or 0), remaining, reset_ms, retry_after_ms}.
local function admit(window, counters, blocked, now, limit, window_ms, member, second, stats_ttl)
  redis.call('ZREMRANGEBYSCORE', window, '-inf', now - window_ms)
  local count = redis.call('ZCARD', window)

  if count >= limit then
    -- The window admits again once its (count - limit + 1)-th oldest entry
    -- expires; count can exceed limit after the limit was lowered.
    local oldest = redis.call('ZRANGE', window, 0, 0, 'WITHSCORES')
    local freeing = redis.call('ZRANGE', window, count - limit, count - limit, 'WITHSCORES')
    local reset = tonumber(oldest[2]) + window_ms
    local retry_after = math.max(tonumber(freeing[2]) + window_ms - now, 1)
    redis.call('HINCRBY', counters, 'blocked', 1)
    redis.call('HINCRBY', blocked, second, 1)
    redis.call('EXPIRE', blocked, stats_ttl)
    return {0, 0, reset, retry_after}
  end

  redis.call('ZADD', window, now, member)
  redis.call('PEXPIRE', window, window_ms)
  local oldest = redis.call('ZRANGE', window, 0, 0, 'WITHSCORES')
  return {1, limit - count - 1, tonumber(oldest[2]) + window_ms, 0}
end

-- Read the cache entry, or take the single-flight lock when it is missing,
-- and count a hit or a miss in counters (nothing for outcome 3).
-- Returns {outcome, cached text or false} where outcome is
--   1 cache hit, 2 miss (the caller holds the lock and must generate),
--   3 wait (another request holds the lock; nothing was counted).
local function claim_entry(cache, lock, counters, token, lock_ttl_ms)
  local cached = redis.call('GET', cache)
  if cached then
    redis.call('HINCRBY', counters, 'hits', 1)
    return {1, cached}
  end
  if redis.call('SET', lock, token, 'NX', 'PX', lock_ttl_ms) then
    redis.call('HINCRBY', counters, 'misses', 1)
    return {2, false}
  end
  return {3, false}
end

-- claim_entry, then record the event of a hit or a miss in stream.
-- Returns {outcome, cached text or false, event id or false}, outcome as in claim_entry.
local function claim(cache, lock, counters, stream, token, lock_ttl_ms, cap, client, prompt, model)
  local claimed = claim_entry(cache, lock, counters, token, lock_ttl_ms)
  if claimed[1] == 1 then
    local id = record_event(stream, cap, 'cache_hit', client, prompt, model, '1', '0')
    return {1, claimed[2], id}
  end
  if claimed[1] == 2 then
    local id = record_event(stream, cap, 'cache_miss', client, prompt, model, '0', '0')
    return {2, false, id}
  end
  return {3, false, false}
end
