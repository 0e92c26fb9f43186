-- One rate-limit check over one or more limits, all or nothing, on the server's clock.
-- Mirror of src/rate_limit/algo.rs (same formulas, same order of floating-point operations).
-- KEYS[i]: the key of limit i (all keys of one identity share a hash tag).
-- ARGV: cost, consume ('1' or '0'), nonce, then 6 per limit: code, limit, window_us, capacity, interval_us, shadow.
-- Reply: {allowed, then per limit: allowed, remaining, reset_us, retry_us}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local consume = ARGV[2] == '1'
local nonce = ARGV[3]
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min

-- Redis would print a Lua number with %.14g; integers above that must be formatted explicitly.
local function int(x) return string.format('%d', x) end
local function ms(us) return int(max(1, ceil(us / 1000))) end

local function counter_reset(w, idx, curr, prev)
  if curr > 0 then return (idx + 2) * w - now end
  if prev > 0 then return (idx + 1) * w - now end
  return 0
end

local function bucket_full_in(cap, interval, tokens, last)
  if tokens >= cap then return 0 end
  return max(0, (cap - tokens) * interval - (now - last))
end

-- Each returns: available, allowed, reset_now, retry, write (a function storing the new state), ttl_us.
local algos = {}

algos[1] = function(key, limit, w) -- fixed window
  local idx = floor(now / w)
  local count = 0
  local v = redis.call('GET', key)
  if v then
    local s, c = string.match(v, '^(%-?%d+) (%d+)$')
    if s and tonumber(s) == idx then count = tonumber(c) end
  end
  local available = max(0, limit - count)
  local reset = (idx + 1) * w - now
  local reset_now = 0
  if count > 0 then reset_now = reset end
  local write = function()
    redis.call('SET', key, int(idx) .. ' ' .. int(count + cost), 'PX', ms(reset))
  end
  return available, cost <= available, reset_now, reset, write, reset
end

algos[2] = function(key, limit, w) -- sliding log
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now - w))
  local count = redis.call('ZCARD', key)
  local available = max(0, limit - count)
  local reset_now = 0
  if count > 0 then
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    reset_now = tonumber(newest[2]) + w - now
  end
  local retry = 0
  local need = count + cost - limit
  if need >= 1 then
    local e = redis.call('ZRANGE', key, need - 1, need - 1, 'WITHSCORES')
    if e[2] then retry = tonumber(e[2]) + w - now else retry = w end
  end
  local write = function()
    local stamp = int(now)
    local i = 0
    while i < cost do
      local args = {}
      local j = 0
      while i < cost and j < 200 do
        args[#args + 1] = stamp
        args[#args + 1] = stamp .. ':' .. nonce .. ':' .. i
        i = i + 1
        j = j + 1
      end
      redis.call('ZADD', key, unpack(args))
    end
    redis.call('PEXPIRE', key, ms(w))
  end
  return available, cost <= available, reset_now, retry, write, w
end

algos[3] = function(key, limit, w) -- sliding counter
  local idx = floor(now / w)
  local elapsed = now - idx * w
  local curr, prev = 0, 0
  local v = redis.call('GET', key)
  if v then
    local s, c, p = string.match(v, '^(%-?%d+) (%d+) (%d+)$')
    if s then
      s = tonumber(s)
      if s == idx then curr, prev = tonumber(c), tonumber(p)
      elseif s == idx - 1 then prev = tonumber(c) end
    end
  end
  local est = prev * (w - elapsed) / w + curr
  local available = max(0, floor(limit - est))
  local allowed = est + cost <= limit
  local retry = 0
  if not allowed then
    if curr + cost <= limit and prev > 0 then
      retry = ceil(w - (limit - curr - cost) * w / prev) - elapsed
    else
      local at = 0
      if curr > 0 then at = ceil(w - (limit - cost) * w / curr) end
      retry = (w - elapsed) + max(0, at)
    end
  end
  local ttl = (idx + 2) * w - now
  local write = function()
    redis.call('SET', key, int(idx) .. ' ' .. int(curr + cost) .. ' ' .. int(prev), 'PX', ms(ttl))
  end
  return available, allowed, counter_reset(w, idx, curr, prev), retry, write, ttl
end

algos[4] = function(key, limit, w, cap, interval) -- token bucket
  local tokens, last = cap, now
  local v = redis.call('GET', key)
  if v then
    local a, b = string.match(v, '^(%-?%d+) (%-?%d+)$')
    if a then tokens, last = tonumber(a), tonumber(b) end
  end
  if now > last then
    local add = floor((now - last) / interval)
    tokens = min(cap, tokens + add)
    if tokens == cap then last = now else last = last + add * interval end
  end
  local after = tokens - cost
  local ttl = bucket_full_in(cap, interval, after, last)
  local write = function()
    redis.call('SET', key, int(after) .. ' ' .. int(last), 'PX', ms(ttl))
  end
  return tokens, cost <= tokens, bucket_full_in(cap, interval, tokens, last),
    (cost - tokens) * interval - (now - last), write, ttl
end

algos[5] = function(key, limit, w, cap, interval) -- GCRA
  local tau = cap * interval
  local tat = now
  local v = redis.call('GET', key)
  if v then tat = max(tonumber(v) or now, now) end
  local new_tat = tat + cost * interval
  local ttl = new_tat - now
  local write = function()
    redis.call('SET', key, int(new_tat), 'PX', ms(ttl))
  end
  return max(0, floor((tau - (tat - now)) / interval)), ttl <= tau, tat - now, ttl - tau, write, ttl
end

local n = #KEYS
local all = true
local results = {}
for i = 1, n do
  local base = 3 + (i - 1) * 6
  local code = tonumber(ARGV[base + 1])
  local limit = tonumber(ARGV[base + 2])
  local w = tonumber(ARGV[base + 3])
  local cap = tonumber(ARGV[base + 4])
  local interval = tonumber(ARGV[base + 5])
  local shadow = ARGV[base + 6] == '1'
  local available, allowed, reset_now, retry, write, ttl = algos[code](KEYS[i], limit, w, cap, interval)
  results[i] = { available, allowed, reset_now, retry, write, ttl }
  if not allowed and not shadow then all = false end
end

local reply = { 0 }
if all then reply[1] = 1 end
for i = 1, n do
  local r = results[i]
  local available, allowed, reset_now, retry, write, ttl = r[1], r[2], r[3], r[4], r[5], r[6]
  if allowed and all and consume then
    write()
    reply[#reply + 1] = 1
    reply[#reply + 1] = available - cost
    reply[#reply + 1] = ttl
    reply[#reply + 1] = 0
  else
    local a = 0
    if allowed then a = 1; retry = 0 else retry = max(1, retry) end
    reply[#reply + 1] = a
    reply[#reply + 1] = available
    reply[#reply + 1] = reset_now
    reply[#reply + 1] = retry
  end
end
return reply
