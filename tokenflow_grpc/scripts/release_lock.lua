-- release_lock: drop the single-flight lock after a failed generation, so a
-- waiting request can take it over, but only if this request still holds it.
--
-- KEYS[1] lock    string, lock token
-- ARGV[1] lock token of this request
--
-- Returns 1 when the lock was released, 0 otherwise.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
