-- Get a value, or take the fill lease, atomically. The fast path (a pipelined SET NX GET + HMGET, see store.rs)
-- comes here only when it finds a lease held, a value from before a group or tag invalidation, an unusable
-- absent, a value near or past its expiry (fail-safe classes), or epochs it cannot read. (epochs.lua is
-- prepended.)
-- A lease is "L1:<token32>:<w>" (w, byte 37: '1' once someone waits on it), or, taken over a value that is kept
-- for fail-safe or eager refresh, "L1:<token32>:<w>:<deadline_ms>:<value>": the value stays readable, and the
-- lease counts as held until the deadline (server clock), whatever the key's TTL.
-- KEYS[1] entry key   KEYS[2] namespace epochs hash (absent on Cluster: the epochs follow the tags in ARGV)
-- ARGV[1] class name  ARGV[2] lease marker "L1:<token>:0"  ARGV[3] lease ttl (ms)
-- ARGV[4] "1" if a cached absent ("n") counts as a hit   ARGV[5] epochs lifetime (ms)
-- ARGV[6] stale grace G (ms, 0: off): a value whose PTTL is at most G is stale (kept only for fail-safe)
-- ARGV[7] refresh ahead R (ms, 0: off): a value whose PTTL is at most G + R is due for an eager refresh
-- ARGV[8] k, the number of tags the caller fills with, then the k tags; on Cluster then ns, class, m, and m
-- triples (tag, removal epoch, expiry epoch) from the handle's view (see kw_current).
-- Returns {0, stored [, fresh_ms]} a value (and how long it stays fresh) | {1, ns_gen, class_gen, tag_gen…} the caller now holds the lease (one tag_gen
-- per caller tag, in order) | {2, wait_ms [, stale]} another caller holds the lease (and the value it keeps)
--       | {3, tag…} (Cluster) the entry carries tags whose epochs were not passed: ask again with them
--       | {4, ns_gen, class_gen, tag_gen…, value} a current value; the caller now holds the lease to refresh it
--       | {5, ns_gen, class_gen, tag_gen…, kept_gen…, stale} a stale value; the caller now holds the lease to refill
--         it (kept_gen: for each tag the stale value carries, in its header's order, the larger of its current
--         epoch and the one the value recorded, which a fail-safe throttle records so that a removal during the
--         refill still removes the value; see kw_kept_epoch)
local v = redis.call('SET', KEYS[1], ARGV[2], 'NX', 'GET', 'PX', ARGV[3])
local mine = string.sub(ARGV[2], 1, -2)
local grace = tonumber(ARGV[6])
local ahead = tonumber(ARGV[7])
local lease_ms = tonumber(ARGV[3])
local tags, at = kw_tags(8)

local function flag(raw)
  if string.sub(raw, 37, 37) == '0' then
    redis.call('SET', KEYS[1], string.sub(raw, 1, 36) .. '1' .. string.sub(raw, 38), 'KEEPTTL')
  end
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The lease over a kept value `body`, held until now + lease ttl. With fail-safe the key lives at least that
-- long (the stale value must outlive the refill); without, it keeps its TTL: the value is never served past it.
local function lease_over(body, pttl)
  local marker = ARGV[2] .. ':' .. string.format('%d', now_ms() + lease_ms) .. ':' .. body
  local px = pttl
  if grace > 0 or pttl <= 0 then
    px = math.max(pttl, lease_ms)
  end
  redis.call('SET', KEYS[1], marker, 'PX', px)
end

-- The epoch a fail-safe throttle records for `tag`, which the kept value recorded at `recorded`: the current one
-- (so the expiry that made the value stale does not make the copy stale, and a removal after the grant lands
-- above it), or the value's own when that is higher — on Cluster `cur` is a view that may lag the fill that
-- recorded it, and a copy recorded below the value's epoch would read as removed to every up-to-date reader.
-- Only an epoch a fill can record counts: digits below the top (see "Exhaustion" in epochs.lua); anything else
-- was not written by keyward (and a value out of range would not even come back as an integer).
local function kw_kept_epoch(cur, tag, recorded)
  local e = kw_tag_epoch(cur, tag)
  local r = string.match(recorded, '^%d+$') and tonumber(recorded)
  if r and r < KW_TOP and r > e then
    return r
  end
  return e
end

local held_until = nil
local body = v
if v and string.sub(v, 1, 3) == 'L1:' and string.sub(v, 1, #mine) ~= mine then
  local deadline, rest = string.match(v, '^L1:%x+:%d:(%d+):()')
  local pttl = redis.call('PTTL', KEYS[1])
  if not deadline then
    if pttl >= 0 then
      -- Flag the lease so that its commit (or release) publishes a wake-up; only the first waiter pays the write.
      flag(v)
      return {2, pttl}
    end
    -- A lease without a TTL is corrupt data (keyward never writes one): nobody will fill it, so take it over.
    body = nil
  else
    body = string.sub(v, rest)
    local left = tonumber(deadline) - now_ms()
    if left > 0 then
      held_until = left
    end
  end
end
local vns, vcl, kind, vtags
if body and string.sub(body, 1, #mine) ~= mine then
  vns, vcl, kind, vtags = kw_header(body)
end
local ns, cl, cur = kw_current(ARGV[1], ARGV[5], tags, vtags or {}, at)
if not body then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return kw_stamp(1, ns, cl, tags, cur)
end
if string.sub(body, 1, #mine) == mine then
  -- Our own lease: the fast path took it and then could not read the epochs.
  return kw_stamp(1, ns, cl, tags, cur)
end
if not vns then
  -- Bytes we cannot read: the client decodes, reports and heals them (or waits for the holder).
  if held_until then
    flag(v)
    return {2, held_until}
  end
  return {0, body}
end
local stale = kw_stale(vns, vcl, vtags, ns, cl, cur)
-- Filled before a tag expiry: without fail-safe (or for a cached absent) it is gone; with it, it is stale: kept
-- under a refill lease, like a value within its grace.
local expired = stale == 'x' and grace > 0 and kind ~= 'n'
if stale == 'x' then
  stale = not expired
end
if stale == nil and not (kind == 'n' and ARGV[4] ~= '1') then
  return kw_unknown(vtags, cur)
end
if stale ~= false or (kind == 'n' and ARGV[4] ~= '1') then
  -- Filled before a group or tag invalidation (or an absent the caller cannot use): gone, not kept for
  -- fail-safe. Wait for the holder, or take a plain lease.
  if held_until then
    flag(v)
    return {2, held_until}
  end
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return kw_stamp(1, ns, cl, tags, cur)
end
local pttl = redis.call('PTTL', KEYS[1])
-- A cached absent has its own (shorter) TTL and is never kept for fail-safe nor refreshed ahead.
if kind == 'n' then
  return {0, body}
end
local fresh = not expired and (grace == 0 or pttl > grace)
if held_until then
  if fresh then
    -- Someone is refreshing it ahead of its expiry: everyone keeps getting the current value.
    return {0, body, math.max(pttl - grace, 0)}
  end
  flag(v)
  return {2, held_until, body}
end
if fresh and (ahead == 0 or pttl < 0 or pttl > grace + ahead) then
  return {0, body, math.max(pttl - grace, 0)}
end
lease_over(body, pttl)
local out = kw_stamp(fresh and 4 or 5, ns, cl, tags, cur)
if not fresh then
  for i = 1, #vtags, 2 do
    out[#out + 1] = kw_kept_epoch(cur, vtags[i], vtags[i + 1])
  end
end
out[#out + 1] = body
return out
