-- KEYS: the SETs of the agents and of the end users a tenant named on one UTC day.
-- ARGV: how many of each to return; how many of each to choose them from at most.
-- Returns {agents in all, the first agents in byte order, users in all, the first users}.
-- Past the second bound, the first of a random sample of that many (SRANDMEMBER), so that
-- a read stays short however many a tenant named.
local limit, read_max = tonumber(ARGV[1]), tonumber(ARGV[2])

-- Byte order whatever the server's locale (Lua compares strings with strcoll).
local function before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a < #b
end

local out = {}
for _, key in ipairs(KEYS) do
  local total = redis.call('SCARD', key)
  local members
  if total <= read_max then
    members = redis.call('SMEMBERS', key)
  else
    members = redis.call('SRANDMEMBER', key, read_max)
  end
  -- The first `limit` in order, kept sorted as the members go by (a set's members come
  -- in hash order, so few of them are inserted).
  local first = {}
  for _, m in ipairs(members) do
    if #first < limit or before(m, first[#first]) then
      local i = #first
      while i > 0 and before(m, first[i]) do
        first[i + 1] = first[i]
        i = i - 1
      end
      first[i + 1] = m
      if #first > limit then
        first[#first] = nil
      end
    end
  end
  out[#out + 1] = total
  out[#out + 1] = first
end
return out
