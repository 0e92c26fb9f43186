-- Delete one key only if it is still the key the purge's walk inspected: same type, a TTL that has only run
-- down since, and the same MEMORY USAGE (a key rewritten or re-expired by the application meanwhile has a
-- fresh, longer TTL, or gained or lost one, or a value of another size, and survives). Not detected: a
-- rewrite to a value of the same size that leaves the TTL absent or no longer than what remained.
-- KEYS[1] the key   ARGV[1] its TYPE at the walk   ARGV[2] its PTTL at the walk (ms, -1 = none)
-- ARGV[3] its MEMORY USAGE at the walk (bytes, 0 = unknown: not compared)   ARGV[4] the SAMPLES it used
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
local seen_bytes = tonumber(ARGV[3])
if seen_bytes > 0 and redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', ARGV[4]) ~= seen_bytes then
  return 0
end
return redis.call('UNLINK', KEYS[1])
