-- KEYS: per counter its hash and holds zset, then the tenant's and the agent's requests
-- in flight (ZSETs). ARGV: rid, hold ttl ms.
-- Charges the expired leases of each counter, then moves rid's lease expiry to now + ttl
-- wherever rid still holds (and in flight, where it counts). Returns {'ok'|'gone', sec,
-- usec} ('gone': it held nowhere).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid = ARGV[1]
local field = 'h:' .. rid
local expiry = string.format('%d', now_ms + tonumber(ARGV[2]))
local status = 'gone'
local n = (#KEYS - 2) / 2
for i = 1, n do
  local key, holds = KEYS[2 * i - 1], KEYS[2 * i]
  charge_expired(key, holds, now_ms)
  if redis.call('HEXISTS', key, field) == 1 then
    redis.call('ZADD', holds, 'XX', expiry, rid)
    status = 'ok'
  end
end
if status == 'ok' then
  for j = 1, 2 do
    local flight = KEYS[2 * n + j]
    if redis.call('ZADD', flight, 'XX', 'CH', expiry, rid) == 1 then
      redis.call('PEXPIREAT', flight, expiry)
    end
  end
end
return {status, t[1], t[2]}
