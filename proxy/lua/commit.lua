-- KEYS: settled marker, then per counter its hash and holds zset.
-- ARGV: rid, actual, marker ttl ms, check ('1' = verify periods against TIME), then per
--       counter: period start, period end, key expiry (epoch ms).
-- Removes rid's hold; spent grows by actual, less what rid's expired lease was charged.
-- Returns {'skew', sec, usec} | {'dup'} | {'ok'}.
local n = (#KEYS - 1) / 2
if ARGV[4] == '1' then
  local t = redis.call('TIME')
  local now_s = tonumber(t[1])
  for i = 1, n do
    local a = 4 + (i - 1) * 3
    if now_s < tonumber(ARGV[a + 1]) or now_s >= tonumber(ARGV[a + 2]) then
      return {'skew', t[1], t[2]}
    end
  end
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then
  return {'dup'}
end
local rid = ARGV[1]
local field, charged = 'h:' .. rid, 'x:' .. rid
local actual = tonumber(ARGV[2])
for i = 1, n do
  local key, holds = KEYS[2 * i], KEYS[2 * i + 1]
  local h = redis.call('HGET', key, field)
  if h then
    redis.call('HDEL', key, field)
    redis.call('ZREM', holds, rid)
    if tonumber(h) ~= 0 then
      redis.call('HINCRBY', key, 'held', string.format('%d', -tonumber(h)))
    end
  end
  local add = actual
  local x = redis.call('HGET', key, charged)
  if x then
    redis.call('HDEL', key, charged)
    add = actual - tonumber(x)
  end
  if add ~= 0 then
    redis.call('HINCRBY', key, 'spent', string.format('%d', add))
  end
  local at = ARGV[4 + (i - 1) * 3 + 3]
  redis.call('PEXPIREAT', key, at)
  redis.call('PEXPIREAT', holds, at)
end
return {'ok'}
