-- Move dead letters back into the stream, in one step: each one still in the dead-letter stream is appended to
-- the stream again (a new entry, delivered afresh to every group that reads new entries) and removed from the
-- dead letters, so it is never in both places nor lost between them. Idle workers are woken as by a publish.
-- The new entry carries field `o`, its origin: the id the event was first published under (the dead letter's
-- own `o` if it was replayed before, else its `id`), so a consumer can order it by that id (write-behind's
-- version), not by its new, higher one.
-- The stream's retention is applied by the next publish.
-- KEYS[1] the stream   KEYS[2] the dead-letter stream   KEYS[3] the wake-up marker (same hash tag)
-- ARGV[1] the wake-up channel   ARGV[2..] dead-letter ids
-- Returns {dead id, new id, …} for the dead letters moved.
local out = {}
for i = 2, #ARGV do
  local e = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  if e[1] then
    local f = {}
    for j = 1, #e[1][2], 2 do
      f[e[1][2][j]] = e[1][2][j + 1]
    end
    out[#out + 1] = ARGV[i]
    local origin = f['o'] or f['id']
    if origin then
      out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'm', f['m'] or '', 'o', origin)
    else
      out[#out + 1] = redis.call('XADD', KEYS[1], '*', 'm', f['m'] or '')
    end
    redis.call('XDEL', KEYS[2], ARGV[i])
  end
end
if #out > 0 and redis.call('DEL', KEYS[3]) == 1 then
  if string.sub(ARGV[1], -1) == '}' then
    redis.call('SPUBLISH', ARGV[1], KEYS[1])
  else
    redis.call('PUBLISH', ARGV[1], KEYS[1])
  end
end
return out
