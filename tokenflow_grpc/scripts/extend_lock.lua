-- extend_lock: renew the lease of a single-flight lock while its holder is
-- still generating, so a holder that dies loses the lock within one lease.
--
-- KEYS[1] lock    string, lock token
-- ARGV[1] lock token of this request
-- ARGV[2] lease, ms
--
-- Returns 1 when the lease was renewed, 0 when the lock belongs to another request or expired.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
