-- Remove one entry's value or lease. A fill leased before this can no longer commit.
-- KEYS[1] entry key   ARGV[1] wake-up channel (sharded on Cluster: ends in '}')
-- Returns the number of keys removed (0 or 1).
local head = redis.call('GETRANGE', KEYS[1], 0, 127)
local n = redis.call('DEL', KEYS[1])
if string.sub(head, 1, 3) == 'L1:' and string.sub(head, 37, 37) == '1' then
  if string.sub(ARGV[1], -1) == '}' then
    redis.call('SPUBLISH', ARGV[1], KEYS[1])
  else
    redis.call('PUBLISH', ARGV[1], KEYS[1])
  end
end
return n
