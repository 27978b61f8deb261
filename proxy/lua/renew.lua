-- KEYS: per counter its hash and holds zset. ARGV: rid, hold ttl ms.
-- Charges the expired leases of each counter, then moves rid's lease expiry to now + ttl
-- wherever rid still holds. Returns {'ok'|'gone', sec, usec} ('gone': it held nowhere).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid = ARGV[1]
local field = 'h:' .. rid
local expiry = string.format('%d', now_ms + tonumber(ARGV[2]))
local status = 'gone'
for i = 1, #KEYS / 2 do
  local key, holds = KEYS[2 * i - 1], KEYS[2 * i]
  charge_expired(key, holds, now_ms)
  if redis.call('HEXISTS', key, field) == 1 then
    redis.call('ZADD', holds, 'XX', expiry, rid)
    status = 'ok'
  end
end
return {status, t[1], t[2]}
