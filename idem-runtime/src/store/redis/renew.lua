-- Extend the caller's lease.
-- KEYS[1]: the record key. ARGV[1]: the start of the caller's in-flight record, up to its owner token;
-- ARGV[2]: the lease in milliseconds.
-- Returns 1 when extended, 0 when the caller no longer owns the key (nothing changed).
local held = redis.call('GET', KEYS[1])
if not held or string.sub(held, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
