-- Release a lock only if the caller still holds it, and wake its waiters.
-- KEYS[1] lock key L   ARGV[1] holder token   ARGV[2] wake-up channel
-- Returns 1 if released, 0 if the lease had expired or belongs to someone else.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
-- Sharded (SPUBLISH, in the lock's slot) when the channel ends in '}' (Redis Cluster), else plain PUBLISH.
if string.sub(ARGV[2], -1) == '}' then
  redis.call('SPUBLISH', ARGV[2], KEYS[1])
else
  redis.call('PUBLISH', ARGV[2], KEYS[1])
end
return 1
