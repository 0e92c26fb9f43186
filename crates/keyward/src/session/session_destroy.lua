-- Delete sessions and their index entries. KEYS: session keys, then, if ARGV[1] is '1', the user's index
-- last: only a session indexed under that key is deleted (a user ending one of their own sessions by id).
-- Reply: how many were deleted.
-- Cluster: every key is in one slot. A session's index (its field `i`) is not always in KEYS, but it is in
-- the session's slot by construction, and Redis Cluster lets a script touch undeclared keys of its slot.
local n = #KEYS
local only = false
if ARGV[1] == '1' then
  only = KEYS[n]
  n = n - 1
end
local deleted = 0
for k = 1, n do
  local idx = redis.call('HGET', KEYS[k], 'i')
  if idx and (not only or only == idx) then
    redis.call('ZREM', idx, KEYS[k])
    deleted = deleted + redis.call('DEL', KEYS[k])
  end
end
return deleted
