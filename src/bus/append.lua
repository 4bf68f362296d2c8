-- One atomic append. Mirrors Snapshot::apply in src/bus/mod.rs; a test holds them together.
-- KEYS: 1 events stream (also the Pub/Sub channel), 2 rooms hash, 3 voice hash,
--       4 applied id, 5 the writer's lease, 6 guild (roles), 7 channels hash (overwrites),
--       8 members hash (roles), 9 the durable id, 10 the writer's last request,
--       11 the guild's epoch
-- ARGV: 1 fence token ('' when unfenced or fenced by epoch), 2 event type, 3 data JSON,
--       4 guild id, 5 stream MAXLEN (approximate), 6 '1' when the caller waits for
--       replicas before the event may be published, 7 request id ('' for none:
--       `<writer>#<seq>.<part>`), 8 the writer's epoch ('' unless fenced by epoch),
--       9 the W3C traceparent of the append ('' when not traced): kept beside the
--       envelope (field `t` of the entry, a `traceparent\n` prefix of the message), never
--       in it, so no browser sees a trace id
-- Fenced out: nil (a value, not an error, so the caller need not read error text).

-- First the fence, so a writer fenced out writes nothing at all, not even a retry's
-- answer. Fenced by epoch (a lease outside this guild's slot: the gateway's shard lease): a
-- writer older than the guild's epoch is refused; a newer one raises it, so its
-- predecessor is refused from now on.
if ARGV[8] ~= '' then
  local mine = tonumber(ARGV[8])
  local epoch = tonumber(redis.call('GET', KEYS[11]) or '0') or 0
  if mine < epoch then
    return false
  elseif mine > epoch then
    redis.call('SET', KEYS[11], ARGV[8])
  end
elseif ARGV[1] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[1] then
  return false
end

-- A retried request (its answer was lost, or its WAIT fell short) is answered with the
-- event it already appended: an event reaches the log once. Written again, so that this
-- connection's replication offset covers the event and the caller's WAIT counts it.
-- A writer names its requests in increasing order, so one of an older dispatch than its
-- last is done too (two gateways that saw the same Discord dispatch name it alike):
-- answered with the last event, appending nothing. Within one dispatch only the exact
-- name (which carries the event's content) counts: a successor numbers the parts its
-- predecessor did not append from 0 again.
local function order(request)
  local seq = string.match(request, '#(%d+)%.%d+')
  if seq then return tonumber(seq) end
  return nil
end
if ARGV[7] ~= '' then
  local done = redis.call('GET', KEYS[10])
  local nl = done and string.find(done, '\n', 1, true)
  if nl then
    local last = string.sub(done, 1, nl - 1)
    local seq = order(ARGV[7])
    local last_seq = order(last)
    if last == ARGV[7] or (seq and last_seq and seq < last_seq) then
      redis.call('SET', KEYS[10], done, 'PX', 3600000)
      return string.sub(done, nl + 1)
    end
  end
end

-- The first withheld event: everything before it was published when appended, so the
-- durable id starts at the newest id so far (not at 0-0, which would publish the whole
-- log again).
if ARGV[6] ~= '' and not redis.call('GET', KEYS[9]) then
  local last = redis.call('GET', KEYS[4])
  if not last then
    local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
    last = newest[1] and newest[1][1] or '0-0'
  end
  redis.call('SET', KEYS[9], last)
end

-- The id: the clock's millisecond if it moved past the last id, else the last id + 1,
-- so ids increase even if the clock steps back.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function parse(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  if ms then return tonumber(ms), tonumber(seq) end
  return 0, -1
end
local function next_id(last)
  local ms, seq = parse(last)
  if now > ms then return now, 0 end
  return ms, seq + 1
end
local ms, seq = next_id(redis.call('GET', KEYS[4]))
local id = string.format('%d-%d', ms, seq)
local envelope = '{"v":1,"id":"' .. id .. '","type":"' .. ARGV[2] .. '","guild_id":"' .. ARGV[4]
  .. '","ts":' .. string.format('%d', ms) .. ',"data":' .. ARGV[3] .. '}'
local function add(entry_id)
  if ARGV[9] ~= '' then
    return redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], entry_id, 'e', envelope, 't', ARGV[9])
  end
  return redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], entry_id, 'e', envelope)
end
local ok = add(id)
if type(ok) == 'table' and ok.err then
  -- `applied` was lost while the stream kept a later id: go past the stream's own.
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then ms, seq = next_id(info[i + 1]) end
  end
  id = string.format('%d-%d', ms, seq)
  envelope = '{"v":1,"id":"' .. id .. '","type":"' .. ARGV[2] .. '","guild_id":"' .. ARGV[4]
    .. '","ts":' .. string.format('%d', ms) .. ',"data":' .. ARGV[3] .. '}'
  ok = add(id)
  if type(ok) == 'table' and ok.err then return redis.error_reply(ok.err) end
end

local ts = ms
local d = cjson.decode(ARGV[3])
local kind = ARGV[2]

local function room(channel)
  local raw = redis.call('HGET', KEYS[2], channel)
  if raw then return cjson.decode(raw) end
  return nil
end
local function save_room(channel, r)
  redis.call('HSET', KEYS[2], channel, cjson.encode(r))
end

if kind == 'room.created' then
  local r = room(d.channel_id) or { created_at = ts, last_active = ts }
  r.name = d.name
  r.user_limit = d.user_limit
  -- An owner already recorded stays; the gateway only fills in what was lost.
  if d.created_by and not r.creator_id then r.creator_id = d.created_by end
  if d.role_id and not r.role_id then r.role_id = d.role_id end
  save_room(d.channel_id, r)
elseif kind == 'room.updated' then
  local r = room(d.channel_id)
  if r then
    r.name = d.name
    r.user_limit = d.user_limit
    save_room(d.channel_id, r)
  end
elseif kind == 'room.deleted' then
  redis.call('HDEL', KEYS[2], d.channel_id)
  local voice = redis.call('HGETALL', KEYS[3])
  for i = 1, #voice, 2 do
    if cjson.decode(voice[i + 1]).channel_id == d.channel_id then
      redis.call('HDEL', KEYS[3], voice[i])
    end
  end
elseif kind == 'room.closing' then
  local r = room(d.channel_id)
  if r then
    r.closes_at = d.closes_at
    save_room(d.channel_id, r)
  end
elseif kind == 'voice.joined' then
  redis.call('HSET', KEYS[3], d.user.id, cjson.encode({
    channel_id = d.channel_id, user = d.user,
    self_mute = d.self_mute, self_deaf = d.self_deaf,
    self_video = d.self_video, self_stream = d.self_stream,
  }))
  local r = room(d.channel_id)
  if r then
    r.last_active = ts
    r.closes_at = nil
    save_room(d.channel_id, r)
  end
elseif kind == 'voice.updated' then
  local raw = redis.call('HGET', KEYS[3], d.user_id)
  if raw then
    local v = cjson.decode(raw)
    v.channel_id = d.channel_id
    v.self_mute = d.self_mute
    v.self_deaf = d.self_deaf
    v.self_video = d.self_video
    v.self_stream = d.self_stream
    redis.call('HSET', KEYS[3], d.user_id, cjson.encode(v))
  end
elseif kind == 'room.viewers' then
  local r = room(d.channel_id)
  if r then
    -- cjson would write an empty list as {}: an empty list is no field at all.
    if #d.viewers > 0 then
      r.viewers = d.viewers
      r.closes_at = nil
    else
      r.viewers = nil
    end
    r.last_active = ts
    save_room(d.channel_id, r)
  end
elseif kind == 'invite.renewed' then
  local r = room(d.channel_id)
  if r then
    r.invite_gen = d.generation
    save_room(d.channel_id, r)
  end
elseif kind == 'guild.updated' then
  -- Kept as sent: cjson would turn an empty list into {}.
  redis.call('SET', KEYS[6], ARGV[3])
elseif kind == 'channel.access' then
  if d.overwrites == cjson.null then
    redis.call('HDEL', KEYS[7], d.channel_id)
  else
    redis.call('HSET', KEYS[7], d.channel_id, ARGV[3])
  end
elseif kind == 'member.updated' then
  redis.call('HSET', KEYS[8], d.user_id, ARGV[3])
elseif kind == 'member.removed' then
  redis.call('HDEL', KEYS[8], d.user_id)
elseif kind == 'voice.left' then
  redis.call('HDEL', KEYS[3], d.user_id)
  local r = room(d.channel_id)
  if r then
    r.last_active = ts
    save_room(d.channel_id, r)
  end
end

redis.call('SET', KEYS[4], id)
if ARGV[7] ~= '' then
  -- An hour outlives any retry (REDIS_RETRY_FOR is at most that).
  redis.call('SET', KEYS[10], ARGV[7] .. '\n' .. envelope, 'PX', 3600000)
end
if ARGV[6] == '' then
  -- Nothing to wait for: durable (as far as this writer asks) and published at once.
  redis.call('SET', KEYS[9], id)
  if ARGV[9] ~= '' then
    redis.call('SPUBLISH', KEYS[1], ARGV[9] .. '\n' .. envelope)
  else
    redis.call('SPUBLISH', KEYS[1], envelope)
  end
end
return envelope
