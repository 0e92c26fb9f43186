-- Delete an entry only if it still holds exactly the bytes that failed to decode.
-- KEYS[1] entry key   ARGV[1] the bytes
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
