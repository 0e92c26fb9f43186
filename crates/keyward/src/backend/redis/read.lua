-- Read a current value without taking a lease.
-- KEYS[1] entry key   KEYS[2] namespace epochs hash   ARGV[1] class name
-- Returns the stored bytes, or nil when absent, leased, or filled before a group invalidation.
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 3) == 'L1:' then
  return false
end
local vns, vcl = string.match(v, '^V1:(%d+):(%d+):')
if vns then
  local g = redis.call('HMGET', KEYS[2], '*', ARGV[1])
  if vns ~= (g[1] or '0') or vcl ~= (g[2] or '0') then
    return false
  end
end
return v
