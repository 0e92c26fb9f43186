-- Give a lease back (the request failed in a way a retry may fix). KEYS[1] the record. ARGV[1] lease token.
-- Reply 1 released, 0 not held.
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'p' or h[2] ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
