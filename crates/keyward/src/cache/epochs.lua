-- Shared by the cache scripts (prepended to fetch.lua, read.lua, set.lua and bump.lua): the group epochs.
-- An epoch is a decimal integer below 2^53. A bump takes max(current + 1, server time in µs), so an epoch never
-- repeats, even after the epochs hash expired and was created again: an entry filled before an invalidation
-- can never match a later epoch. A field that is not such an integer (or a key that is not a hash) is corrupt:
-- it is bumped on the spot, which is always safe (entries filled before it read as misses), so one bad field
-- never fails every call of the namespace.
local function kw_bump(hash, field, lifetime_ms)
  local n = tonumber(redis.pcall('HGET', hash, field))
  if type(n) ~= 'number' or n ~= math.floor(n) or n < 0 or n >= 9007199254740992 then
    n = 0
  end
  if redis.call('TYPE', hash).ok ~= 'hash' then
    redis.call('DEL', hash)
  end
  local t = redis.call('TIME')
  -- µs, not ms: two scripts never run within the same µs, so even a bump that lost the previous value (a
  -- corrupt field, or a hash that expired) lands above every epoch issued before it.
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  n = math.max(n + 1, now_us)
  redis.call('HSET', hash, field, string.format('%d', n))
  if redis.call('PTTL', hash) < tonumber(lifetime_ms) then
    redis.call('PEXPIRE', hash, lifetime_ms)
  end
  return n
end

-- Whether a stored epoch field is a valid epoch.
local function kw_valid(v)
  return string.match(v, '^%d+$') ~= nil and #v <= 16 and tonumber(v) < 9007199254740992
end

-- The namespace ('*') and class epochs as strings ('0' when never bumped), repairing corrupt ones.
local function kw_epochs(hash, class, lifetime_ms)
  local g = redis.pcall('HMGET', hash, '*', class)
  local wrong_type = type(g) ~= 'table' or g.err ~= nil
  if wrong_type then
    g = {false, false}
  end
  local fields = {'*', class}
  local out = {}
  for i = 1, 2 do
    local v = g[i]
    if wrong_type or (v and not kw_valid(v)) then
      v = string.format('%d', kw_bump(hash, fields[i], lifetime_ms))
    end
    out[i] = v or '0'
  end
  return out[1], out[2]
end

-- The epochs to compare entries with: read from the hash (KEYS[2]) on a single server; on Redis Cluster, where
-- the hash lives in another slot, the caller passes them from its bounded view (and KEYS[2] is absent).
local function kw_current(class, lifetime_ms, given_ns, given_cl)
  if #KEYS > 1 then
    return kw_epochs(KEYS[2], class, lifetime_ms)
  end
  return given_ns, given_cl
end

-- Whether an entry filled under (vns, vcl) predates the epochs (ns, cl). Epochs only grow, so on a single
-- server this is inequality; on Cluster a view may lag the entry's epochs, and a newer entry is current.
local function kw_stale(vns, vcl, ns, cl)
  return tonumber(vns) < tonumber(ns) or tonumber(vcl) < tonumber(cl)
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
