-- Prepended to commit.lua. add_history: add a settled cost to the tenant's hour and day
-- buckets (HASH field = bucket start); a bucket's first spend trims the buckets no longer
-- kept, so each hash stays as small as its history (48 hours, 90 days).
-- ARGV after `at`: hour start, day start, hour cutoff, day cutoff, hour expiry, day expiry.
local function add_history(hour_key, day_key, at, actual)
  local keys = {hour_key, day_key}
  for j = 1, 2 do
    local key, bucket = keys[j], ARGV[at + j]
    local cut = tonumber(ARGV[at + 2 + j])
    if redis.call('HINCRBY', key, bucket, string.format('%d', actual)) == actual then
      for _, f in ipairs(redis.call('HKEYS', key)) do
        if tonumber(f) < cut then
          redis.call('HDEL', key, f)
        end
      end
    end
    redis.call('PEXPIREAT', key, ARGV[at + 4 + j])
  end
end

