-- KEYS: the tenant's spend per hour, per day (history hashes).
-- Returns {hour fields and values, day fields and values} (HGETALL each).
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
