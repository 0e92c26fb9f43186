-- Bump a group epoch: '*' for the whole namespace, or a class name. O(1) whatever the number of entries.
-- The epochs hash outlives every value that could carry an older epoch.
-- KEYS[1] namespace epochs hash   ARGV[1] field   ARGV[2] lifetime (ms)
-- Returns the new epoch.
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return n
