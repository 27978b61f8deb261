-- KEYS: settled marker, then per counter its hash and holds zset, then the tenant's epoch,
--       the tenant's agents of the day, the tenant's and the agent's requests in flight,
--       and the tenant's end users of the day; then the tenant's spend per hour and per
--       day (history hashes).
-- ARGV: rid, marker ttl ms ('0': write no marker), check ('1' = verify periods against
--       TIME), then per counter: actual (in its unit), period start, period end, key
--       expiry (epoch ms), scope ('a' agent, 'u' end user, 't' tenant or model cap); then
--       the agent id ('' = none), an epoch to give the tenant if it has none and this
--       settle records spend, and the end user id ('' = none); then the request's cost in
--       micro-USD for the history, its hour and day bucket (their start), the starts below
--       which buckets are no longer kept (hour, day), and the two history keys' expiry
--       (epoch ms).
-- Removes rid's hold; spent grows by actual, less what rid's expired lease was charged. A
-- counter left with nothing spent and nothing held is deleted (and with all of the
-- agent's, the agent leaves the day's set; likewise the end user), so requests that cost
-- nothing leave no keys.
-- Returns {'skew', sec, usec} | {'dup'} | {'ok', the tenant's epoch or ''}.
local n = (#KEYS - 8) / 2
local PER = 5
local base = 3
if ARGV[3] == '1' then
  local t = redis.call('TIME')
  local now_s = tonumber(t[1])
  for i = 1, n do
    local a = base + (i - 1) * PER
    if now_s < tonumber(ARGV[a + 2]) or now_s >= tonumber(ARGV[a + 3]) then
      return {'skew', t[1], t[2]}
    end
  end
end
if ARGV[2] ~= '0' and not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then
  return {'dup'}
end
local rid = ARGV[1]
local field, charged = 'h:' .. rid, 'x:' .. rid
local spends = false
local counted, left = {a = 0, u = 0}, {a = 0, u = 0}
for i = 1, n do
  local key, holds = KEYS[2 * i], KEYS[2 * i + 1]
  local a = base + (i - 1) * PER
  local actual = tonumber(ARGV[a + 1])
  if actual > 0 then spends = true end
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
  local v = redis.call('HMGET', key, 'spent', 'held')
  local empty = redis.call('HLEN', key) <= 2 and tonumber(v[1] or '0') == 0
    and tonumber(v[2] or '0') == 0
  if empty then
    redis.call('DEL', key, holds)
  else
    redis.call('PEXPIREAT', key, ARGV[a + 4])
    redis.call('PEXPIREAT', holds, ARGV[a + 4])
  end
  local scope = ARGV[a + 5]
  if counted[scope] then
    counted[scope] = counted[scope] + 1
    if not empty then left[scope] = left[scope] + 1 end
  end
end
local rest = base + PER * n
local named = {a = {ARGV[rest + 1], KEYS[2 * n + 3]}, u = {ARGV[rest + 3], KEYS[2 * n + 6]}}
for scope, id_key in pairs(named) do
  if id_key[1] ~= '' and counted[scope] > 0 and left[scope] == 0 then
    redis.call('SREM', id_key[2], id_key[1])
  end
end
redis.call('ZREM', KEYS[2 * n + 4], rid)  -- no longer in flight (an empty set is deleted)
redis.call('ZREM', KEYS[2 * n + 5], rid)
if spends then
  redis.call('SET', KEYS[2 * n + 2], ARGV[rest + 2], 'NX')
end
local cost = tonumber(ARGV[rest + 4])
if cost > 0 then
  add_history(KEYS[2 * n + 7], KEYS[2 * n + 8], rest + 4, cost)
end
return {'ok', redis.call('GET', KEYS[2 * n + 2]) or ''}
