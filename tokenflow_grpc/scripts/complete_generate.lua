-- complete_generate: store a generated response and release the
-- single-flight lock if this request still holds it.
--
-- KEYS[1] cache   string, the response text
-- KEYS[2] lock    string, lock token
-- ARGV[1] response text
-- ARGV[2] cache TTL, s
-- ARGV[3] lock token of this request
--
-- Returns 1 when the lock was released, 0 when it had expired or passed to another request.

redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
