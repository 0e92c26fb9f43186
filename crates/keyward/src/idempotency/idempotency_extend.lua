-- Push back the expiry of an in-progress lease the caller still holds (a long request's heartbeat).
-- KEYS[1] the record. ARGV: lease token, lease ms. Reply 1 extended, 0 not held.
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'p' or h[2] ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
