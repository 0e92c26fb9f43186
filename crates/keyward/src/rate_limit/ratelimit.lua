-- Rate-limit checks, each over one or more limits, all or nothing, on the server's clock: one check, or a
-- batch of concurrent checks (any identities, any classes of one namespace) decided one after the other,
-- each exactly as if it ran alone, under one reading of TIME.
-- Mirror of src/rate_limit/algo.rs (same formulas, same order of floating-point operations).
-- KEYS: the keys of check 1's limits, then check 2's, ... (the keys of one check share a hash tag; on Cluster
-- every check of one call is in one slot).
-- ARGV: nonce; G, the number of limit groups (a limiter's classes), then per group: n (its number of
-- limits) and 6 per limit: code, limit, window_us, capacity, interval_us, shadow ('1' or '0'); then per
-- check: its group (1-based) and its cost (negative: a peek of that cost, charging nothing). The numbers of
-- a group are read once per call, however many checks use it.
-- Reply: one flat array; per check {allowed, then per limit: allowed, remaining, reset_us, retry_us, corrupt
-- (1: the stored state was corrupt, was deleted and treated as absent)}, or {-1, message} for a check one of
-- whose keys holds another Redis type than its algorithm keeps (a list where GCRA keeps a string): that check
-- charges nothing, and the checks after it go on.
--
-- Corrupt state (the rules of `sanitize` in algo.rs): text that is not non-negative integers, a field outside the
-- class's range, or a time more than one horizon beyond what the class writes. Such a key is deleted and the
-- identity starts afresh: `1e300` is never a lockout.
--
-- Written flat, without local functions: a closure or a table created per check costs more server time
-- than the algorithm itself; the few tables are made once per call and reused by every check. Integers above
-- 10^14 are formatted with '%d' because Redis would print a Lua number with %.14g.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local floor, ceil, max, min, fmt = math.floor, math.ceil, math.max, math.min, string.format
local nonce = ARGV[1]

-- The groups, 3 slots each in G: n (its limits), l0 (its first limit is limit l0 + 1 of L), and a lone
-- GCRA limit's tau (the fast path) or false. The limits, 6 slots each in L: code, limit, window, capacity,
-- interval, shadow (a boolean). Two flat tables: a table per field would cost more than a lone check.
local G, L = {0, 0, false}, {0, 0, 0, 0, 0, false} -- sized for the common case: one group, one limit
local a = 3
local nl = 0
for g = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a])
  local gb = (g - 1) * 3
  G[gb + 1], G[gb + 2] = n, nl
  for i = 1, n do
    local b = a + (i - 1) * 6
    local lb = nl * 6
    L[lb + 1], L[lb + 2], L[lb + 3] = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    L[lb + 4], L[lb + 5], L[lb + 6] = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5]), ARGV[b + 6] == '1'
    nl = nl + 1
  end
  G[gb + 3] = n == 1 and L[nl * 6 - 5] == 5 and L[nl * 6 - 2] * L[nl * 6 - 1]
  a = a + 1 + 6 * n
end

local out, o = {0, 0, 0, 0, 0, 0}, 0 -- the reply (sized for one check of one limit) and its length
local kb = 0 -- KEYS[kb + i] is limit i of the current check
local seq = 0 -- the current check's position in the call (for the sliding log's member names)
-- Per limit i of the current check, made at the first check that takes the general path: av[i]
-- available, ok[i] allowed, rs[i] reset if nothing is written, rt[i] retry if refused, tl[i] TTL (µs) of
-- the state to write, val[i] the string to SET (false for the sorted set of the sliding log), cr[i] 1 when
-- its stored state was corrupt.
local av, ok, rs, rt, tl, val, cr

while a <= #ARGV do
  local g = tonumber(ARGV[a])
  local cost = tonumber(ARGV[a + 1])
  local consume = cost > 0
  if not consume then cost = -cost end
  local gb = (g - 1) * 3
  local n, l0 = G[gb + 1], G[gb + 2]
  a = a + 2
  seq = seq + 1
  local done = false

  -- Fast path: one GCRA limit (the common case) holding a clean state. The same formulas as the GCRA branch
  -- below, without the bookkeeping for groups; anything unusual (a wrong type, a corrupt value) falls through
  -- to the general path, which handles it. A TTL in milliseconds stays below 10^14, so it may be passed as a
  -- number.
  local tau = G[gb + 3]
  if tau then
    local key = KEYS[kb + 1]
    local interval = L[l0 * 6 + 5]
    local v = redis.pcall('GET', key)
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
          redis.call('SET', key, fmt('%d', new_tat), 'PX', max(1, ceil(ttl / 1000)))
          out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] = 1, 1, available - cost, ttl, 0, 0
        else
          out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] = 1, 1, available, tat - now, 0, 0
        end
      else
        local all = 0
        if L[l0 * 6 + 6] then all = 1 end
        out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] =
          all, 0, available, tat - now, max(1, ttl - tau), 0
      end
      o = o + 6
      done = true
    end
  end
  if not done then
    if not av then av, ok, rs, rt, tl, val, cr = {}, {}, {}, {}, {}, {}, {} end
    local all = true
    local failed = nil -- the WRONGTYPE message of this check, if one of its keys holds another type
    local i = 1
    while i <= n and not failed do
      local lb = (l0 + i - 1) * 6
      local code, limit, w = L[lb + 1], L[lb + 2], L[lb + 3]
      local key = KEYS[kb + i]
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
        failed = 'WRONGTYPE keyward rate-limit state ' .. (string.gsub(key, '{.*$', '{<id>}')) ..
          ' for this identity is a ' .. kind .. ', not the ' .. want .. ' its algorithm keeps (written by' ..
          ' something else, or the class changed algorithm without a new version): nothing was charged; this' ..
          ' identity fails until the key is deleted or expires'
      elseif code == 5 then -- GCRA
        local interval = L[lb + 5]
        local tau = L[lb + 4] * interval
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
        local cap, interval = L[lb + 4], L[lb + 5]
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
        value = false
      end

      if not failed then
        if bad then
          redis.call('DEL', key)
          cr[i] = 1
        else
          cr[i] = 0
        end
        av[i], ok[i], rs[i], rt[i], tl[i], val[i] = available, allowed, reset_now, retry, ttl, value
        if not allowed and not L[lb + 6] then all = false end
      end
      i = i + 1
    end

    if failed then
      -- Nothing of this check was written: its reads come before any write.
      out[o + 1], out[o + 2] = -1, failed
      o = o + 2
    else
      if all then out[o + 1] = 1 else out[o + 1] = 0 end
      o = o + 1
      for j = 1, n do
        if ok[j] and all and consume then
          local key = KEYS[kb + j]
          local ms = fmt('%d', max(1, ceil(tl[j] / 1000)))
          if val[j] then
            redis.call('SET', key, val[j], 'PX', ms)
          else
            local stamp = fmt('%d', now)
            local prefix = stamp .. ':' .. nonce .. ':' .. seq .. ':'
            local m = 0
            while m < cost do
              local args = {}
              local k = 0
              while m < cost and k < 200 do
                args[#args + 1] = stamp
                args[#args + 1] = prefix .. m
                m = m + 1
                k = k + 1
              end
              redis.call('ZADD', key, unpack(args))
            end
            redis.call('PEXPIRE', key, ms)
          end
          out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 1, av[j] - cost, tl[j], 0
        elseif ok[j] then
          out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 1, av[j], rs[j], 0
        else
          out[o + 1], out[o + 2], out[o + 3], out[o + 4] = 0, av[j], rs[j], max(1, rt[j])
        end
        out[o + 5] = cr[j]
        o = o + 5
      end
    end
  end

  kb = kb + n
end
-- A reply shorter than the slots made up front (a lone check that failed with a wrong type) ends at the
-- first nil: Redis converts an array up to it.
out[o + 1] = nil
return out
