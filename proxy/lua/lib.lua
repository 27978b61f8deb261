-- Prepended to reserve.lua and renew.lua. charge_expired: charge the holds of one counter whose lease ran out
-- (at most PURGE_LIMIT per call): their amounts move from held to spent, and x:<rid>
-- keeps what each was charged until its settle replaces it by the actual cost.

local PURGE_LIMIT = 100 -- expired holds charged per counter per call

local function charge_expired(key, holds, now_ms)
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', now_ms, 'LIMIT', 0, PURGE_LIMIT)
  if #expired == 0 then
    return
  end
  local fields = {}
  for j, r in ipairs(expired) do fields[j] = 'h:' .. r end
  local amounts = redis.call('HMGET', key, unpack(fields))
  local total, charged = 0, {}
  for j = 1, #expired do
    if amounts[j] then
      total = total + tonumber(amounts[j])
      charged[#charged + 1] = 'x:' .. expired[j]
      charged[#charged + 1] = amounts[j]
    end
  end
  redis.call('HDEL', key, unpack(fields))
  redis.call('ZREM', holds, unpack(expired))
  if #charged > 0 then
    redis.call('HSET', key, unpack(charged))
  end
  if total ~= 0 then
    redis.call('HINCRBY', key, 'held', string.format('%d', -total))
    redis.call('HINCRBY', key, 'spent', string.format('%d', total))
  end
end

-- The latest lease expiry among a counter's live holds (epoch ms), '0' when none.
local function holds_end(holds, now_ms)
  local last = redis.call('ZRANGE', holds, -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) > now_ms then
    return last[2]
  end
  return '0'
end
