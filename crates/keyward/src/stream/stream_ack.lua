-- Acknowledge an entry a handler succeeded on.
-- KEYS[1] the stream   ARGV[1] group   ARGV[2] entry id
-- Returns 1 if it was pending in the group, 0 if not (already acknowledged, or taken out of the list).
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
