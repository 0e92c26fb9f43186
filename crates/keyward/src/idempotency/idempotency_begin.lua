-- Begin a request under an idempotency key. KEYS[1] the record (hash: f fingerprint, s state p|c, t lease
-- token, r stored response). ARGV: fingerprint, lease token, lease ms.
-- Reply {0} new (the caller holds the lease), {1, pttl} in progress, {2, response} completed, {3} mismatch.
local h = redis.call('HMGET', KEYS[1], 'f', 's', 'r')
if not h[1] then
  redis.call('HSET', KEYS[1], 'f', ARGV[1], 's', 'p', 't', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {0}
end
if h[1] ~= ARGV[1] then
  return {3}
end
if h[2] == 'p' then
  return {1, redis.call('PTTL', KEYS[1])}
end
return {2, h[3]}
