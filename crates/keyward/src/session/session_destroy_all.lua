-- Delete every session of a user, and the index. KEYS[1] the user's index. Reply: how many sessions.
local n = 0
for _, s in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  n = n + redis.call('DEL', s)
end
redis.call('DEL', KEYS[1])
return n
