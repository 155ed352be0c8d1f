-- Publishes a batch the webhook acknowledged onto the bus channel if its claim is the
-- newest of its run (G8, G12); the stock is not checked: the notifications were sent.
-- KEYS[1] the run's claim key; ARGV: the bus channel, the encoded batch, the claim's
-- token, the claim key's ttl in seconds.
-- Returns 1 published, -2 superseded, -3 the claim key is gone (see deliver.lua).
local held_claim = redis.call('GET', KEYS[1])
if not held_claim then return -3 end
local newest = tonumber(held_claim)
local token = tonumber(ARGV[3])
if token < newest then return -2 end
if token > newest then redis.call('SET', KEYS[1], ARGV[3], 'EX', tonumber(ARGV[4])) end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
