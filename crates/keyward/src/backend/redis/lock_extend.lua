-- Renew a lease only if the caller still holds it.
-- KEYS[1] lock key L   ARGV[1] holder token   ARGV[2] new ttl (ms), from now
-- Returns 1 if renewed, 0 if the lease had expired or belongs to someone else.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
