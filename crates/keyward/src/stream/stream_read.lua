-- Read new entries for a consumer of a group, without blocking; when there are none, leave a marker so that
-- the next publish sends a wake-up (stream_retain.lua deletes it and publishes).
-- KEYS[1] the stream   KEYS[2] the wake-up marker (same hash tag)
-- ARGV[1] group   ARGV[2] consumer   ARGV[3] most entries   ARGV[4] marker TTL (ms)
-- Returns {-1} if the group does not exist (the server lost it), else {0, id, payload, origin, …} (origin: field
-- `o` of a replayed dead letter, else nil).
local ok, res = pcall(redis.call, 'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
if not ok then
  if string.find(tostring(res.err or res), 'NOGROUP', 1, true) then
    return {-1}
  end
  return redis.error_reply(tostring(res.err or res))
end
local out = {0}
if res then
  for _, e in ipairs(res[1][2]) do
    local payload, origin = false, false
    for i = 1, #e[2], 2 do
      if e[2][i] == 'm' then
        payload = e[2][i + 1]
      elseif e[2][i] == 'o' then
        origin = e[2][i + 1]
      end
    end
    out[#out + 1] = e[1]
    out[#out + 1] = payload
    out[#out + 1] = origin
  end
end
if #out == 1 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
end
return out
