-- Add one journal entry's spend back, once: KEYS: the entry's restored marker, then its
-- counter hashes. ARGV: cost, marker expiry (epoch ms), then per counter its key expiry
-- (epoch ms). Returns 1 when added, 0 when this entry was restored before.
if not redis.call('SET', KEYS[1], '1', 'NX', 'PXAT', ARGV[2]) then
  return 0
end
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[1])
  redis.call('PEXPIREAT', KEYS[i], ARGV[i + 1])
end
return 1
