-- Delete one key only if it is still the key the purge's walk inspected: same type, and a TTL that has only
-- run down since (a key rewritten or re-expired by the application meanwhile has a fresh, longer TTL, or
-- gained or lost one, and survives).
-- KEYS[1] the key   ARGV[1] its TYPE at the walk   ARGV[2] its PTTL at the walk (ms, -1 = none)
-- Returns 1 when deleted (UNLINK), 0 when it changed or is gone.
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= ARGV[1] then
  return 0
end
local now = redis.call('PTTL', KEYS[1])
local seen = tonumber(ARGV[2])
if seen < 0 then
  if now >= 0 then
    return 0
  end
elseif now < 0 or now > seen then
  return 0
end
return redis.call('UNLINK', KEYS[1])
