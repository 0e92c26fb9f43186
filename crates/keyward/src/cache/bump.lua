-- Bump a group epoch ('*' for the whole namespace, or a class name) or a tag's ('t:<tag>' to remove its entries,
-- 'x:<tag>' to expire them; each takes the other as a floor, see epochs.lua). O(1) whatever the
-- number of entries. (epochs.lua is prepended: the new epoch is max(current + 1, server time in µs), so it
-- never repeats.) The epochs hash outlives every value that could carry an older epoch.
-- KEYS[1] namespace epochs hash   ARGV[1] field   ARGV[2] lifetime (ms)
-- ARGV[3] "1" on Redis Cluster: announce "<field> <epoch>" on the sharded channel named like the hash (same
-- slot), which every handle's epoch view applies on arrival.
-- Returns {epoch, field}: the new epoch and the field that holds it — ARGV[1], or '*' when the bump had to
-- re-base ARGV[1] (its next epoch would not fit; see "Exhaustion" in epochs.lua: the field is deleted, with a
-- tag's sibling, and '*' bumped instead). The announcement names that field too: "* <epoch> <ARGV[1]>".
--
-- Then it prunes: up to 16 tag fields picked at random whose epoch is older than the lifetime are deleted.
-- Safe: an epoch is at least the server time (µs) of its bump, so every entry leased before that bump (the
-- only ones it makes stale) has expired — the lifetime is the longest an entry can live after its lease
-- (lease + ttl + jitter) plus a margin. Reading the field as 0 from then on changes nothing for the entries
-- still alive (they were leased after the bump and carry its epoch or a later one), and the next bump of that
-- tag takes the server time again, above every epoch issued before. Each bump adds at most one field and
-- examines 16 at random, so dead fields stay a small fraction of the hash.
local n, bumped = kw_bump(KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then
  local announcement = bumped .. ' ' .. string.format('%d', n)
  if bumped ~= ARGV[1] then
    -- A re-base: the views drop the field (and its sibling) in the same step as they raise '*'.
    announcement = announcement .. ' ' .. ARGV[1]
  end
  redis.call('SPUBLISH', KEYS[1], announcement)
end
local t = redis.call('TIME')
local floor = tonumber(t[1]) * 1000000 + tonumber(t[2]) - tonumber(ARGV[2]) * 1000
local sample = redis.call('HRANDFIELD', KEYS[1], 16, 'WITHVALUES')
for i = 1, #sample, 2 do
  local f, e = sample[i], sample[i + 1]
  local kind = string.sub(f, 1, 2)
  if (kind == 't:' or kind == 'x:') and f ~= ARGV[1] and kw_valid(e) and tonumber(e) < floor then
    redis.call('HDEL', KEYS[1], f)
  end
end
return {n, bumped}
