-- Store a filled value only if the caller's lease is still held (fenced fill).
-- An invalidation deletes the lease, so a fill leased before it is refused here.
-- KEYS[1] entry key
-- ARGV[1] lease prefix "L1:<token>:"  ARGV[2] value  ARGV[3] ttl (ms)  ARGV[4] wake-up channel (sharded on Cluster: ends in '}')
-- Returns 1 if stored, 0 if refused.
local head = redis.call('GETRANGE', KEYS[1], '0', '127')
if string.sub(head, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
-- The waiter flag is byte 37 of every lease marker (see fetch.lua).
if string.sub(head, 37, 37) == '1' then
  if string.sub(ARGV[4], -1) == '}' then
    redis.call('SPUBLISH', ARGV[4], KEYS[1])
  else
    redis.call('PUBLISH', ARGV[4], KEYS[1])
  end
end
return 1
