-- Reserves send slots for one instance of the send limiter (G2).
--
-- KEYS[1] is the schedule, a hash with no TTL (so that its absence means it was lost):
--   next    the first free slot, µs of Redis's clock
--   holder  the instance that reserved last
--   u       how late that instance may send any of its slots, µs
-- ARGV: interval, want, horizon, lead, holder, u, delta, cold (µs except want and holder).
--
-- Returns now, the first slot and the count, and 1 if the schedule was missing, as
-- strings (Lua numbers would be truncated on the way out).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local lead = tonumber(ARGV[4])
local holder = ARGV[5]
local u = tonumber(ARGV[6])
local delta = tonumber(ARGV[7])
local cold = tonumber(ARGV[8])

local state = redis.call('HMGET', KEYS[1], 'next', 'holder', 'u')
local next, previous, previous_u, lost
if state[1] then
  next, previous, previous_u, lost = tonumber(state[1]), state[2], tonumber(state[3]) or cold, 0
else
  -- Lost (a flush, a restart, a failover) or never written: instances may still hold
  -- slots reserved against the old schedule, up to `cold` ahead of now. Start after them.
  next, previous, previous_u, lost = now + cold, '', 0, 1
  redis.call('HSET', KEYS[1], 'next', string.format('%.3f', next), 'holder', '', 'u', '0')
end

-- Not before the reply can be back, nor before the free slot.
local first = math.max(next, now + lead)
if previous ~= holder then
  -- The last holder may send its last slot up to its `u` late.
  first = math.max(first, next + previous_u)
else
  -- This instance now maps Redis's clock `delta` earlier than for its last block:
  -- its next slot must be that much later to be sent as late.
  first = math.max(first, next + delta)
end

local reach = now + lead + horizon
local count = 0
if want > 0 and first <= reach then
  count = math.min(want, math.floor((reach - first) / interval) + 1)
  redis.call('HSET', KEYS[1],
    'next', string.format('%.3f', first + count * interval),
    'holder', holder,
    'u', string.format('%.3f', u))
end
return {string.format('%.3f', now), string.format('%.3f', first), tostring(count), tostring(lost)}
