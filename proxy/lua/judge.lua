-- Why a tenant has no epoch: KEYS: the store id, the tenant registry, the lost flags.
-- ARGV: tenant id. Returns {store id ('' when none), 1 if the tenant was registered,
-- 1 if it (or the whole store) is flagged lost}.
local id = redis.call('GET', KEYS[1]) or ''
local member = redis.call('SISMEMBER', KEYS[2], ARGV[1])
local lost = 0
if redis.call('HEXISTS', KEYS[3], '*') == 1 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  lost = 1
end
return {id, member, lost}
