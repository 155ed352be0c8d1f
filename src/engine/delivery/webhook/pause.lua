-- Pauses every request to the webhook endpoint, from every instance, for ARGV[1]
-- milliseconds (a Retry-After the endpoint answered, G12). A pause already longer is
-- kept: the endpoint asked for the later of the two.
-- KEYS[1] the pause key; ARGV: the pause in milliseconds.
-- Returns the milliseconds the endpoint is paused for from now.
local left = redis.call('PTTL', KEYS[1])
local want = tonumber(ARGV[1])
if left < want then
  redis.call('SET', KEYS[1], '1', 'PX', want)
  return want
end
return left
