-- Claim-or-read, in one round trip.
-- KEYS[1]: the record key.
-- ARGV[1]: the in-flight record (JSON, carrying the caller's owner token, 128 random bits); ARGV[2]: the lease in
-- milliseconds.
-- Returns nil when the caller now owns the key, else the record held (in flight or completed). The caller recognises
-- its own in-flight record (a claim sent again after its reply was lost) by the owner token; its lease starts again.
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return held
end
if held then
  return held
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
