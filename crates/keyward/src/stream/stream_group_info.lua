-- What a consumer group holds: for lag, pending and oldest-pending-age gauges.
-- KEYS[1] the stream   ARGV[1] group
-- Returns {} if the group (or the stream) does not exist, else {consumers, pending, lag or -1 if Redis cannot
-- count it, oldest pending id or nil, the server's time in ms}.
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok then
  return {}
end
for _, info in ipairs(groups) do
  local f = {}
  for j = 1, #info, 2 do
    f[info[j]] = info[j + 1]
  end
  if f['name'] == ARGV[1] then
    local oldest = false
    if tonumber(f['pending']) > 0 then
      oldest = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
    end
    local lag = f['lag']
    if lag == nil or lag == false then
      lag = -1
    end
    local t = redis.call('TIME')
    return {f['consumers'], f['pending'], lag, oldest, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
  end
end
return {}
