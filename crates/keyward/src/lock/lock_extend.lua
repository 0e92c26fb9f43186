-- Renew a lease only if the caller still holds it, and keep the fencing counter alive with it.
-- KEYS[1] lock key L   KEYS[2] fencing counter F (same hash tag)
-- ARGV[1] holder token   ARGV[2] new ttl (ms), from now   ARGV[3] fence ttl (ms)   ARGV[4] the holder's fence
-- Returns 1 if renewed, 0 if the lease had expired or belongs to someone else.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
-- While we hold the lock nobody else was issued a fence, so F is ours: a lock held (with renewals) past
-- fence_ttl keeps its counter instead of falling back on the clock floor.
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[3], 'GT')
end
return 1
