-- Store the response of a request whose lease the caller still holds. KEYS[1] the record.
-- ARGV: lease token, response, ttl ms. Reply 1 stored, 0 the lease was lost (expired, or taken by a retry).
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'p' or h[2] ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 's', 'c', 'r', ARGV[2])
redis.call('HDEL', KEYS[1], 't')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
