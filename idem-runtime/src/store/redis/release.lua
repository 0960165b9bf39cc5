-- Delete the caller's in-flight record so a retry runs again, and wake the waiters.
-- KEYS[1]: the record key; KEYS[2]: the notification channel.
-- ARGV[1]: the start of the caller's in-flight record, up to its owner token; ARGV[2]: PUBLISH or SPUBLISH.
-- Returns 1 when deleted, 0 when the caller no longer owns the key (nothing changed).
local held = redis.call('GET', KEYS[1])
if not held or string.sub(held, 1, #ARGV[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call(ARGV[2], KEYS[2], 'released')
return 1
