-- Get a value, or take the fill lease, atomically. The fast path (a pipelined SET NX GET + HMGET, see mod.rs)
-- comes here only when it finds a lease held, a value from before a group invalidation, an unusable absent,
-- or epochs it cannot read. (epochs.lua is prepended.)
-- KEYS[1] entry key   KEYS[2] namespace epochs hash (absent on Cluster: ARGV[6], ARGV[7] give the epochs)
-- ARGV[1] class name  ARGV[2] lease marker "L1:<token>:0"  ARGV[3] lease ttl (ms)
-- ARGV[4] "1" if a cached absent ("n") counts as a hit   ARGV[5] epochs lifetime (ms)
-- Returns {0, stored} a value | {1, ns_gen, class_gen} the caller now holds the lease
--       | {2, pttl_ms} another caller holds the lease
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
local ns, cl = kw_current(ARGV[1], ARGV[5], ARGV[6], ARGV[7])
if not v then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {1, ns, cl}
end
if string.sub(v, 1, #mine) == mine then
  -- Our own lease: the fast path took it and then could not read the epochs.
  return {1, ns, cl}
end
local vns, vcl, kind = string.match(v, '^V1:(%d+):(%d+):(%a):')
if vns and (kw_stale(vns, vcl, ns, cl) or (kind == 'n' and ARGV[4] ~= '1')) then
  -- Filled before a group invalidation (or an absent the caller cannot use): a miss; take the lease.
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {1, ns, cl}
end
-- A current value, or bytes we cannot read (the client decodes, reports and heals them).
return {0, v}
