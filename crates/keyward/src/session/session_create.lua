-- Create a session. KEYS[1] session hash, KEYS[2] the user's index (sorted set: session key -> expiry ms).
-- ARGV: user id, data, idle ms, absolute ms. Reply {1, now, expires} or {0} if the key exists (token collision).
-- Cluster: the session key is built in the index's slot (its hash tag hashes there), so both KEYS share it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0}
end
local exp = now + math.min(tonumber(ARGV[3]), tonumber(ARGV[4]))
local snow = string.format('%d', now)
redis.call('HSET', KEYS[1], 'u', ARGV[1], 'd', ARGV[2], 'v', '1', 'c', snow, 'e', snow, 'i', KEYS[2])
redis.call('PEXPIRE', KEYS[1], exp - now)
redis.call('ZADD', KEYS[2], string.format('%d', exp), KEYS[1])
-- The index drops dead members and lives exactly as long as its longest-lived session.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', snow)
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[2], tonumber(last[2]) - now)
return {1, now, exp}
