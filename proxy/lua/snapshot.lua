-- KEYS: per counter its hash and holds zset. ARGV: per counter period start, period end.
-- Returns {'skew', sec, usec} | {'ok', sec, usec, spent1, held1, end1, ...}: held counts
-- the live holds, spent also the holds whose lease ran out (as their charge will), end is
-- the latest live lease expiry (epoch ms, '0' when none). Writes nothing.
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 2
for i = 1, n do
  if now_s < tonumber(ARGV[2 * i - 1]) or now_s >= tonumber(ARGV[2 * i]) then
    return {'skew', t[1], t[2]}
  end
end
local function sum(key, rids)
  local total = 0
  for first = 1, #rids, 500 do
    local fields = {}
    for j = first, math.min(first + 499, #rids) do fields[#fields + 1] = 'h:' .. rids[j] end
    local amounts = redis.call('HMGET', key, unpack(fields))
    for j = 1, #amounts do
      if amounts[j] then total = total + tonumber(amounts[j]) end
    end
  end
  return total
end
local out = {'ok', t[1], t[2]}
for i = 1, n do
  local key, holds = KEYS[2 * i - 1], KEYS[2 * i]
  local expired = sum(key, redis.call('ZRANGEBYSCORE', holds, '-inf', now_ms))
  local held = sum(key, redis.call('ZRANGEBYSCORE', holds, '(' .. now_ms, '+inf'))
  local spent = tonumber(redis.call('HGET', key, 'spent') or '0') + expired
  local last = redis.call('ZRANGE', holds, -1, -1, 'WITHSCORES')
  out[#out + 1] = string.format('%d', spent)
  out[#out + 1] = string.format('%d', held)
  out[#out + 1] = (last[2] and tonumber(last[2]) > now_ms) and last[2] or '0'
end
return out
