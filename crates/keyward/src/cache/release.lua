-- Give a lease back (the loader failed) so a waiter takes over now instead of at expiry.
-- KEYS[1] entry key   ARGV[1] lease prefix "L1:<token>:"   ARGV[2] wake-up channel (sharded on Cluster: ends in '}')
-- Returns 1 if the lease was held and is now gone, 0 otherwise.
local head = redis.call('GETRANGE', KEYS[1], 0, 127)
if string.sub(head, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if string.sub(head, -1) == '1' then
  if string.sub(ARGV[2], -1) == '}' then
    redis.call('SPUBLISH', ARGV[2], KEYS[1])
  else
    redis.call('PUBLISH', ARGV[2], KEYS[1])
  end
end
return 1
