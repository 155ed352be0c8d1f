-- Reserves send slots for one instance of the send limiter (G2).
--
-- KEYS[1] is the schedule, a hash with no TTL (so that its absence means it was lost):
--   next    the first free slot, µs of Redis's clock
--   holder  the instance that reserved last
--   u       how late that instance may send any of its slots, µs
--   claim, claim_at  an instance waiting for its turn, and since when
-- ARGV: interval, want, horizon, lead, holder, u, delta, cold, furthest, quantum, turn
-- (µs except want, holder and quantum).
--
-- Slots are never reserved beyond `furthest` after the lead: that bounds every slot any
-- instance holds, and so `cold`. A waiting instance's claim (`claim`, `claim_at`)
-- lapses after `cold`.
--
-- Returns now, the first slot, the count, 1 if the schedule was missing, and when to
-- ask again if the count is 0 (all on Redis's clock), as strings (Lua numbers would be
-- truncated on the way out).
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
local furthest = tonumber(ARGV[9])
local quantum = tonumber(ARGV[10])
local turn = tonumber(ARGV[11])

local state = redis.call('HMGET', KEYS[1], 'next', 'holder', 'u', 'claim', 'claim_at')
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
  -- its next slot must be that much later to come an interval after its last.
  first = math.max(first, next + delta)
end

local function fit(until_)
  if first > until_ then return 0 end
  return math.floor((until_ - first) / interval) + 1
end
local normal = fit(now + lead + horizon)
local count, again = 0, first - lead - horizon
local claimant = state[4]
local claimed = claimant and claimant ~= holder and tonumber(state[5]) + cold >= now
if previous == holder and claimed then
  -- Another instance waits for its turn: this one lets its block end there.
  again = next
elseif previous ~= holder and previous_u > 0 then
  -- A change of holder costs a gap: the block that pays for it is at least `quantum`
  -- times the gap long, and at least `turn` (or as long as `furthest` allows), so
  -- instances taking turns lose at most 1 / (quantum + 1) of the rate to gaps. Until
  -- that fits, the holder yields to this claim.
  local least = math.min(want, math.ceil(math.max(quantum * previous_u, turn) / interval),
    math.floor(furthest / interval))
  if fit(now + lead + furthest) >= least then
    count = math.min(want, math.max(normal, least))
  elseif want > 0 then
    redis.call('HSET', KEYS[1], 'claim', holder, 'claim_at', string.format('%.0f', now))
    again = first + least * interval - lead - furthest
  end
else
  count = math.min(want, normal)
end
if count > 0 then
  redis.call('HSET', KEYS[1],
    'next', string.format('%.3f', first + count * interval),
    'holder', holder,
    'u', string.format('%.3f', u))
  if claimant == holder then redis.call('HDEL', KEYS[1], 'claim', 'claim_at') end
end
return {string.format('%.3f', now), string.format('%.3f', first), tostring(count),
  tostring(lost), string.format('%.3f', again)}
