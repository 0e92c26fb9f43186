-- Shared by the cache scripts (prepended to fetch.lua, read.lua, set.lua and bump.lua): the group and tag epochs.
-- An epoch is a decimal integer below 2^53. A bump takes max(current + 1, server time in µs), so an epoch never
-- repeats, even after the epochs hash expired and was created again: an entry filled before an invalidation
-- can never match a later epoch. A tag has two fields, 't:<tag>' (removals) and 'x:<tag>' (expiries); a bump of
-- either takes the other as a floor too, so both draw from one increasing sequence, and a fill records the
-- larger: an entry below 't:' is gone, one below only 'x:' is expired (stale, kept for fail-safe). A field that is not such an integer (or a key that is not a hash) is corrupt:
-- it is bumped on the spot, which is always safe (entries filled before it read as misses), so one bad field
-- never fails every call of the namespace.
--
-- Exhaustion. TOP = 2^53 - 1 is the last valid epoch: nothing follows it. Keyward's bumps start from the clock
-- (µs; TOP is in the year 2255), so only a field written behind keyward's back (by hand, or corrupted into a
-- valid number) gets there. The rule, the same in the scripts, the embedded mirror (store.rs) and the Cluster
-- view (cluster.rs):
-- 1. A bump of a class or tag field whose next epoch would be TOP or more (its floor, for a tag the larger of
--    its pair, is TOP - 1 or more) does not write it: it *re-bases* the field instead, deleting it (a tag: both
--    fields) and bumping '*', the namespace epoch. Every entry of the namespace filled before then carries an
--    older '*' and is gone: at least the removal (or expiry) that was asked for. The deleted fields start again
--    from the clock, which can repeat a tag epoch issued before — but never under the same '*', and an entry
--    is current only if its '*' and its class and tag epochs all are.
-- 2. A class or tag field found at TOP is never recorded by a fill: it is repaired first, like a corrupt field
--    (kw_read here, the fast path's HMGET in store.rs, the Cluster view), and its repair is the re-base of (1).
--    No bump writes TOP to such a field, so with (1) no entry ever carries TOP for a class or a tag. (This is
--    what keeps a Cluster view that lags a re-base safe: it never hands out TOP for a fill to record.)
-- 3. '*' has nothing above it: a bump of '*' past TOP - 1 lands on TOP, and an entry that recorded TOP as its
--    namespace epoch is never current (kw_stale, `envelope::judge`). While '*' is TOP the namespace caches
--    nothing, and bumps no longer extend the hash's life (a hash without one gets one), so it expires within
--    one lifetime and '*' starts again from the clock: every entry leased before '*' reached TOP has expired by
--    then (the bump that put it there extended the life), and every later one carries TOP.
-- So after any bump every entry filled before it is stale; a removal always wins over an expiry (a re-base
-- removes); and no epoch an entry can be current under is ever issued twice. What no rule can see: a value
-- written by hand *below* TOP but above the clock, then lost with its whole hash (expiry, DEL) — the clock
-- floor of the next bump does not reach it. The epochs hash must be written only by keyward.

-- The last valid epoch, 2^53 - 1 (exact in a Lua number): see "Exhaustion" above.
local KW_TOP = 9007199254740991

-- Whether a stored epoch field is a valid epoch (store.rs `epoch` is the same rule).
local function kw_valid(v)
  return string.match(v, '^%d+$') ~= nil and #v <= 16 and tonumber(v) < 9007199254740992
end

-- Bump `field` (see above); returns the new epoch and the field that holds it: `field`, or '*' when the bump
-- re-based a class or tag field (rule 1).
local function kw_bump(hash, field, lifetime_ms)
  -- A corrupt field counts as 0 (the clock floor then applies), never at its face value: `tonumber` reads
  -- '9.007199254740991e15' or '0x1fffffffffffff' as 2^53 - 1, whose successor is out of range, so the repair
  -- would stay corrupt and a later bump of the tag, reading it as 0, would land below what fills recorded.
  local function read(f)
    local v = redis.pcall('HGET', hash, f)
    if type(v) ~= 'string' or not kw_valid(v) then
      return 0
    end
    return tonumber(v)
  end
  local n = read(field)
  local kind = string.sub(field, 1, 2)
  local sibling = nil
  if kind == 't:' or kind == 'x:' then
    sibling = (kind == 't:' and 'x:' or 't:') .. string.sub(field, 3)
    n = math.max(n, read(sibling))
  end
  if redis.call('TYPE', hash).ok ~= 'hash' then
    redis.call('DEL', hash)
  end
  local t = redis.call('TIME')
  -- µs, not ms: two scripts never run within the same µs, so even a bump that lost the previous value (a
  -- corrupt field, or a hash that expired) lands above every epoch issued before it.
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  n = math.max(n + 1, now_us)
  if n >= KW_TOP then
    if field ~= '*' then
      -- Rule 1: re-base. '*' rises above every entry filled so far, so the deleted fields owe them nothing.
      redis.call('HDEL', hash, field)
      if sibling then
        redis.call('HDEL', hash, sibling)
      end
      return kw_bump(hash, '*', lifetime_ms), '*'
    end
    n = KW_TOP
  end
  -- Rule 3: while '*' is exhausted, the hash only gets a life if it has none, so that it expires.
  local exhausted = read('*') == KW_TOP
  redis.call('HSET', hash, field, string.format('%d', n))
  local pttl = redis.call('PTTL', hash)
  if pttl < tonumber(lifetime_ms) and not (exhausted and pttl >= 0) then
    redis.call('PEXPIRE', hash, lifetime_ms)
  end
  return n, field
end

-- Whether a stored field must be repaired before a fill may record it: corrupt, or a class or tag field at
-- TOP (rule 2).
local function kw_unusable(f, v)
  return v and (not kw_valid(v) or (f ~= '*' and tonumber(v) >= KW_TOP))
end

-- The epochs of `fields` (a list: '*', the class, then 't:<tag>' and 'x:<tag>' fields) as a table field -> string ('0' when
-- never bumped or pruned), repairing corrupt and exhausted ones first (the hash is read again after each
-- repair: a re-base changes '*' and deletes a pair). A key of the wrong type is repaired by bumping every field
-- asked for ('*' among them, which makes every older entry of the namespace stale).
local function kw_read(hash, fields, lifetime_ms)
  local g = redis.pcall('HMGET', hash, unpack(fields))
  if type(g) ~= 'table' or g.err ~= nil then
    for _, f in ipairs(fields) do
      kw_bump(hash, f, lifetime_ms)
    end
    g = redis.call('HMGET', hash, unpack(fields))
  end
  for i, f in ipairs(fields) do
    if kw_unusable(f, g[i]) then
      kw_bump(hash, f, lifetime_ms)
      g = redis.call('HMGET', hash, unpack(fields))
    end
  end
  local out = {}
  for i, f in ipairs(fields) do
    out[f] = g[i] or '0'
  end
  return out
end

-- A stored value's header: ns epoch, class epoch, kind, and its tags as a flat list {tag, epoch, tag, epoch…}
-- (empty for V1); nil when the bytes are not a readable value (the client decodes, reports and heals them).
-- Mirrors `envelope.rs`: V2:{ns}:{cl}:{n}: then n times {len}:{tag}:{epoch}: then {kind}:{payload}.
local function kw_header(v)
  local version = string.sub(v, 1, 3)
  if version == 'V1:' then
    local ns, cl, kind = string.match(v, '^V1:(%d+):(%d+):(%a):')
    if ns then
      return ns, cl, kind, {}
    end
    return nil
  end
  if version ~= 'V2:' then
    return nil
  end
  local ns, cl, n, pos = string.match(v, '^V2:(%d+):(%d+):(%d+):()')
  if not ns or #n > 2 or tonumber(n) < 1 or tonumber(n) > 32 then
    return nil
  end
  local tags = {}
  for _ = 1, tonumber(n) do
    local len, at = string.match(v, '^(%d+):()', pos)
    if not len or #len > 3 or tonumber(len) < 1 or tonumber(len) > 128 then
      return nil
    end
    local tag = string.sub(v, at, at + tonumber(len) - 1)
    local e, after = string.match(v, '^:(%d+):()', at + tonumber(len))
    if #tag ~= tonumber(len) or not e then
      return nil
    end
    tags[#tags + 1] = tag
    tags[#tags + 1] = e
    pos = after
  end
  local kind = string.match(v, '^(%a):', pos)
  if kind ~= 'v' and kind ~= 'n' then
    return nil
  end
  return ns, cl, kind, tags
end

-- The tags a call names, from ARGV[first] (a count) and the names after it; returns them and the index of
-- the next argument.
local function kw_tags(first)
  local k = tonumber(ARGV[first])
  local tags = {}
  for i = 1, k do
    tags[i] = ARGV[first + i]
  end
  return tags, first + k + 1
end

-- The current epochs: ns, class, and a table 't:<tag>' / 'x:<tag>' -> epoch string for the `tags` asked for and
-- the `vtags` an entry carries. Read from the hash (KEYS[2]) on a single server; on Redis Cluster, where the
-- hash lives in another slot, the caller passes them from its bounded view (KEYS[2] absent): ARGV[at] ns,
-- ARGV[at + 1] class, ARGV[at + 2] a count m, then m triples (tag, removal epoch, expiry epoch). A tag it does
-- not pass is unknown.
local function kw_current(class, lifetime_ms, tags, vtags, at)
  if #KEYS > 1 then
    local fields = {'*', class}
    local seen = {}
    for _, t in ipairs(tags) do
      if not seen[t] then
        seen[t] = true
        fields[#fields + 1] = 't:' .. t
        fields[#fields + 1] = 'x:' .. t
      end
    end
    for i = 1, #vtags, 2 do
      local t = vtags[i]
      if not seen[t] then
        seen[t] = true
        fields[#fields + 1] = 't:' .. t
        fields[#fields + 1] = 'x:' .. t
      end
    end
    local out = kw_read(KEYS[2], fields, lifetime_ms)
    return out['*'], out[class], out
  end
  local out = {}
  local m = tonumber(ARGV[at + 2])
  for i = 1, m do
    local tag = ARGV[at + 3 * i]
    out['t:' .. tag] = ARGV[at + 1 + 3 * i]
    out['x:' .. tag] = ARGV[at + 2 + 3 * i]
  end
  return ARGV[at], ARGV[at + 1], out
end

-- Whether an entry filled under (vns, vcl, vtags) predates the current epochs (ns, cl, cur): true (gone), 'x'
-- (only a tag expiry: stale, kept for fail-safe), false, or nil when it carries a tag `cur` does not know
-- (Cluster: the client looks it up and asks again). Epochs only grow, so on a single server this is
-- inequality; on Cluster a view may lag the entry's epochs, and a newer entry is current. Mirrors `judge` in
-- `envelope.rs`.
local function kw_stale(vns, vcl, vtags, ns, cl, cur)
  -- An entry filled while '*' was exhausted is never current (rule 3).
  if tonumber(vns) >= KW_TOP or tonumber(vns) < tonumber(ns) or tonumber(vcl) < tonumber(cl) then
    return true
  end
  local unknown, expired = false, false
  for i = 1, #vtags, 2 do
    local c = cur['t:' .. vtags[i]]
    if c == nil then
      unknown = true
    elseif tonumber(vtags[i + 1]) < tonumber(c) then
      return true
    elseif tonumber(vtags[i + 1]) < tonumber(cur['x:' .. vtags[i]] or '0') then
      expired = true
    end
  end
  if unknown then
    return nil
  end
  if expired then
    return 'x'
  end
  return false
end

-- The epoch a fill records for `tag`: the larger of its removal and expiry epochs (0 when never bumped).
local function kw_tag_epoch(cur, tag)
  return math.max(tonumber(cur['t:' .. tag] or '0'), tonumber(cur['x:' .. tag] or '0'))
end

-- The tags of an entry that `cur` does not know, as a reply: {3, tag, tag…}.
local function kw_unknown(vtags, cur)
  local out = {3}
  for i = 1, #vtags, 2 do
    if cur['t:' .. vtags[i]] == nil then
      out[#out + 1] = vtags[i]
    end
  end
  return out
end

-- The stamp a fill records: ns, class, then the epoch of each of `tags`, as a reply tail.
local function kw_stamp(code, ns, cl, tags, cur)
  local out = {code, tonumber(ns), tonumber(cl)}
  for _, t in ipairs(tags) do
    out[#out + 1] = kw_tag_epoch(cur, t)
  end
  return out
end

-- Announce a fill or release of KEYS[1] on `channel`: sharded (SPUBLISH, in the key's slot) when the channel
-- ends in '}' (Redis Cluster), else plain PUBLISH.
local function kw_wake(channel)
  if string.sub(channel, -1) == '}' then
    redis.call('SPUBLISH', channel, KEYS[1])
  else
    redis.call('PUBLISH', channel, KEYS[1])
  end
end
