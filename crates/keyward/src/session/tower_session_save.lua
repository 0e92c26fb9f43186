-- Update an existing tower-sessions record; a record that is gone (deleted, expired) stays gone.
-- KEYS: the id's key under each accepted secret, current first. ARGV: value, TTL ms (> 0).
-- The record moves to KEYS[1], so a saved record is always keyed under the current secret.
-- Reply 1 if stored, 0 if there was no record.
-- Cluster: KEYS are one id under each secret, all in the slot the id names (see tower.rs): one slot.
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if i > 1 then
      redis.call('DEL', KEYS[i])
    end
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
  end
end
return 0
