-- Extend the caller's lease, or claim the key again for the caller when it is free (the lease ran out while the
-- store could not be reached, and nobody claimed it since).
-- KEYS[1]: the record key. ARGV[1]: the start of the caller's in-flight record, up to its owner token;
-- ARGV[2]: the lease in milliseconds; ARGV[3]: the caller's whole in-flight record.
-- Returns 1 when extended or claimed, 0 when another owner holds the key or a record is there (nothing changed).
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 1
end
if string.sub(held, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
