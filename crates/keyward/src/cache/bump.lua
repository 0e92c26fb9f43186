-- Bump a group epoch: '*' for the whole namespace, or a class name. O(1) whatever the number of entries.
-- (epochs.lua is prepended: the new epoch is max(current + 1, server time in µs), so it never repeats.)
-- The epochs hash outlives every value that could carry an older epoch.
-- KEYS[1] namespace epochs hash   ARGV[1] field   ARGV[2] lifetime (ms)
-- ARGV[3] "1" on Redis Cluster: announce "<field> <epoch>" on the sharded channel named like the hash (same
-- slot), which every handle's epoch view applies on arrival.
-- Returns the new epoch.
local n = kw_bump(KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then
  redis.call('SPUBLISH', KEYS[1], ARGV[1] .. ' ' .. string.format('%d', n))
end
return n
