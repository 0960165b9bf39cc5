-- Remove a completed record, or an entry that is not a record at all, and wake the waiters; an in-flight claim is
-- never removed (a retry would run beside the original).
-- KEYS[1]: the record key; KEYS[2]: the notification channel.
-- ARGV[1]: what every in-flight record starts with; ARGV[2]: PUBLISH or SPUBLISH.
-- Returns 0 when nothing was there, 1 when removed, 2 when in flight (nothing changed).
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then
  return 0
end
if kind == 'string' then
  local held = redis.call('GET', KEYS[1])
  if string.sub(held, 1, #ARGV[1]) == ARGV[1] then
    return 2
  end
end
redis.call('DEL', KEYS[1])
redis.call(ARGV[2], KEYS[2], 'released')
return 1
