-- Give back the fill leases one batch fetch may have taken when its pipeline got no answer (its undo), so
-- that waiters elsewhere take over now rather than when the leases expire. Each entry is released only while
-- it still holds this very lease, exactly as release.lua does for one.
-- KEYS[1..n] entry keys (all in one Cluster slot)
-- ARGV[1] lease prefix "L1:<token>:"   ARGV[1 + i] wake-up channel of KEYS[i] (sharded on Cluster: ends in '}')
-- Returns the number of leases released.
local released = 0
for i, key in ipairs(KEYS) do
  local head = redis.call('GETRANGE', key, 0, 127)
  if string.sub(head, 1, #ARGV[1]) == ARGV[1] then
    if string.match(head, '^L1:%x+:%d:%d+:') then
      -- A lease over a kept value gives the value back (see release.lua).
      local v = redis.call('GET', key)
      redis.call('SET', key, string.sub(v, string.match(v, '^L1:%x+:%d:%d+:()')), 'KEEPTTL')
    else
      redis.call('DEL', key)
    end
    released = released + 1
    if string.sub(head, 37, 37) == '1' then
      local channel = ARGV[1 + i]
      if string.sub(channel, -1) == '}' then
        redis.call('SPUBLISH', channel, key)
      else
        redis.call('PUBLISH', channel, key)
      end
    end
  end
end
return released
