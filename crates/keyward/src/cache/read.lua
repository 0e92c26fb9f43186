-- Read a current value without taking a lease. (epochs.lua is prepended.)
-- KEYS[1] entry key   KEYS[2] namespace epochs hash (absent on Cluster: the epochs follow in ARGV)
-- ARGV[1] class name   ARGV[2] epochs lifetime (ms)   ARGV[3] stale grace G (ms, 0: off)
-- ARGV[4] 0 (no tags of the caller's own). On Cluster then ns, class, m, and m triples (tag, removal epoch,
-- expiry epoch) from the handle's view (see kw_current).
-- Returns the stored bytes, or nil when absent, leased, stale (PTTL at most G), or filled before a group or
-- tag invalidation or a tag expiry; {3, tag…} (Cluster) when the entry carries tags whose epochs were not passed: ask again.
local v = redis.call('GET', KEYS[1])
if not v then
  return false
end
if string.sub(v, 1, 3) == 'L1:' then
  -- A lease over a kept value (fetch.lua) still serves that value while it is fresh.
  local rest = string.match(v, '^L1:%x+:%d:%d+:()')
  if not rest then
    return false
  end
  v = string.sub(v, rest)
end
local grace = tonumber(ARGV[3])
local vns, vcl, kind, vtags = kw_header(v)
-- A value (not a cached absent, which has its own TTL) whose remaining TTL is within the grace is stale.
if grace > 0 and kind ~= 'n' and redis.call('PTTL', KEYS[1]) <= grace then
  return false
end
if vns then
  local tags, at = kw_tags(4)
  local ns, cl, cur = kw_current(ARGV[1], ARGV[2], tags, vtags, at)
  local stale = kw_stale(vns, vcl, vtags, ns, cl, cur)
  if stale == nil then
    return kw_unknown(vtags, cur)
  end
  if stale then -- true, or 'x': expired (not fresh; only a fail-safe fetch may serve it)
    return false
  end
end
return v
