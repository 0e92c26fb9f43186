-- Give a lease back (the loader failed) so a waiter takes over now instead of at expiry. A lease taken over a
-- kept value (fail-safe, eager refresh; see fetch.lua) gives the value back, with the key's remaining TTL.
-- KEYS[1] entry key   ARGV[1] lease prefix "L1:<token>:"   ARGV[2] wake-up channel (sharded on Cluster: ends in '}')
-- Returns 1 if the lease was held and is now gone, 0 otherwise.
local head = redis.call('GETRANGE', KEYS[1], 0, 127)
if string.sub(head, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
if string.match(head, '^L1:%x+:%d:%d+:') then
  local v = redis.call('GET', KEYS[1])
  local rest = string.match(v, '^L1:%x+:%d:%d+:()')
  redis.call('SET', KEYS[1], string.sub(v, rest), 'KEEPTTL')
else
  redis.call('DEL', KEYS[1])
end
if string.sub(head, 37, 37) == '1' then
  if string.sub(ARGV[2], -1) == '}' then
    redis.call('SPUBLISH', ARGV[2], KEYS[1])
  else
    redis.call('PUBLISH', ARGV[2], KEYS[1])
  end
end
return 1
