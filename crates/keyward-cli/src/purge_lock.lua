-- The lock of a confirmed purge: one per class (one for all orphan purges) of a namespace, so two purges of the
-- same keys never run at once. Taken before the purge's first log entry, renewed while it runs, dropped at its end.
-- KEYS[1] the lock key ({env}:{app}:_kw:purging:…)
-- ARGV[1] this purge's value (a random token, then who, pid and start)   ARGV[2] the lock's TTL (ms)
-- ARGV[3] 'take' | 'keep' | 'replace' | 'drop'   ARGV[4] ('replace' only) the value of a dead holder
-- take, keep, replace: returns 'ok' when this purge holds the lock (set with SET … PX if free, ours, or — for
-- 'replace' — still the dead holder's; its TTL renewed), else the holder's value, untouched.
-- drop: deletes the lock if it is ours; returns 'ok'.
local held = redis.call('GET', KEYS[1])
if ARGV[3] == 'drop' then
  if held == ARGV[1] then
    redis.call('DEL', KEYS[1])
  end
  return 'ok'
end
if not held or held == ARGV[1] or (ARGV[3] == 'replace' and held == ARGV[4]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 'ok'
end
return held
