-- One rate-limit check over one or more limits, all or nothing, on the server's clock.
-- Mirror of src/rate_limit/algo.rs (same formulas, same order of floating-point operations).
-- KEYS[i]: the key of limit i (all keys of one identity share a hash tag).
-- ARGV: cost, consume ('1' or '0'), nonce, then 6 per limit: code, limit, window_us, capacity, interval_us, shadow.
-- Reply: {allowed, then per limit: allowed, remaining, reset_us, retry_us, corrupt (1: the stored state was
-- corrupt, was deleted and treated as absent)}.
-- Errors: a key holding another Redis type than the algorithm keeps (a list where GCRA keeps a string) fails
-- the whole call with a `WRONGTYPE keyward rate-limit state …` error before anything is charged.
--
-- Corrupt state (the rules of `sanitize` in algo.rs): text that is not non-negative integers, a field outside the
-- class's range, or a time more than one horizon beyond what the class writes. Such a key is deleted and the
-- identity starts afresh: `1e300` is never a lockout.
--
-- Written flat, without local functions or per-limit tables: a closure or a table created on every call costs
-- more server time than the algorithm itself. Integers above 10^14 are formatted with '%d' because Redis would
-- print a Lua number with %.14g.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local consume = ARGV[2] == '1'
local floor, ceil, max, min, fmt = math.floor, math.ceil, math.max, math.min, string.format
local n = #KEYS

-- Fast path: one GCRA limit (the common case) holding a clean state. The same formulas as the GCRA branch
-- below, without the bookkeeping for groups; anything unusual (a wrong type, a corrupt value) falls through to
-- the general path, which handles it. A TTL in milliseconds stays below 10^14, so it may be passed as a number.
if n == 1 and ARGV[4] == '5' then
  local cap, interval = tonumber(ARGV[7]), tonumber(ARGV[8])
  local tau = cap * interval
  local v = redis.pcall('GET', KEYS[1])
  local tat = now
  local clean = true
  if v then
    clean = type(v) == 'string' and string.match(v, '^%d+$') ~= nil
    if clean then
      tat = tonumber(v)
      clean = tat <= now + 2 * tau
    end
  end
  if clean then
    if tat < now then tat = now end
    local new_tat = tat + cost * interval
    local ttl = new_tat - now
    local available = max(0, floor((tau - (tat - now)) / interval))
    if ttl <= tau then
      if consume then
        redis.call('SET', KEYS[1], fmt('%d', new_tat), 'PX', max(1, ceil(ttl / 1000)))
        return { 1, 1, available - cost, ttl, 0, 0 }
      end
      return { 1, 1, available, tat - now, 0, 0 }
    end
    local all = 0
    if ARGV[9] == '1' then all = 1 end
    return { all, 0, available, tat - now, max(1, ttl - tau), 0 }
  end
end

-- Per limit i: av[i] available, ok[i] allowed, rs[i] reset if nothing is written, rt[i] retry if refused,
-- tl[i] TTL (µs) of the state to write, val[i] the string to SET (nil for the sorted set of the sliding log),
-- cr[i] 1 when its stored state was corrupt.
local av, ok, rs, rt, tl, val, cr = {}, {}, {}, {}, {}, {}, {}
local all = true

for i = 1, n do
  local b = 3 + (i - 1) * 6
  local code = tonumber(ARGV[b + 1])
  local limit = tonumber(ARGV[b + 2])
  local w = tonumber(ARGV[b + 3])
  local key = KEYS[i]
  local available, allowed, reset_now, retry, ttl, value
  local bad = false

  -- The one read that would meet a key of the wrong type: the sliding log's trim, everyone else's GET.
  local v
  if code == 2 then
    v = redis.pcall('ZREMRANGEBYSCORE', key, '-inf', fmt('%d', now - w))
  else
    v = redis.pcall('GET', key)
  end
  if type(v) == 'table' and v.err then
    if string.sub(v.err, 1, 9) ~= 'WRONGTYPE' then return v end
    local kind = redis.call('TYPE', key).ok
    local want = 'string'
    if code == 2 then want = 'sorted set' end
    return redis.error_reply('WRONGTYPE keyward rate-limit state ' .. (string.gsub(key, '{.*$', '{<id>}')) ..
      ' for this identity is a ' .. kind .. ', not the ' .. want .. ' its algorithm keeps (written by' ..
      ' something else, or the class changed algorithm without a new version): nothing was charged; this' ..
      ' identity fails until the key is deleted or expires')
  end

  if code == 5 then -- GCRA
    local cap, interval = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
    local tau = cap * interval
    local tat = now
    if v then
      if string.match(v, '^%d+$') and tonumber(v) <= now + 2 * tau then tat = tonumber(v) else bad = true end
    end
    if tat < now then tat = now end
    local new_tat = tat + cost * interval
    ttl = new_tat - now
    available = max(0, floor((tau - (tat - now)) / interval))
    allowed = ttl <= tau
    reset_now = tat - now
    retry = ttl - tau
    value = fmt('%d', new_tat)

  elseif code == 1 then -- fixed window
    local idx = floor(now / w)
    local count = 0
    if v then
      local s, c = string.match(v, '^(%d+) (%d+)$')
      if s and tonumber(c) <= limit then
        if tonumber(s) == idx then count = tonumber(c) end
      else
        bad = true
      end
    end
    available = max(0, limit - count)
    allowed = cost <= available
    ttl = (idx + 1) * w - now
    reset_now = 0
    if count > 0 then reset_now = ttl end
    retry = ttl
    value = fmt('%d %d', idx, count + cost)

  elseif code == 4 then -- token bucket
    local cap, interval = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
    local tokens, last = cap, now
    if v then
      local x, y = string.match(v, '^(%d+) (%d+)$')
      if x and tonumber(x) <= cap and tonumber(y) <= now + cap * interval then
        tokens, last = tonumber(x), tonumber(y)
      else
        bad = true
      end
    end
    if now > last then
      local add = floor((now - last) / interval)
      tokens = min(cap, tokens + add)
      if tokens == cap then last = now else last = last + add * interval end
    end
    available = tokens
    allowed = cost <= tokens
    reset_now = 0
    if tokens < cap then reset_now = max(0, (cap - tokens) * interval - (now - last)) end
    retry = (cost - tokens) * interval - (now - last)
    local after = tokens - cost
    ttl = 0
    if after < cap then ttl = max(0, (cap - after) * interval - (now - last)) end
    value = fmt('%d %d', after, last)

  elseif code == 3 then -- sliding counter
    local idx = floor(now / w)
    local elapsed = now - idx * w
    local curr, prev = 0, 0
    if v then
      local s, c, p = string.match(v, '^(%d+) (%d+) (%d+)$')
      if s and tonumber(c) <= limit and tonumber(p) <= limit then
        s = tonumber(s)
        if s == idx then curr, prev = tonumber(c), tonumber(p)
        elseif s == idx - 1 then prev = tonumber(c) end
      else
        bad = true
      end
    end
    local est = prev * (w - elapsed) / w + curr
    available = max(0, floor(limit - est))
    allowed = est + cost <= limit
    retry = 0
    if not allowed then
      if curr + cost <= limit and prev > 0 then
        retry = ceil(w - (limit - curr - cost) * w / prev) - elapsed
      else
        local at = 0
        if curr > 0 then at = ceil(w - (limit - cost) * w / curr) end
        retry = (w - elapsed) + max(0, at)
      end
    end
    if curr > 0 then reset_now = (idx + 2) * w - now
    elseif prev > 0 then reset_now = (idx + 1) * w - now
    else reset_now = 0 end
    ttl = (idx + 2) * w - now
    value = fmt('%d %d %d', idx, curr + cost, prev)

  else -- 2: sliding log (already trimmed to the window above)
    local count = redis.call('ZCARD', key)
    local newest = nil
    if count > 0 then
      newest = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2])
      if count > limit or newest > now + w then
        bad = true
        count = 0
      end
    end
    available = max(0, limit - count)
    allowed = cost <= available
    reset_now = 0
    if count > 0 then reset_now = newest + w - now end
    retry = 0
    local need = count + cost - limit
    if need >= 1 then
      local e = redis.call('ZRANGE', key, need - 1, need - 1, 'WITHSCORES')
      if e[2] then retry = tonumber(e[2]) + w - now else retry = w end
    end
    ttl = w
  end

  if bad then
    redis.call('DEL', key)
    cr[i] = 1
  else
    cr[i] = 0
  end
  av[i], ok[i], rs[i], rt[i], tl[i], val[i] = available, allowed, reset_now, retry, ttl, value
  if not allowed and ARGV[b + 6] ~= '1' then all = false end
end

local reply = { 0 }
if all then reply[1] = 1 end
for i = 1, n do
  local p = 1 + (i - 1) * 5
  if ok[i] and all and consume then
    local ms = fmt('%d', max(1, ceil(tl[i] / 1000)))
    if val[i] then
      redis.call('SET', KEYS[i], val[i], 'PX', ms)
    else
      local stamp = fmt('%d', now)
      local prefix = stamp .. ':' .. ARGV[3] .. ':'
      local j = 0
      while j < cost do
        local args = {}
        local k = 0
        while j < cost and k < 200 do
          args[#args + 1] = stamp
          args[#args + 1] = prefix .. j
          j = j + 1
          k = k + 1
        end
        redis.call('ZADD', KEYS[i], unpack(args))
      end
      redis.call('PEXPIRE', KEYS[i], ms)
    end
    reply[p + 1], reply[p + 2], reply[p + 3], reply[p + 4] = 1, av[i] - cost, tl[i], 0
  elseif ok[i] then
    reply[p + 1], reply[p + 2], reply[p + 3], reply[p + 4] = 1, av[i], rs[i], 0
  else
    reply[p + 1], reply[p + 2], reply[p + 3], reply[p + 4] = 0, av[i], rs[i], max(1, rt[i])
  end
  reply[p + 5] = cr[i]
end
return reply
