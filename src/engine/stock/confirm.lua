-- Confirms an offer (offer.lua) once the database, read again after it, still held its
-- version: from then on deliveries trust the figure (G3).
-- KEYS[1] the product's stock key; ARGV: version, nonce.
-- Returns 1 if the cache now holds a confirmed figure at least as new as the offer's,
-- 0 if the offer is gone (replaced, or lost with the cache): offer again.
local held = redis.call('HMGET', KEYS[1], 'version', 'nonce', 'confirmed')
if held[1] == ARGV[1] and held[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'confirmed', '1')
  return 1
end
if held[1] and held[3] == '1' and tonumber(held[1]) >= tonumber(ARGV[1]) then return 1 end
return 0
