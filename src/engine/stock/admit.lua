-- Admits webhook requests of a run (G3, G8, G12) if its claim is the newest and the
-- cached stock is confirmed and reaches the product's threshold, and registers the pass in the product's
-- admissions (a sorted set scored by expiry, in Redis's clock), as one step: a stock
-- write that confirms 0 after this waits for the pass (admissions.lua); one before it
-- makes this refuse.
-- KEYS[1] the product's stock key, KEYS[2] the run's claim key, KEYS[3] the product's
-- admissions; ARGV: the claim's token, the claim key's ttl in seconds, the pass's name,
-- its ttl in milliseconds.
-- Returns 1 admitted, 0 sold out, -1 not cached, -2 superseded, -3 the claim key is gone
-- (see claim_check.lua). Loaded after claim_check.lua.
redis.replicate_commands()
local refused = check_claim(KEYS[2], ARGV[1], ARGV[2])
if refused then return refused end
local held = redis.call('HMGET', KEYS[1], 'stock', 'confirmed', 'min')
if not held[1] or held[2] ~= '1' or not held[3] then return -1 end
if tonumber(held[1]) < tonumber(held[3]) then return 0 end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ms)
redis.call('ZADD', KEYS[3], ms + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[3], ttl)
return 1
