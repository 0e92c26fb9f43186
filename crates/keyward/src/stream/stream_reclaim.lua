-- Take over entries pending longer than claim_idle with any consumer (abandoned by a worker that died), and
-- remove consumers idle past a bound that hold nothing.
-- KEYS[1] the stream
-- ARGV[1] group   ARGV[2] consumer   ARGV[3] claim_idle (ms)   ARGV[4] cursor   ARGV[5] most entries
-- ARGV[6] consumer idle bound (ms)
-- Returns {-1} if the group does not exist, else {cursor, deleted, id, deliveries, payload, origin, …} (origin:
-- field `o` of a replayed dead letter, else nil): `deleted`
-- counts pending entries no longer in the stream (trimmed past the hard cap), which XAUTOCLAIM removed from
-- the pending list.
local ok, res = pcall(redis.call, 'XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
if not ok then
  if string.find(tostring(res.err or res), 'NOGROUP', 1, true) then
    return {-1}
  end
  return redis.error_reply(tostring(res.err or res))
end
local out = {res[1], #res[3]}
for _, e in ipairs(res[2]) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  local payload, origin = false, false
  for j = 1, #e[2], 2 do
    if e[2][j] == 'm' then
      payload = e[2][j + 1]
    elseif e[2][j] == 'o' then
      origin = e[2][j + 1]
    end
  end
  out[#out + 1] = e[1]
  out[#out + 1] = p[1][4]
  out[#out + 1] = payload
  out[#out + 1] = origin
end
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for j = 1, #c, 2 do
    f[c[j]] = c[j + 1]
  end
  if tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[6]) and f['name'] ~= ARGV[2] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
  end
end
return out
