-- Unconditional write under the current epochs (write-through, explicit set). Voids any lease.
-- (epochs.lua is prepended.)
-- KEYS[1] entry key   KEYS[2] namespace epochs hash (absent on Cluster: the epochs follow in ARGV)
-- ARGV[1] class name  ARGV[2] body "v:<payload>" or "n:"  ARGV[3] ttl (ms)  ARGV[4] wake-up channel
-- ARGV[5] epochs lifetime (ms)   ARGV[6] k, the number of tags, then the k tags (the value is stored as V2
-- with each tag's current epoch; as V1 without tags). On Cluster then ns, class, m, and m triples (tag,
-- removal epoch, expiry epoch).
local tags, at = kw_tags(6)
local ns, cl, cur = kw_current(ARGV[1], ARGV[5], tags, {}, at)
local stored
if #tags == 0 then
  stored = 'V1:' .. ns .. ':' .. cl .. ':' .. ARGV[2]
else
  local parts = {'V2:', ns, ':', cl, ':', string.format('%d', #tags), ':'}
  for _, t in ipairs(tags) do
    parts[#parts + 1] = string.format('%d', #t) .. ':' .. t .. ':' .. string.format('%d', kw_tag_epoch(cur, t)) .. ':'
  end
  parts[#parts + 1] = ARGV[2]
  stored = table.concat(parts)
end
local old = redis.call('SET', KEYS[1], stored, 'PX', ARGV[3], 'GET')
if old and string.sub(old, 1, 3) == 'L1:' and string.sub(old, 37, 37) == '1' then
  kw_wake(ARGV[4])
end
return 1
