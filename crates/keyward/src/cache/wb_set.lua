-- Write-behind's cache set: set.lua (which follows this file, after epochs.lua) runs only if this write is newer
-- than every write-behind write the entry has taken, so that writes to one id from several processes leave
-- the cache at the newest one whatever order their sets arrive in (see `cache/write_behind.rs`).
-- KEYS as set.lua's, then last the entry's write-version marker `<entry key>:wv` (same hash tag)
-- ARGV as set.lua's, then last the write's version `ms-seq` (its stream entry id)
-- Returns 0, writing nothing, if the marker holds this version or a newer one; else records the version in the
-- marker (with the entry's TTL, ARGV[3]) and returns set.lua's 1. The marker and the version are taken off
-- KEYS and ARGV first, so set.lua and epochs.lua see exactly the keys and arguments they document.
local kw_wv_key = table.remove(KEYS)
local kw_wv = table.remove(ARGV)
local function kw_wv_parse(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  if ms == nil then
    return nil
  end
  return {tonumber(ms), tonumber(seq)}
end
local kw_wv_new = kw_wv_parse(kw_wv)
local kw_wv_cur = kw_wv_parse(redis.call('GET', kw_wv_key) or '')
if kw_wv_new == nil then
  return redis.error_reply('wb_set: bad version ' .. tostring(kw_wv))
end
if kw_wv_cur ~= nil and (kw_wv_cur[1] > kw_wv_new[1] or (kw_wv_cur[1] == kw_wv_new[1] and kw_wv_cur[2] >= kw_wv_new[2])) then
  return 0
end
redis.call('SET', kw_wv_key, kw_wv, 'PX', ARGV[3])
