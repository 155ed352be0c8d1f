-- The claim check of every script that acts for a run (admit.lua, deliver.lua,
-- publish.lua), put in front of each when it is loaded (redis.rs): Redis scripts cannot
-- include one another. It only defines a function, so a script that must call
-- redis.replicate_commands() first still can.
-- Refuses a claim older than the newest its run has shown (G8), and raises the newest
-- to this one if it is newer.
-- Returns nil if the claim holds, -2 superseded (a newer claim of the run was seen: the
-- sender must stop), -3 the claim key is gone (lost with the cache, or expired): the
-- sender must prove its claim against the database and register it again (claim.lua)
-- before it sends anything.
local function check_claim(claim_key, token_arg, ttl_arg)
  local held_claim = redis.call('GET', claim_key)
  if not held_claim then return -3 end
  local newest = tonumber(held_claim)
  local token = tonumber(token_arg)
  if token < newest then return -2 end
  if token > newest then redis.call('SET', claim_key, token_arg, 'EX', tonumber(ttl_arg)) end
  return nil
end
