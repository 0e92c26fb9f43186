-- Unconditional write under the current epochs (write-through, explicit set). Voids any lease.
-- (epochs.lua is prepended.)
-- KEYS[1] entry key   KEYS[2] namespace epochs hash (absent on Cluster: ARGV[6], ARGV[7] give the epochs)
-- ARGV[1] class name  ARGV[2] body "v:<payload>" or "n:"  ARGV[3] ttl (ms)  ARGV[4] wake-up channel
-- ARGV[5] epochs lifetime (ms)
local ns, cl = kw_current(ARGV[1], ARGV[5], ARGV[6], ARGV[7])
local stored = 'V1:' .. ns .. ':' .. cl .. ':' .. ARGV[2]
local old = redis.call('SET', KEYS[1], stored, 'PX', ARGV[3], 'GET')
if old and string.sub(old, 1, 3) == 'L1:' and string.sub(old, -1) == '1' then
  kw_wake(ARGV[4])
end
return 1
