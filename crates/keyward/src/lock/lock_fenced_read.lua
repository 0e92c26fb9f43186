-- Read a fenced value and the token that wrote it.
-- KEYS[1] fenced value W
-- Returns {token, value}, or nil when nothing was written (or it expired).
local r = redis.call('HMGET', KEYS[1], 't', 'v')
if not r[1] or not r[2] then
  return false
end
return r
