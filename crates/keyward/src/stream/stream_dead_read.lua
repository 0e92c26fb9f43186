-- Read the oldest dead letters.
-- KEYS[1] the dead-letter stream   ARGV[1] the most entries to return
-- Returns {dead id, payload, original id, group, error, deliveries, origin, …} (7 items per dead letter; a
-- missing field is nil; `origin` is set only for an entry that was itself a replayed dead letter: the id it
-- was first published under).
local out = {}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])) do
  local f = {}
  for i = 1, #e[2], 2 do
    f[e[2][i]] = e[2][i + 1]
  end
  out[#out + 1] = e[1]
  out[#out + 1] = f['m'] or false
  out[#out + 1] = f['id'] or false
  out[#out + 1] = f['group'] or false
  out[#out + 1] = f['error'] or false
  out[#out + 1] = f['deliveries'] or false
  out[#out + 1] = f['o'] or false
end
return out
