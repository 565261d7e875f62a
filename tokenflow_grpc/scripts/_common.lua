-- Functions shared by the Generate scripts; prepended to each of them when
-- they are loaded, so every script stays one self-contained EVALSHA.

-- Append one activity event to the capped stream and return its id.
-- stream: stream key; cap: approximate number of entries kept (MAXLEN ~).
local function record_event(stream, cap, kind, client, prompt, model, cached, blocked)
  return redis.call('XADD', stream, 'MAXLEN', '~', cap, '*',
    'type', kind, 'client', client, 'prompt', prompt, 'model', model,
    'cached', cached, 'blocked', blocked)
end

-- Read the cache entry, or take the single-flight lock when it is missing.
-- Counts the outcome and records its event, except for outcome 3.
-- Returns {outcome, cached text or false, event id or false} where outcome is
--   1 cache hit, 2 miss (the caller holds the lock and must generate),
--   3 wait (another request holds the lock; nothing was counted).
local function claim(cache, lock, counters, stream, token, lock_ttl_ms, cap, client, prompt, model)
  local cached = redis.call('GET', cache)
  if cached then
    redis.call('HINCRBY', counters, 'hits', 1)
    local id = record_event(stream, cap, 'cache_hit', client, prompt, model, '1', '0')
    return {1, cached, id}
  end
  if redis.call('SET', lock, token, 'NX', 'PX', lock_ttl_ms) then
    redis.call('HINCRBY', counters, 'misses', 1)
    local id = record_event(stream, cap, 'cache_miss', client, prompt, model, '0', '0')
    return {2, false, id}
  end
  return {3, false, false}
end
