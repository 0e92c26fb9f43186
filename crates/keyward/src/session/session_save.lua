-- Replace a session's data if its version is still the one the caller read. KEYS[1] session.
-- ARGV: expected version, data. Reply {1, new version}, {2, current version} (conflict) or {0} (gone).
local v = redis.call('HGET', KEYS[1], 'v')
if not v then
  return {0}
end
if v ~= ARGV[1] then
  return {2, tonumber(v)}
end
local nv = tonumber(v) + 1
redis.call('HSET', KEYS[1], 'd', ARGV[2], 'v', string.format('%d', nv))
return {1, nv}
