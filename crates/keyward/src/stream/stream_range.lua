-- Read entries of a stream, oldest first.
-- KEYS[1] the stream
-- ARGV[1] the exclusive lower bound: "(<id>" or "-" for the oldest   ARGV[2] the most entries to return
-- Returns {id, payload, id, payload, …}: each entry's id and its field `m` (nil if it has none).
local out = {}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])) do
  local payload = false
  for i = 1, #e[2], 2 do
    if e[2][i] == 'm' then
      payload = e[2][i + 1]
    end
  end
  out[#out + 1] = e[1]
  out[#out + 1] = payload
end
return out
