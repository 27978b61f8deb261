-- KEYS: per counter its hash and holds zset (K1, Z1, K2, Z2, ...), then
--       * the rid's settled marker: a reserve that arrives after its rid was settled or
--         released (its reply was lost to a timeout and the ledger released it) holds
--         nothing; nor does one whose rid's lease already ran out (x:<rid> in the first
--         counter);
--       * the tenant's epoch (read only: returned so the caller can tell a tenant whose
--         spend the store lost from a new one);
--       * the tenant's agents of the day (a SET), when the request names an agent;
--       * the tenant's and the agent's requests in flight (ZSETs rid -> lease expiry);
--       * the tenant's end users of the day (a SET), when user counters apply.
-- ARGV: rid, hold ttl ms, then per counter: limit, amount (in the counter's unit), period
--       start, period end, key expiry (epoch ms); then agent id ('' = none), most agents
--       a day, agents key expiry (epoch ms), most requests in flight for the tenant and
--       for the agent ('' = no limit), end user id ('' = none), most users a day.
-- Returns {'skew', sec, usec} |
--         {'ok'|'rejected'|'settled'|'too_many_agents'|'too_many_users'|'busy_tenant'|
--          'busy_agent', sec, usec, epoch, spent1, held1, end1, spent2, ...}
--         (epoch '' when the tenant has none; end = latest lease expiry in epoch ms, '0'
--         when nothing is held).
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = (#KEYS - 6) / 2
local PER = 5
for i = 1, n do
  local a = 2 + (i - 1) * PER
  if now_s < tonumber(ARGV[a + 3]) or now_s >= tonumber(ARGV[a + 4]) then
    return {'skew', t[1], t[2]}
  end
end
local rid = ARGV[1]
local field = 'h:' .. rid
local marker, epoch_key, agents_key = KEYS[2 * n + 1], KEYS[2 * n + 2], KEYS[2 * n + 3]
local users_key = KEYS[2 * n + 6]
local rest = 2 + PER * n
local agent, user = ARGV[rest + 1], ARGV[rest + 6]
local spent, held = {}, {}
for i = 1, n do
  local key, holds = KEYS[2 * i - 1], KEYS[2 * i]
  charge_expired(key, holds, now_ms)
  local v = redis.call('HMGET', key, 'spent', 'held')
  spent[i] = tonumber(v[1] or '0')
  held[i] = tonumber(v[2] or '0')
end
-- Whether naming `id` goes past `limit` distinct ids in today's set `ids`.
local function crowded(ids, id, limit)
  return id ~= '' and redis.call('SISMEMBER', ids, id) == 0
    and redis.call('SCARD', ids) >= tonumber(limit)
end
local status = 'ok'
local replay = redis.call('HEXISTS', KEYS[1], field) == 1
if redis.call('EXISTS', marker) == 1 or redis.call('HEXISTS', KEYS[1], 'x:' .. rid) == 1 then
  status = 'settled'
elseif not replay then
  for i = 1, n do
    local a = 2 + (i - 1) * PER
    if spent[i] + held[i] + tonumber(ARGV[a + 2]) > tonumber(ARGV[a + 1]) then
      status = 'rejected'
      break
    end
  end
  if status == 'ok' and crowded(agents_key, agent, ARGV[rest + 2]) then
    status = 'too_many_agents'
  end
  if status == 'ok' and crowded(users_key, user, ARGV[rest + 7]) then
    status = 'too_many_users'
  end
  for j, scope in ipairs({'busy_tenant', 'busy_agent'}) do
    local limit, flight = ARGV[rest + 3 + j], KEYS[2 * n + 3 + j]
    if status == 'ok' and limit ~= '' then
      redis.call('ZREMRANGEBYSCORE', flight, '-inf', now_ms)  -- leases run out: not in flight
      if redis.call('ZCARD', flight) >= tonumber(limit) then
        status = scope
      end
    end
  end
end
if status == 'ok' then
  local expiry = string.format('%d', now_ms + tonumber(ARGV[2]))
  for i = 1, n do
    local key, holds = KEYS[2 * i - 1], KEYS[2 * i]
    local a = 2 + (i - 1) * PER
    local amount = ARGV[a + 2]
    if redis.call('HSETNX', key, field, amount) == 1 then
      redis.call('HINCRBY', key, 'held', amount)
      redis.call('ZADD', holds, expiry, rid)
      held[i] = held[i] + tonumber(amount)
    end
    redis.call('PEXPIREAT', key, ARGV[a + 5])
    redis.call('PEXPIREAT', holds, ARGV[a + 5])
  end
  for _, named in ipairs({{agents_key, agent}, {users_key, user}}) do
    if named[2] ~= '' and redis.call('SADD', named[1], named[2]) == 1 then
      redis.call('PEXPIREAT', named[1], ARGV[rest + 3])
    end
  end
  for j = 1, 2 do
    if ARGV[rest + 3 + j] ~= '' then
      local flight = KEYS[2 * n + 3 + j]
      redis.call('ZADD', flight, expiry, rid)
      redis.call('PEXPIREAT', flight, expiry)
    end
  end
end
local out = {status, t[1], t[2], redis.call('GET', epoch_key) or ''}
for i = 1, n do
  out[#out + 1] = string.format('%d', spent[i])
  out[#out + 1] = string.format('%d', held[i])
  out[#out + 1] = holds_end(KEYS[2 * i], now_ms)
end
return out
