-- KEYS: settled marker, then per counter its hash and holds zset, then the tenant's epoch,
--       the tenant's agents of the day, and the tenant's and the agent's requests in flight;
--       then the tenant's spend per hour and per day (history hashes).
-- ARGV: rid, actual, marker ttl ms ('0': write no marker), check ('1' = verify periods
--       against TIME), then per counter: period start, period end, key expiry (epoch ms),
--       scope ('a' agent, 't' tenant); then the agent id ('' = none) and an epoch to give
--       the tenant if it has none and this settle records spend; then the history's hour
--       and day bucket (their start), the starts below which buckets are no longer kept
--       (hour, day), and the two history keys' expiry (epoch ms).
-- Removes rid's hold; spent grows by actual, less what rid's expired lease was charged. A
-- counter left with nothing spent and nothing held is deleted (and with all of the
-- agent's, the agent leaves the day's set), so requests that cost nothing leave no keys.
-- Returns {'skew', sec, usec} | {'dup'} | {'ok', the tenant's epoch or ''}.
local n = (#KEYS - 7) / 2
local base = 4
if ARGV[4] == '1' then
  local t = redis.call('TIME')
  local now_s = tonumber(t[1])
  for i = 1, n do
    local a = base + (i - 1) * 4
    if now_s < tonumber(ARGV[a + 1]) or now_s >= tonumber(ARGV[a + 2]) then
      return {'skew', t[1], t[2]}
    end
  end
end
if ARGV[3] ~= '0' and not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then
  return {'dup'}
end
local rid = ARGV[1]
local field, charged = 'h:' .. rid, 'x:' .. rid
local actual = tonumber(ARGV[2])
local agent_left, agent_counters = 0, 0
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
  local a = base + (i - 1) * 4
  local v = redis.call('HMGET', key, 'spent', 'held')
  local empty = redis.call('HLEN', key) <= 2 and tonumber(v[1] or '0') == 0
    and tonumber(v[2] or '0') == 0
  if empty then
    redis.call('DEL', key, holds)
  else
    redis.call('PEXPIREAT', key, ARGV[a + 3])
    redis.call('PEXPIREAT', holds, ARGV[a + 3])
  end
  if ARGV[a + 4] == 'a' then
    agent_counters = agent_counters + 1
    if not empty then agent_left = agent_left + 1 end
  end
end
local agent = ARGV[base + 4 * n + 1]
if agent ~= '' and agent_counters > 0 and agent_left == 0 then
  redis.call('SREM', KEYS[2 * n + 3], agent)
end
redis.call('ZREM', KEYS[2 * n + 4], rid)  -- no longer in flight (an empty set is deleted)
redis.call('ZREM', KEYS[2 * n + 5], rid)
if actual > 0 then
  redis.call('SET', KEYS[2 * n + 2], ARGV[base + 4 * n + 2], 'NX')
end
if actual > 0 then
  add_history(KEYS[2 * n + 6], KEYS[2 * n + 7], base + 4 * n + 2, actual)
end
return {'ok', redis.call('GET', KEYS[2 * n + 2]) or ''}
