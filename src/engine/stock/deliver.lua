-- Delivers a batch onto the bus channel if its claim is the newest of its run and the
-- cached stock is confirmed and above zero, as one step (G3, G8).
-- KEYS[1] the product's stock key, KEYS[2] the run's claim key; ARGV: the bus channel,
-- the encoded batch, the claim's token, the claim key's ttl in seconds.
-- Returns 1 delivered, 0 sold out, -1 not cached (fill the cache and try again),
-- -2 superseded (a newer claim of the run was seen: the sender must stop), -3 the claim
-- key is gone (lost with the cache, or expired): the sender must prove its claim against
-- the database and register it again (claim.lua) before it delivers anything.
local held_claim = redis.call('GET', KEYS[2])
if not held_claim then return -3 end
local newest = tonumber(held_claim)
local token = tonumber(ARGV[3])
if token < newest then return -2 end
if token > newest then redis.call('SET', KEYS[2], ARGV[3], 'EX', tonumber(ARGV[4])) end
local held = redis.call('HMGET', KEYS[1], 'stock', 'confirmed')
if not held[1] or held[2] ~= '1' then return -1 end
if tonumber(held[1]) <= 0 then return 0 end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
