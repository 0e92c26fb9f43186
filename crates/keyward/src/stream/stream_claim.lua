-- Take an entry this consumer holds once more, for its next delivery (a retry after backoff), or keep entries
-- it holds from being reclaimed (JUSTID: idle time reset, delivery count unchanged). Only entries still
-- pending with this consumer are touched: one another worker reclaimed meanwhile stays with it.
-- KEYS[1] the stream   ARGV[1] group   ARGV[2] consumer   ARGV[3] "1": touch only (JUSTID)   ARGV[4..] ids
-- Returns, per id still held: touch: {id, …}; retry: {id, deliveries, payload, origin, …} (payload nil if the
-- entry is no longer in the stream: Redis 7.0's XCLAIM then removes it from the pending list, with JUSTID too;
-- origin: field `o` of a replayed dead letter, else nil).
local out = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] ~= nil and p[1][2] == ARGV[2] then
    if ARGV[3] == '1' then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
      out[#out + 1] = ARGV[i]
    else
      local e = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i])
      local payload, origin = false, false
      if e[1] then
        for j = 1, #e[1][2], 2 do
          if e[1][2][j] == 'm' then
            payload = e[1][2][j + 1]
          elseif e[1][2][j] == 'o' then
            origin = e[1][2][j + 1]
          end
        end
      end
      out[#out + 1] = ARGV[i]
      out[#out + 1] = p[1][4] + 1
      out[#out + 1] = payload
      out[#out + 1] = origin
    end
  end
end
return out
