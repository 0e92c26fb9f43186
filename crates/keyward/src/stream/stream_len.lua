-- The number of entries in a stream.
-- KEYS[1] the stream
-- Returns XLEN (0 when there is no stream).
return redis.call('XLEN', KEYS[1])
