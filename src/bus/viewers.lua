-- Viewer presence, run in front of append.lua as one script: when the set of people
-- viewing a room changes, the `room.viewers` event is appended in the same atomic step,
-- so two replicas changing the set at once cannot publish their lists out of order.
-- KEYS: 1-11 as append.lua, 12 the room's viewer set (member = viewer JSON, score = the
--       unix ms it expires at)
-- ARGV: 1-9 as append.lua (2 and 3 are filled in here), 10 channel id, 11 ttl ms,
--       12 how many viewers are present, then the present ones, then the gone ones
do
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local key = KEYS[12]
  local ttl = tonumber(ARGV[11])
  local present = tonumber(ARGV[12])
  -- Everyone listed so far, expired or not: an expiry is a change to announce.
  local before = redis.call('ZRANGE', key, 0, -1)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  for i = 13, 12 + present do
    redis.call('ZADD', key, now + ttl, ARGV[i])
  end
  for i = 13 + present, #ARGV do
    redis.call('ZREM', key, ARGV[i])
  end
  local after = redis.call('ZRANGEBYSCORE', key, '(' .. now, '+inf')
  -- The key outlives its members by far: a replica that comes by after a dead one's
  -- viewers expired must still find them, to announce that they left.
  if #after > 0 then
    redis.call('PEXPIRE', key, ttl + 86400000)
  else
    redis.call('DEL', key)
  end
  table.sort(before)
  table.sort(after)
  local same = #before == #after
  for i = 1, #before do
    if same and before[i] ~= after[i] then same = false end
  end
  if same then
    return false
  end
  ARGV[2] = 'room.viewers'
  ARGV[3] = '{"channel_id":"' .. ARGV[10] .. '","viewers":[' .. table.concat(after, ',') .. ']}'
end
