-- Delivers a batch onto the bus channel if its claim is the newest of its run, the
-- cached stock is confirmed and reaches the product's threshold, and the batch follows the last one of its
-- claim delivered, as one step (G1, G3, G8). Loaded after claim_check.lua.
-- KEYS[1] the product's stock key, KEYS[2] the run's claim key, KEYS[3] the run's
-- chain key ("<claim>:<position of the last notification delivered>", set by
-- claim.lua); ARGV: the bus channel, the encoded batch, the claim's token, the keys'
-- ttl in seconds, the position the batch follows ('-' for none), the position of its
-- last notification, and last the publish command (PUBLISH, or SPUBLISH on Redis
-- Cluster, where the channel is in the slot of the keys).
-- Returns 1 delivered, 0 sold out, -1 not cached (fill the cache and try again),
-- -2 superseded, -3 the claim or chain key is gone (see claim_check.lua), -4 out of
-- order: the batch does not follow the last delivered one (a delivery before it was
-- refused, or has not arrived), so a run that sends several without waiting for each
-- answer never puts a later one on the bus before an earlier one.
local refused = check_claim(KEYS[2], ARGV[3], ARGV[4])
if refused then return refused end
local held = redis.call('HMGET', KEYS[1], 'stock', 'confirmed', 'min')
if not held[1] or held[2] ~= '1' or not held[3] then return -1 end
if tonumber(held[1]) < tonumber(held[3]) then return 0 end
local chain = redis.call('GET', KEYS[3])
if not chain then return -3 end
-- Sent again (a client retrying after a lost connection): it is on the bus already.
if chain == ARGV[3] .. ':' .. ARGV[6] and ARGV[5] ~= ARGV[6] then return 1 end
if chain ~= ARGV[3] .. ':' .. ARGV[5] then return -4 end
redis.call('SET', KEYS[3], ARGV[3] .. ':' .. ARGV[6], 'EX', tonumber(ARGV[4]))
redis.call(ARGV[#ARGV], ARGV[1], ARGV[2])
return 1
