-- List a user's live sessions, dropping dead index members. KEYS[1] the user's index.
-- Reply: flat {key, created, extended, expires, ...}.
-- Cluster: the index's members are session keys built in the index's slot; they are not in KEYS, but a script
-- may touch undeclared keys of the slot it runs in.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
local out = {}
for _, s in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HMGET', s, 'c', 'e')
  local pttl = redis.call('PTTL', s)
  if h[1] and pttl > 0 then
    out[#out + 1] = s
    out[#out + 1] = tonumber(h[1])
    out[#out + 1] = tonumber(h[2])
    out[#out + 1] = now + pttl
  else
    redis.call('ZREM', KEYS[1], s)
  end
end
return out
