-- Reserves send slots for one instance of the send limiter (G2).
--
-- KEYS[1] is the schedule, a hash with no TTL (so that its absence means it was lost):
--   next        the first free slot, µs of Redis's clock
--   holder      the instance that reserved last
--   u           how late that instance may send any of its slots, µs
--   turn        the first slot of the holder's turn, and turn_len how long the turn
--               lasts before the holder yields to a waiting instance, µs
--   claim, claim_until  an instance waiting for its turn, and until when it counts
--   reach, reach_at     the furthest after its request any instance may send a slot
--               it reserved (lead + horizon + lateness), and when that was declared
-- ARGV: interval, want, horizon, lead, holder, u, delta, cold, quantum, turn, longest,
-- reach (µs except want, holder and quantum).
--
-- A block reaches at most lead + horizon after the script runs, so every slot any
-- instance holds is sent within its declared reach of its request. A lost schedule
-- restarts `cold` after now: the largest reach the caller heard of from this schedule,
-- or its own if it holds slots (a fresh deployment, which heard of none, waits for
-- nothing).
--
-- A probe (want 0) reads the clock and the schedule's reach and changes nothing.
--
-- Returns now, the first slot, the count, 1 if the schedule was missing, when to ask
-- again if the count is 0 (all on Redis's clock), and the schedule's reach, as strings
-- (Lua numbers would be truncated on the way out).
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
local quantum = tonumber(ARGV[9])
local shortest = tonumber(ARGV[10])
local longest = tonumber(ARGV[11])
local reach = tonumber(ARGV[12])
local function us(x) return string.format('%.3f', x) end

local state = redis.call('HMGET', KEYS[1], 'next', 'holder', 'u', 'claim', 'claim_until',
  'turn', 'turn_len', 'reach', 'reach_at')
local known_reach = tonumber(state[8]) or 0
if want == 0 then
  return {us(now), us(now), '0', '0', us(now), us(known_reach)}
end

-- The largest reach declared lately: an instance farther from Redis keeps declaring
-- its own with every block, a smaller one replaces it only once it is old.
if reach >= known_reach or (tonumber(state[9]) or 0) + 2000000 < now then
  redis.call('HSET', KEYS[1], 'reach', us(reach), 'reach_at', us(now))
  known_reach = reach
end

local next, previous, previous_u, lost
if state[1] then
  next, previous, previous_u, lost = tonumber(state[1]), state[2], tonumber(state[3]) or 0, 0
else
  -- Lost (a flush, a restart, a failover) or never written: instances may still hold
  -- slots reserved against the old schedule, up to their reach after now.
  next, previous, previous_u, lost = now + cold, '', 0, 1
  redis.call('HSET', KEYS[1], 'next', us(next), 'holder', '', 'u', '0')
end
local turn = tonumber(state[6]) or next
local turn_len = tonumber(state[7]) or shortest

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

local count, again = 0, first - lead - horizon
local claimant = state[4]
local claimed = claimant and claimant ~= holder and (tonumber(state[5]) or 0) >= now
local turn_over = next - turn >= turn_len
if previous == holder and claimed and turn_over then
  -- Another instance waits and this one had its turn: its blocks end here.
  again = next
else
  -- Another instance in its turn, holding slots ahead: wait for the end of it.
  local in_turn = previous ~= holder and previous ~= '' and not turn_over and next > now + lead
  if in_turn then
    again = math.max(turn + turn_len - lead - horizon, now + 1000)
  elseif first <= now + lead + horizon then
    count = math.min(want, math.floor((now + lead + horizon - first) / interval) + 1)
  end
  if count == 0 and previous ~= holder and previous ~= '' then
    -- Waiting for another instance's slots to run out, within its turn or after it:
    -- the claim makes it end its blocks once its turn is over, else an instance that
    -- reserves further ahead than this one could keep the schedule out of its reach.
    redis.call('HSET', KEYS[1], 'claim', holder,
      'claim_until', us(math.max(again, now) + lead + 10000))
  end
end
if count > 0 then
  if previous ~= holder then
    -- A new turn. A change of holder costs a gap of `previous_u`: the turn is at least
    -- `quantum` times as long, so instances taking turns lose at most 1 / (quantum + 1)
    -- of the rate to gaps.
    turn = first
    turn_len = math.min(math.max(quantum * previous_u, shortest), longest)
  end
  redis.call('HSET', KEYS[1],
    'next', us(first + count * interval),
    'holder', holder,
    'u', us(u),
    'turn', us(turn),
    'turn_len', us(turn_len))
  if claimant == holder then redis.call('HDEL', KEYS[1], 'claim', 'claim_until') end
end
return {us(now), us(first), tostring(count), tostring(lost), us(again), us(known_reach)}
