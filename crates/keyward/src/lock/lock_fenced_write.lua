-- Store a value guarded by a fencing token: refuse a token older than the newest one seen.
-- KEYS[1] fenced value W (hash: t = token, v = value)   KEYS[2] fencing counter F (same hash tag)
-- ARGV[1] the writer's token (decimal, below 2^53)   ARGV[2] value   ARGV[3] fence ttl (ms)
-- Returns {1} when written, {0, highest} when refused, {2} for a fence never issued.
-- F counts too: a stale holder is refused as soon as a newer holder has *acquired*, before it writes.
-- A stored fence that is not an integer in [0, 2^53) is corrupt and counts as 0 (as in lock_acquire.lua).
local function stored_fence(v)
  local n = tonumber(v) or 0
  if n ~= math.floor(n) or n < 0 or n >= 9007199254740992 then
    return 0
  end
  return n
end
local fence = tonumber(ARGV[1])
-- A fence above every one issued (the counter, or the clock it is floored to) was never issued: refuse it,
-- or one bogus value would block every real writer for fence_ttl.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local counter = stored_fence(redis.call('GET', KEYS[2]))
if fence > math.max(counter, now_us) then
  return {2}
end
local highest = math.max(stored_fence(redis.call('HGET', KEYS[1], 't')), counter)
if fence < highest then
  return {0, highest}
end
redis.call('HSET', KEYS[1], 't', string.format('%d', fence), 'v', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
-- Never shorten the counter's lifetime (a guard with a longer lease may have set it longer).
redis.call('PEXPIRE', KEYS[2], ARGV[3], 'GT')
return {1}
