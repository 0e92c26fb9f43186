-- Move a session to a new token: same data, timeouts and expiry; the old token stops working in the same step.
-- KEYS: the old token's key under each secret (newest first), then the new key last.
-- Reply {1} moved, {0} no such session, {2} the new key exists (token collision).
-- Cluster: the new token keeps the old one's home slot, so every key here, and the index named by field `i`
-- (undeclared, but in the same slot, which Redis Cluster allows), is in one slot.
local n = #KEYS
local new = KEYS[n]
if redis.call('EXISTS', new) == 1 then
  return {2}
end
for k = 1, n - 1 do
  local s = KEYS[k]
  local idx = redis.call('HGET', s, 'i')
  if idx then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local pttl = redis.call('PTTL', s)
    redis.call('RENAME', s, new)
    redis.call('ZREM', idx, s)
    redis.call('ZADD', idx, string.format('%d', now + pttl), new)
    -- The index outlives its members (ZADD on a missing index creates it without a TTL).
    if redis.call('PTTL', idx) < pttl then
      redis.call('PEXPIRE', idx, pttl)
    end
    return {1}
  end
end
return {0}
