-- Create a consumer group if it does not exist (creating an empty stream if needed).
-- KEYS[1] the stream
-- ARGV[1] the group   ARGV[2] where a new group starts: "0" (the oldest entry kept) or "$" (new entries only)
-- Returns 1 if the group was created, 0 if it existed (BUSYGROUP is success).
local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
if ok then
  return 1
end
if string.find(tostring(err.err or err), 'BUSYGROUP', 1, true) then
  return 0
end
return redis.error_reply(tostring(err.err or err))
