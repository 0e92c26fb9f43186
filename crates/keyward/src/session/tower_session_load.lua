-- Load a tower-sessions record. KEYS: the record's key under each accepted secret, current first.
-- Reply: the stored value of the first key that exists, or nil.
-- Cluster: KEYS are one id under each secret, all in the slot the id names (see tower.rs): one slot.
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then
    return v
  end
end
return false
