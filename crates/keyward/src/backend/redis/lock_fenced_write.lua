-- Store a value guarded by a fencing token: refuse a token older than the newest one seen.
-- KEYS[1] fenced value W (hash: t = token, v = value)   KEYS[2] fencing counter F (same hash tag)
-- ARGV[1] the writer's token (decimal, below 2^53)   ARGV[2] value   ARGV[3] fence ttl (ms)
-- Returns {1} when written, {0, highest} when refused, {2} for a fence never issued.
-- F counts too: a stale holder is refused as soon as a newer holder has *acquired*, before it writes.
local fence = tonumber(ARGV[1])
-- A fence above every one issued (the counter, or the clock it is floored to) was never issued: refuse it,
-- or one bogus value would block every real writer for fence_ttl.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
if fence > math.max(tonumber(redis.call('GET', KEYS[2])) or 0, now_us) then
  return {2}
end
local highest = math.max(tonumber(redis.call('HGET', KEYS[1], 't')) or 0,
                         tonumber(redis.call('GET', KEYS[2])) or 0)
if fence < highest then
  return {0, highest}
end
redis.call('HSET', KEYS[1], 't', string.format('%d', fence), 'v', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
-- Never shorten the counter's lifetime (a guard with a longer lease may have set it longer).
redis.call('PEXPIRE', KEYS[2], ARGV[3], 'GT')
return {1}
