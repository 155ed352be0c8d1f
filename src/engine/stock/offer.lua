-- Offers a stock figure read from the database to the cache (G3). The entry is a hash:
-- stock, min (the product's threshold), version (the database's stock_version, bumped by
-- a write of either), nonce (this offer's) and confirmed.
-- A newer figure is never replaced by an older one; an offer is written unconfirmed,
-- and deliveries do not trust it until the database has been read again (confirm.lua).
-- KEYS[1] the product's stock key; ARGV: stock, version, nonce, ttl in seconds, min.
-- Returns {1, nonce} to confirm with that nonce, {0, ''} the cache already holds a
-- confirmed figure at least as new (nothing to do), {-1, ''} it holds a newer
-- unconfirmed one (read the database again). An unconfirmed offer of the same version
-- (the same figure: every write bumps it) is kept and its nonce returned: two offers of
-- one figure that replaced each other's nonce could each fail to confirm, again and
-- again. An invalidation deletes the entry, so a nonce still matching at confirm time
-- proves no stock write came in between.
local held = redis.call('HMGET', KEYS[1], 'version', 'confirmed', 'nonce', 'min')
local version = tonumber(ARGV[2])
-- An entry without a threshold (cached before thresholds existed) is replaced: the
-- fence trusts none without one, and the confirmation still proves the figure current.
if held[1] and held[4] then
  local current = tonumber(held[1])
  if current > version or (current == version and held[2] == '1') then
    if held[2] == '1' then return {0, ''} end
    return {-1, ''}
  end
  if current == version and held[3] then return {1, held[3]} end
end
redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'min', ARGV[5], 'version', ARGV[2], 'nonce', ARGV[3],
  'confirmed', '0')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return {1, ARGV[3]}
