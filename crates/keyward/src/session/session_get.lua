-- Read a session, enforcing the idle and absolute timeouts together, and push the idle expiry back only when
-- the last extension is at least extend_after old. KEYS: the token's key under each secret, newest first.
-- ARGV: idle ms, absolute ms, extend_after ms.
-- Reply: false, or {which key (1-based), user, data, version, created, extended, expires}.
-- Cluster: every candidate key is in the token's home slot, and so is the index named by field `i` (the
-- session was created in its user's index's slot). The index is not in KEYS (the caller does not know the
-- user), but Redis Cluster lets a script touch undeclared keys of the slot it runs in.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle, abs, every = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for k = 1, #KEYS do
  local s = KEYS[k]
  local h = redis.call('HMGET', s, 'u', 'd', 'v', 'c', 'e', 'i')
  if h[1] then
    local c, e = tonumber(h[4]), tonumber(h[5])
    local exp = math.min(e + idle, c + abs)
    if exp <= now then
      -- Past a timeout (the key's own expiry normally got there first).
      redis.call('DEL', s)
      redis.call('ZREM', h[6], s)
      return false
    end
    if now - e >= every then
      e = now
      exp = math.min(now + idle, c + abs)
      redis.call('HSET', s, 'e', string.format('%d', now))
      redis.call('PEXPIRE', s, exp - now)
      redis.call('ZADD', h[6], string.format('%d', exp), s)
      if redis.call('PTTL', h[6]) < exp - now then
        redis.call('PEXPIRE', h[6], exp - now)
      end
    end
    return {k, h[1], h[2], h[3], c, e, exp}
  end
end
return false
