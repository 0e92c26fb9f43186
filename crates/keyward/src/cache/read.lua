-- Read a current value without taking a lease. (epochs.lua is prepended.)
-- KEYS[1] entry key   KEYS[2] namespace epochs hash (absent on Cluster: ARGV[3], ARGV[4] give the epochs)
-- ARGV[1] class name   ARGV[2] epochs lifetime (ms)
-- Returns the stored bytes, or nil when absent, leased, or filled before a group invalidation.
local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 3) == 'L1:' then
  return false
end
local vns, vcl = string.match(v, '^V1:(%d+):(%d+):')
if vns then
  local ns, cl = kw_current(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
  if kw_stale(vns, vcl, ns, cl) then
    return false
  end
end
return v
