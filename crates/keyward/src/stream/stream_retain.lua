-- Apply a stream's retention after a publish appended its entries (plain XADDs sent just before this script in
-- the same pipeline: see `publish` in store.rs), never trimming an entry that a consumer group has not
-- acknowledged (delivered and pending, or not delivered yet), except past the hard cap; and wake idle workers.
-- KEYS[1] the stream   KEYS[2] the wake-up marker a worker leaves when it found nothing to read (same hash tag)
-- ARGV[1] maxlen (0: no count bound)   ARGV[2] max_age in ms (0: no age bound)   ARGV[3] "1": approximate (~)
-- ARGV[4] hard_maxlen   ARGV[5] the wake-up channel   ARGV[6] the `~` slack: with approximate retention, the
-- count bound is looked at only once XLEN exceeds maxlen by at least this many entries   ARGV[7] "1": keep unread
-- (a write-behind queue): while the stream has no consumer group, no entry is trimmed by maxlen or max_age
-- (each is a write no drain has read yet); only the hard cap trims then, and every entry it cuts is dropped
-- Returns `dropped`: how many entries the hard cap removed although some group had not acknowledged them (with
-- ARGV[7] and no group: every entry it removed; 0 normally). Running it twice, or after entries another publisher appended, is harmless: it only trims what
-- the retention allows at the moment it runs.
--
-- The trim point is T = min(G, max(A, L)): G the lowest "oldest unacknowledged id" over the groups (a group's
-- oldest pending id, else the id after its last-delivered one), A = now - max_age, L the id after the
-- (XLEN - maxlen)-th oldest entry. L is found with XRANGE - (G COUNT excess, which costs the entries it
-- returns: about the entries this call trims (plus one node's worth with `~`), never the whole stream.
-- Ids are `ms-seq`; ms (13 digits) and seq fit Lua's doubles exactly, and are written with %.0f.
--
-- The fast path: computing T needs XINFO GROUPS and one XPENDING per group, most of a call's cost. It is
-- skipped when no trim can happen: XLEN <= maxlen (or, with `~`, XLEN < maxlen + slack: `~` allows the
-- stream that many extra entries, as XADD MAXLEN ~ allows a node's worth), no entry older than A (the oldest
-- entry's id is looked at), and XLEN <= hard_maxlen. Skipping then changes nothing: with T computed, XTRIM
-- would remove nothing (exact), or only what `~` may keep.
local key = KEYS[1]
local dropped = 0
-- Wake idle workers once (the marker says some wait): sharded (SPUBLISH, in the stream's slot) when the
-- channel ends in '}' (Redis Cluster), else plain PUBLISH. The payload is the stream's key.
if redis.call('DEL', KEYS[2]) == 1 then
  if string.sub(ARGV[5], -1) == '}' then
    redis.call('SPUBLISH', ARGV[5], key)
  else
    redis.call('PUBLISH', ARGV[5], key)
  end
end
local maxlen = tonumber(ARGV[1])
local max_age = tonumber(ARGV[2])
local tilde = ARGV[3] == '1'
local hard = tonumber(ARGV[4])
local slack = tonumber(ARGV[6])
local keep_unread = ARGV[7] == '1'

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end
local function after(id)
  return {id[1], id[2] + 1}
end
local function less(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end
local function fmt(id)
  return string.format('%.0f-%.0f', id[1], id[2])
end

-- The retention floor by age (A), if the class has one.
local r
if max_age > 0 then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  r = {math.max(now_ms - max_age, 0), 0}
end
local len = redis.call('XLEN', key)

-- The fast path (see above): nothing can be trimmed, so the groups are not looked at.
local over = maxlen > 0 and len > maxlen and (not tilde or len - maxlen >= slack)
if not over and len <= hard then
  local aged = false
  if r ~= nil then
    local oldest = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
    aged = #oldest > 0 and less(parse(oldest[1][1]), r)
  end
  if not aged then
    return dropped
  end
end

-- G: the lowest id some group still needs (nil: no groups). Each group's name, last-delivered id and pending
-- count are kept for the hard cap's count below.
local g
local groups = {}
for _, info in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local f = {}
  for j = 1, #info, 2 do
    f[info[j]] = info[j + 1]
  end
  groups[#groups + 1] = {f['name'], parse(f['last-delivered-id']), tonumber(f['pending'])}
  local floor
  if tonumber(f['pending']) > 0 then
    floor = parse(redis.call('XPENDING', key, f['name'])[2])
  else
    floor = after(parse(f['last-delivered-id']))
  end
  if g == nil or less(floor, g) then
    g = floor
  end
end

-- No group in a write-behind queue: every entry is unread (G is the oldest entry), so only the hard cap trims,
-- and all it cuts was needed.
if g == nil and keep_unread then
  if len > hard then
    dropped = len - hard
    redis.call('XTRIM', key, 'MAXLEN', hard)
  end
  return dropped
end

-- No group: nothing is unacknowledged, so T = max(A, L), and trimming by each bound on its own removes the
-- same entries (with `~`, the same whole nodes) without looking for L entry by entry: XRANGE would copy
-- every excess entry's payload into the script, most of a trimming call's cost.
if g == nil then
  local trimmed = false
  if over then
    if tilde then
      redis.call('XTRIM', key, 'MAXLEN', '~', maxlen)
    else
      redis.call('XTRIM', key, 'MAXLEN', maxlen)
    end
    trimmed = true
  end
  if r ~= nil then
    if tilde then
      redis.call('XTRIM', key, 'MINID', '~', fmt(r))
    else
      redis.call('XTRIM', key, 'MINID', fmt(r))
    end
    trimmed = true
  end
  if trimmed then
    len = redis.call('XLEN', key)
  end
  if len > hard then
    redis.call('XTRIM', key, 'MAXLEN', hard)
  end
  return dropped
end

-- The retention floor: entries below it are past retention.
if over then
  local excess = len - maxlen
  local upper = '(' .. fmt(g)
  local old = redis.call('XRANGE', key, '-', upper, 'COUNT', excess)
  local l
  if #old == excess then
    l = after(parse(old[#old][1]))
  else
    l = g -- every entry below G goes; G bounds it below
  end
  if r == nil or less(r, l) then
    r = l
  end
end
-- T = min(G, r); with no retention floor (only the hard cap brought us here), nothing is trimmed by it.
if r ~= nil then
  local t = r
  if less(g, t) then
    t = g
  end
  if tilde then
    redis.call('XTRIM', key, 'MINID', '~', fmt(t))
  else
    redis.call('XTRIM', key, 'MINID', fmt(t))
  end
  len = redis.call('XLEN', key)
end

-- The hard cap holds even when a group lags: the oldest entries go, and those some group still needed are
-- counted: not delivered to it yet, or pending in it (an entry at or above G may be acknowledged already, so
-- the pending list is asked, one XPENDING per cut entry and group with pending entries).
if len > hard then
  local cut = redis.call('XRANGE', key, '-', '+', 'COUNT', len - hard)
  for _, e in ipairs(cut) do
    local id = parse(e[1])
    if not less(id, g) then
      for _, gr in ipairs(groups) do
        if less(gr[2], id) or (gr[3] > 0 and #redis.call('XPENDING', key, gr[1], e[1], e[1], 1) > 0) then
          dropped = dropped + 1
          break
        end
      end
    end
  end
  redis.call('XTRIM', key, 'MINID', fmt(after(parse(cut[#cut][1]))))
end
return dropped
