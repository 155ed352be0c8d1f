-- Counts the passes of a product that are held and unexpired (admit.lua), dropping the
-- expired ones: a stock write below the threshold waits until this is 0 (G3).
-- KEYS[1] the product's admissions.
redis.replicate_commands()
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
return redis.call('ZCARD', KEYS[1])
