-- Store several filled values, each only if its caller's lease is still held: commit.lua for each entry in
-- turn, in one script call (batched fenced fills; the calls of concurrent callers that met in one batch).
-- Each entry is decided alone: an error on one key (a key of another type, a write refused for memory) is
-- that entry's answer and does not stop the others.
-- KEYS[i] entry key i
-- ARGV[4i-3] its lease prefix "L1:<token>:"  ARGV[4i-2] its value  ARGV[4i-1] its ttl (ms)
-- ARGV[4i] its wake-up channel (sharded on Cluster: ends in '}')
-- Returns, per entry in order: 1 if stored, 0 if refused, or -1 followed by the error reply's text.
local out = {}
local function failed(reply)
  out[#out + 1] = -1
  out[#out + 1] = reply.err
end
for i = 1, #KEYS do
  local key, at = KEYS[i], 4 * (i - 1)
  local prefix = ARGV[at + 1]
  local head = redis.pcall('GETRANGE', key, '0', '127')
  if type(head) == 'table' then
    failed(head)
  elseif string.sub(head, 1, #prefix) ~= prefix then
    out[#out + 1] = 0
  else
    local set = redis.pcall('SET', key, ARGV[at + 2], 'PX', ARGV[at + 3])
    if type(set) == 'table' and set.err then
      failed(set)
    else
      -- The waiter flag is byte 37 of every lease marker (see fetch.lua).
      if string.sub(head, 37, 37) == '1' then
        local channel = ARGV[at + 4]
        local published
        if string.sub(channel, -1) == '}' then
          published = redis.pcall('SPUBLISH', channel, key)
        else
          published = redis.pcall('PUBLISH', channel, key)
        end
        -- As commit.lua, whose call fails there (the value stays stored): a missing grant must show.
        if type(published) == 'table' and published.err then
          failed(published)
        else
          out[#out + 1] = 1
        end
      else
        out[#out + 1] = 1
      end
    end
  end
end
return out
