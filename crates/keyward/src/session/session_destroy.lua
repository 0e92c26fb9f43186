-- Delete sessions and their index entries. KEYS: session keys. ARGV[1]: if not empty, only delete a session
-- whose index is this key (a user ending one of their own sessions by id). Reply: how many were deleted.
local n = 0
for k = 1, #KEYS do
  local idx = redis.call('HGET', KEYS[k], 'i')
  if idx and (ARGV[1] == '' or ARGV[1] == idx) then
    redis.call('ZREM', idx, KEYS[k])
    n = n + redis.call('DEL', KEYS[k])
  end
end
return n
