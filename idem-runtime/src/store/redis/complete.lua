-- Replace the caller's in-flight record with the completed one, and wake the waiters.
-- KEYS[1]: the record key; KEYS[2]: the notification channel (same hash tag, so same Cluster slot).
-- ARGV[1]: the start of the caller's in-flight record, up to and including its owner token (the owner check);
-- ARGV[2]: the completed record (JSON); ARGV[3]: its ttl in milliseconds; ARGV[4]: PUBLISH or SPUBLISH.
-- Returns 1 when written, 0 when another owner holds the key or a record is there (nothing changed). A free key
-- (the caller's lease ran out and nobody claimed it since) is written: nobody else ran the request.
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call(ARGV[4], KEYS[2], 'completed')
return 1
