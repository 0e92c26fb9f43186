-- Take a named lock and issue its fencing token, in one step.
-- KEYS[1] lock key L   KEYS[2] fencing counter F (same hash tag)
-- ARGV[1] holder token   ARGV[2] lease ttl (ms)   ARGV[3] fence ttl (ms)
-- Returns {1, fence} when acquired, {0, PTTL L} when someone holds it.
-- Fences are µs-scale integers below 2^53, so Lua's doubles hold them exactly; they are written with
-- string.format('%d') because tostring() would print 1.8e+15.
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then
  return {0, pttl}
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local prev = tonumber(redis.call('GET', KEYS[2])) or 0
if prev ~= math.floor(prev) or prev < 0 or prev >= 9007199254740992 then
  -- Not a fence keyward could have issued (fences are µs-scale, far below 2^53): corrupt. Start again from the
  -- clock floor rather than fail every acquire of this lock (or issue a token that doubles cannot hold).
  prev = 0
end
-- Never below the server clock: tokens keep increasing even after F expired.
local fence = math.max(prev + 1, now_us)
redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, fence}
