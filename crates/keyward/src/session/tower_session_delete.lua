-- Delete a tower-sessions record. KEYS: the id's key under each accepted secret. Reply: how many existed.
return redis.call('DEL', unpack(KEYS))
