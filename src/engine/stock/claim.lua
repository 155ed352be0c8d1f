-- Makes a claim of a run the newest its run has seen, before its first delivery, so a
-- delivery of an older claim still on the wire is refused from now on (G8).
-- KEYS[1] the run's claim key; ARGV: the claim's token, the key's ttl in seconds.
-- Returns 1 if the claim is the newest, 0 if a newer one was seen (stop).
local newest = tonumber(redis.call('GET', KEYS[1]) or '0')
local token = tonumber(ARGV[1])
if token < newest then return 0 end
if token > newest then redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2])) end
return 1
