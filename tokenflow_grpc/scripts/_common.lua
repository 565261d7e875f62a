-- Functions shared by the Generate scripts; prepended to each of them when
-- they are loaded, so every script stays one self-contained EVALSHA.

-- Write an integer as Valkey text. Valkey formats other Lua numbers with 14
-- significant digits, which would round larger counts.
local function whole(number)
  return string.format('%.0f', number)
end

-- Append one activity event to the capped stream and return its id,
-- "<ms>-<n>". n numbers the stream's events from 1, so the number of events
-- trimmed between two ids is the difference of their n, less one. ms is now,
-- or the newest entry's ms when that is later (another server's clock is
-- ahead, or this one went back), so ids always increase. Both come from the
-- newest entry, which MAXLEN ~ never trims.
-- stream: stream key; now: ms since the Unix epoch;
-- cap: approximate number of entries kept (MAXLEN ~).
local function record_event(stream, now, cap, kind, client, prompt, model, cached, blocked)
  local ms, n = now, 1
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if newest then
    local newest_ms, newest_n = string.match(newest[1], '^(%d+)%-(%d+)$')
    ms = math.max(now, tonumber(newest_ms))
    n = tonumber(newest_n) + 1
  end
  local function add(command, id)
    return command('XADD', stream, 'MAXLEN', '~', cap, id,
      'type', kind, 'client', client, 'prompt', prompt, 'model', model,
      'cached', cached, 'blocked', blocked)
  end
  local id = add(redis.pcall, whole(ms) .. '-' .. whole(n))
  if type(id) == 'table' and id.err then
    -- The stream's last id is above its newest entry, because that entry
    -- was deleted by hand. Valkey then chooses the id rather than fail the
    -- call, and the numbering goes on from that id's sequence part.
    id = add(redis.call, '*')
  end
  return id
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

-- Sliding log: the exact count of admitted requests in (now - window_ms, now].
-- key: sorted set, one member per admitted request, score = time in ms;
-- member: the request id, unique per call. The request is added only when admitted.
-- Returns {admitted (1 or 0), remaining, reset_ms, retry_after_ms}.
local function sliding_log(key, now, limit, window_ms, member)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window_ms)
  local count = redis.call('ZCARD', key)

  if count >= limit then
    -- The window admits again once its (count - limit + 1)-th oldest entry
    -- expires; count can exceed limit after the limit was lowered.
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local freeing = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    local reset = tonumber(oldest[2]) + window_ms
    return {0, 0, reset, math.max(tonumber(freeing[2]) + window_ms - now, 1)}
  end

  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, window_ms)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return {1, limit - count - 1, tonumber(oldest[2]) + window_ms, 0}
end

-- Read a sliding-window counter: a hash of the fixed window's index
-- (floor(time / window_ms)) and the counts of that window and the one before.
-- Returns {current, previous} as of the window index.
local function counter_read(key, index)
  local fields = redis.call('HMGET', key, 'window', 'current', 'previous')
  local stored = tonumber(fields[1])
  if stored == index then
    return {tonumber(fields[2]) or 0, tonumber(fields[3]) or 0}
  end
  if stored == index - 1 then
    return {0, tonumber(fields[2]) or 0}
  end
  return {0, 0}
end

local function counter_write(key, index, current, previous, window_ms)
  redis.call('HSET', key, 'window', whole(index), 'current', whole(current),
    'previous', whole(previous))
  redis.call('PEXPIRE', key, 2 * window_ms)
end

-- The earliest time in ms at which a sliding-window counter of limit per
-- window_ms admits amount more, with current and previous counted in the
-- window of index. The weighted count at elapsed ms into a window is
-- previous * (window_ms - elapsed) / window_ms + current.
local function counter_free_at(index, current, previous, limit, amount, window_ms)
  if current + amount <= limit and previous > 0 then
    local room = math.floor((limit - current - amount) * window_ms / previous)
    return index * window_ms + math.max(window_ms - room, 0)
  end
  if amount <= limit and current > 0 then
    local room = math.floor((limit - amount) * window_ms / current)
    return (index + 1) * window_ms + math.max(window_ms - room, 0)
  end
  -- amount alone exceeds limit, so no time admits it; report one window.
  return (index + 2) * window_ms
end

-- Sliding-window counter: admit while the weighted count of the current and
-- previous fixed windows plus one stays within limit. Integer arithmetic
-- (counts times ms) keeps the decision exact.
-- Returns {admitted (1 or 0), remaining, reset_ms, retry_after_ms} where
-- reset_ms is the end of the current fixed window.
local function sliding_window(key, now, limit, window_ms)
  local index = math.floor(now / window_ms)
  local elapsed = now - index * window_ms
  local counts = counter_read(key, index)
  local current, previous = counts[1], counts[2]
  local weighted = previous * (window_ms - elapsed) + current * window_ms
  local reset = (index + 1) * window_ms

  if weighted + window_ms > limit * window_ms then
    local free_at = counter_free_at(index, current, previous, limit, 1, window_ms)
    return {0, 0, reset, math.max(free_at - now, 1)}
  end

  counter_write(key, index, current + 1, previous, window_ms)
  local remaining = math.floor((limit * window_ms - weighted - window_ms) / window_ms)
  return {1, remaining, reset, 0}
end

-- Token bucket of capacity requests that refills rate requests per window_ms,
-- stored as its debt: one request costs window_ms units and time repays rate
-- units per ms, so the bucket contains capacity - debt / window_ms requests.
-- key: hash of debt and the time in ms it was computed at.
-- Returns {admitted (1 or 0), remaining, reset_ms, retry_after_ms} where
-- reset_ms is when the bucket is full again.
local function token_bucket(key, now, rate, window_ms, capacity)
  local fields = redis.call('HMGET', key, 'debt', 'at')
  local debt = tonumber(fields[1]) or 0
  local elapsed = math.max(now - (tonumber(fields[2]) or now), 0)
  if elapsed * rate >= debt then
    debt = 0
  else
    debt = debt - elapsed * rate
  end
  local full = capacity * window_ms

  if debt + window_ms > full then
    local retry_after = math.ceil((debt + window_ms - full) / rate)
    return {0, 0, now + math.ceil(debt / rate), math.max(retry_after, 1)}
  end

  debt = debt + window_ms
  local refill_ms = math.ceil(debt / rate)
  redis.call('HSET', key, 'debt', whole(debt), 'at', whole(now))
  redis.call('PEXPIRE', key, refill_ms + 1)
  return {1, math.floor((full - debt) / window_ms), now + refill_ms, 0}
end

-- Apply the call's limit policy and token budget, all or nothing: the
-- request is counted in its algorithm's state and its tokens charged only
-- when both admit it. A real rejection is counted in counters and in blocked
-- (hash of rejections per epoch second within the current minute). A shadow
-- policy admits a call that it would reject, leaves the state as a rejection
-- would, and counts nothing as blocked.
--   state    the algorithm's key; tokens: the token budget's counter
--   policy   {algorithm, limit, window_ms, capacity, member, shadow ("1"/"0"),
--             token budget (0: none), token cost, token window_ms}
-- Returns {admitted, remaining, reset_ms, retry_after_ms, reason,
--          tokens remaining (-1: no budget), tokens reset_ms, shadow_rejected}
-- where reason is 0 admitted, 1 over the request limit, 2 over the token budget.
local function limit_call(state, tokens, counters, blocked, now, second, stats_ttl, policy)
  local algorithm, limit, window_ms = policy[1], policy[2], policy[3]
  local budget, cost, tokens_window = policy[7], policy[8], policy[9]
  local decision = {1, 0, now, 0}
  local reason = 0
  local tokens_left, tokens_reset = -1, 0
  local token_counts, token_index, token_used

  if budget > 0 then
    token_index = math.floor(now / tokens_window)
    local elapsed = now - token_index * tokens_window
    token_counts = counter_read(tokens, token_index)
    token_used = token_counts[2] * (tokens_window - elapsed) / tokens_window + token_counts[1]
    tokens_reset = (token_index + 1) * tokens_window
    tokens_left = math.max(math.floor(budget - token_used), 0)
    if token_used + cost > budget then
      reason = 2
      local free_at = counter_free_at(token_index, token_counts[1], token_counts[2], budget,
        cost, tokens_window)
      decision = {0, 0, tokens_reset, math.max(free_at - now, 1)}
    end
  end

  if reason == 0 then
    if algorithm == 'sliding_window' then
      decision = sliding_window(state, now, limit, window_ms)
    elseif algorithm == 'token_bucket' then
      decision = token_bucket(state, now, limit, window_ms, policy[4])
    else
      decision = sliding_log(state, now, limit, window_ms, policy[5])
    end
    if decision[1] == 0 then
      reason = 1
    elseif budget > 0 then
      counter_write(tokens, token_index, token_counts[1] + cost, token_counts[2], tokens_window)
      tokens_left = math.max(math.floor(budget - token_used - cost), 0)
    end
  end

  if reason ~= 0 and policy[6] == '1' then
    return {1, decision[2], decision[3], 0, reason, tokens_left, tokens_reset, 1}
  end
  if reason ~= 0 then
    redis.call('HINCRBY', counters, 'blocked', 1)
    redis.call('HINCRBY', blocked, second, 1)
    redis.call('EXPIRE', blocked, stats_ttl)
  end
  return {decision[1], decision[2], decision[3], decision[4], reason, tokens_left,
    tokens_reset, 0}
end

-- Read the cache entry, or take the single-flight lock when it is missing,
-- and count the call as a hit or a miss in counters.
-- A call that finds another request holding the lock waits for that
-- request's response, so it counts as a hit at once. waiting is "1" for the
-- claims it makes while it waits. Those count nothing more, unless the call
-- takes the lock over because the holder failed, which moves it from the
-- hits to the misses. Every admitted call is thus in exactly one of the two,
-- even one that stops waiting early.
-- Returns {outcome, cached text or false} where outcome is
--   1 cache hit, 2 miss (the caller holds the lock and must generate),
--   3 wait (another request holds the lock).
local function claim_entry(cache, lock, counters, token, lock_ttl_ms, waiting)
  local cached = redis.call('GET', cache)
  if cached then
    if waiting ~= '1' then
      redis.call('HINCRBY', counters, 'hits', 1)
    end
    return {1, cached}
  end
  if redis.call('SET', lock, token, 'NX', 'PX', lock_ttl_ms) then
    if waiting == '1' then
      redis.call('HINCRBY', counters, 'hits', -1)
    end
    redis.call('HINCRBY', counters, 'misses', 1)
    return {2, false}
  end
  if waiting ~= '1' then
    redis.call('HINCRBY', counters, 'hits', 1)
  end
  return {3, false}
end

-- claim_entry, then record the event of a hit or a miss in stream.
-- Returns {outcome, cached text or false, event id or false}, outcome as in claim_entry.
local function claim(cache, lock, counters, stream, token, lock_ttl_ms, waiting, now, cap,
                     client, prompt, model)
  local claimed = claim_entry(cache, lock, counters, token, lock_ttl_ms, waiting)
  if claimed[1] == 1 then
    local id = record_event(stream, now, cap, 'cache_hit', client, prompt, model, '1', '0')
    return {1, claimed[2], id}
  end
  if claimed[1] == 2 then
    local id = record_event(stream, now, cap, 'cache_miss', client, prompt, model, '0', '0')
    return {2, false, id}
  end
  return {3, false, false}
end
