-- Delete a tower-sessions record. KEYS: the id's key under each accepted secret. Reply: how many existed.
-- Cluster: KEYS are one id under each secret, all in the slot the id names (see tower.rs): one slot.
return redis.call('DEL', unpack(KEYS))
