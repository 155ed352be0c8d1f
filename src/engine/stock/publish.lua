-- Publishes a batch the webhook acknowledged onto the bus channel if its claim is the
-- newest of its run (G8, G12); the stock is not checked: the notifications were sent.
-- Loaded after claim_check.lua.
-- KEYS[1] the run's claim key; ARGV: the bus channel, the encoded batch, the claim's
-- token, the claim key's ttl in seconds, and last the publish command (as deliver.lua).
-- Returns 1 published, -2 superseded, -3 the claim key is gone (see claim_check.lua).
local refused = check_claim(KEYS[1], ARGV[3], ARGV[4])
if refused then return refused end
redis.call(ARGV[#ARGV], ARGV[1], ARGV[2])
return 1
