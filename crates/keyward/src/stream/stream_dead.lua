-- Move an entry that failed max_deliveries times to the dead-letter stream, in one step: add it there with its
-- last error (and its origin `o`, if it was a replayed dead letter: see stream_replay.lua), acknowledge it, and delete it from the stream if no other group still needs it. Only if this
-- consumer still holds it, so an entry is never dead-lettered twice nor both dead-lettered and pending.
-- KEYS[1] the stream   KEYS[2] the dead-letter stream (same hash tag)
-- ARGV[1] group   ARGV[2] consumer   ARGV[3] entry id   ARGV[4] last error   ARGV[5] deliveries
-- ARGV[6] "1": dead letters on   ARGV[7] dead maxlen (0: none)   ARGV[8] dead max_age ms (0: none)
-- ARGV[9] dead hard_maxlen
-- Returns 1 if moved (or, dead letters off, dropped), 0 if this consumer no longer holds the entry.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if p[1] == nil or p[1][2] ~= ARGV[2] then
  return 0
end
if ARGV[6] == '1' then
  local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
  local payload = ''
  local origin
  if e[1] then
    for j = 1, #e[1][2], 2 do
      if e[1][2][j] == 'm' then
        payload = e[1][2][j + 1]
      elseif e[1][2][j] == 'o' then
        origin = e[1][2][j + 1]
      end
    end
  end
  if origin then
    redis.call('XADD', KEYS[2], '*', 'm', payload, 'id', ARGV[3], 'group', ARGV[1], 'error', ARGV[4],
      'deliveries', ARGV[5], 'o', origin)
  else
    redis.call('XADD', KEYS[2], '*', 'm', payload, 'id', ARGV[3], 'group', ARGV[1], 'error', ARGV[4],
      'deliveries', ARGV[5])
  end
  local max_age = tonumber(ARGV[8])
  if max_age > 0 then
    local t = redis.call('TIME')
    local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - max_age
    if floor > 0 then
      redis.call('XTRIM', KEYS[2], 'MINID', string.format('%.0f', floor))
    end
  end
  local maxlen = tonumber(ARGV[7])
  if maxlen == 0 then
    maxlen = tonumber(ARGV[9])
  end
  redis.call('XTRIM', KEYS[2], 'MAXLEN', maxlen)
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
-- Delete it only if every other group is past it (acknowledged, or delivered elsewhere and acknowledged).
local ms, seq = string.match(ARGV[3], '^(%d+)-(%d+)$')
local id = {tonumber(ms), tonumber(seq)}
local function less(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end
local needed = false
for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for j = 1, #info, 2 do
    f[info[j]] = info[j + 1]
  end
  if f['name'] ~= ARGV[1] then
    local lms, lseq = string.match(f['last-delivered-id'], '^(%d+)-(%d+)$')
    if less({tonumber(lms), tonumber(lseq)}, id) then
      needed = true
    elseif #redis.call('XPENDING', KEYS[1], f['name'], ARGV[3], ARGV[3], 1) > 0 then
      needed = true
    end
  end
end
if not needed then
  redis.call('XDEL', KEYS[1], ARGV[3])
end
return 1
