-- Delivers a batch onto the bus channel if its claim is the newest of its run and the
-- cached stock is confirmed and above zero, as one step (G3, G8). Loaded after
-- claim_check.lua.
-- KEYS[1] the product's stock key, KEYS[2] the run's claim key; ARGV: the bus channel,
-- the encoded batch, the claim's token, the claim key's ttl in seconds.
-- Returns 1 delivered, 0 sold out, -1 not cached (fill the cache and try again),
-- -2 superseded, -3 the claim key is gone (see claim_check.lua).
local refused = check_claim(KEYS[2], ARGV[3], ARGV[4])
if refused then return refused end
local held = redis.call('HMGET', KEYS[1], 'stock', 'confirmed')
if not held[1] or held[2] ~= '1' then return -1 end
if tonumber(held[1]) <= 0 then return 0 end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
