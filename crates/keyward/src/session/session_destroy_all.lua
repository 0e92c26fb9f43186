-- Delete every session of a user, and the index. KEYS[1] the user's index. Reply: how many sessions.
-- Cluster: the index's members are session keys built in the index's slot; they are not in KEYS, but a script
-- may touch undeclared keys of the slot it runs in.
local n = 0
for _, s in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  n = n + redis.call('DEL', s)
end
redis.call('DEL', KEYS[1])
return n
