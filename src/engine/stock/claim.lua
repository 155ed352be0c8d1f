-- Makes a claim of a run the newest its run has seen, before its first delivery, so a
-- delivery of an older claim still on the wire is refused from now on (G8), and starts
-- the claim's chain at the position its deliveries follow (deliver.lua).
-- KEYS[1] the run's claim key, KEYS[2] the run's chain key; ARGV: the claim's token,
-- the keys' ttl in seconds, the position of the last notification delivered under the
-- claim before ('-' for none).
-- Returns 1 if the claim is the newest, 0 if a newer one was seen (stop).
local newest = tonumber(redis.call('GET', KEYS[1]) or '0')
local token = tonumber(ARGV[1])
if token < newest then return 0 end
if token > newest then redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2])) end
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. ARGV[3], 'EX', tonumber(ARGV[2]))
return 1
