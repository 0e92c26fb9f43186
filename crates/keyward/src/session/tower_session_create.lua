-- Create a tower-sessions record; never overwrites. KEYS: the new id's key under each accepted secret,
-- current first. ARGV: value, TTL ms (> 0). Reply 1 if stored under KEYS[1], 0 if the id is taken under any
-- secret (the caller picks another id).
-- Cluster: KEYS are one id under each secret, all in the slot the id names (see tower.rs): one slot.
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
