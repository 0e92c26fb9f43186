-- Get a value, or take the fill lease, atomically. The fast path (a pipelined SET NX GET + HMGET, see store.rs)
-- comes here only when it finds a lease held, a value from before a group or tag invalidation, an unusable
-- absent, or epochs it cannot read. (epochs.lua is prepended.)
-- KEYS[1] entry key   KEYS[2] namespace epochs hash (absent on Cluster: the epochs follow the tags in ARGV)
-- ARGV[1] class name  ARGV[2] lease marker "L1:<token>:0"  ARGV[3] lease ttl (ms)
-- ARGV[4] "1" if a cached absent ("n") counts as a hit   ARGV[5] epochs lifetime (ms)
-- ARGV[6] k, the number of tags the caller fills with, then the k tags; on Cluster then ns, class, m, and m
-- pairs (tag, epoch) from the handle's view (see kw_current).
-- Returns {0, stored} a value | {1, ns_gen, class_gen, tag_gen…} the caller now holds the lease (one tag_gen
-- per caller tag, in order) | {2, pttl_ms} another caller holds the lease
--       | {3, tag…} (Cluster) the entry carries tags whose epochs were not passed: ask again with them
local v = redis.call('SET', KEYS[1], ARGV[2], 'NX', 'GET', 'PX', ARGV[3])
local mine = string.sub(ARGV[2], 1, -2)
if v and string.sub(v, 1, 3) == 'L1:' and string.sub(v, 1, #mine) ~= mine then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl >= 0 then
    -- Flag the lease so that its commit (or release) publishes a wake-up; only the first waiter pays the write.
    if string.sub(v, -1) == '0' then
      redis.call('SET', KEYS[1], string.sub(v, 1, -2) .. '1', 'KEEPTTL')
    end
    return {2, pttl}
  end
  -- A lease without a TTL is corrupt data (keyward never writes one): nobody will fill it, so take it over.
  v = nil
end
local tags, at = kw_tags(6)
local vns, vcl, kind, vtags
if v and string.sub(v, 1, #mine) ~= mine then
  vns, vcl, kind, vtags = kw_header(v)
end
local ns, cl, cur = kw_current(ARGV[1], ARGV[5], tags, vtags or {}, at)
if not v then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return kw_stamp(1, ns, cl, tags, cur)
end
if string.sub(v, 1, #mine) == mine then
  -- Our own lease: the fast path took it and then could not read the epochs.
  return kw_stamp(1, ns, cl, tags, cur)
end
if vns then
  local stale = kw_stale(vns, vcl, vtags, ns, cl, cur)
  if stale == nil and not (kind == 'n' and ARGV[4] ~= '1') then
    return kw_unknown(vtags, cur)
  end
  if stale ~= false or (kind == 'n' and ARGV[4] ~= '1') then
    -- Filled before a group or tag invalidation (or an absent the caller cannot use): a miss; take the lease.
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return kw_stamp(1, ns, cl, tags, cur)
  end
end
-- A current value, or bytes we cannot read (the client decodes, reports and heals them).
return {0, v}
