//! The Lua scripts of lifecycle tracking: a connect's registration, a
//! disconnect's removal, the heartbeat and the reaper of a dead process's
//! connections; and, on a cluster, the steps of a removal or a reap that
//! live in one slot each (the step-by-step code is in `cluster.rs` and
//! `reap.rs`). Each runs atomically in Redis. A script that fails half-way
//! keeps what it already wrote (Redis has no rollback), so the
//! registration is always deleted last, after every write that can fail:
//! a failure leaves it where a retry, or a reaper, finds it again.

// KEYS: events stream, the process's connections, the session's presence,
// the process set. ARGV: connection id, registration, presence entry or
// '', event or '', events MAXLEN, session events channel or '', process,
// now (ms).
pub(super) const CONNECT: &str = r"
redis.call('ZADD', KEYS[4], 'NX', ARGV[8], ARGV[7])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
  if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[4]) end
end
return 1
";

// KEYS: events stream, the process's connections, the session's presence.
// ARGV: connection id, event or '', events MAXLEN, channel or ''.
// A connection already reaped (its process was declared dead) has had its
// disconnect event: nothing to do. The registration goes last: a presence
// hash or a stream of the wrong type fails the script with the
// registration still there (the presence entry's removal, done or not, is
// the same again).
pub(super) const DISCONNECT: &str = r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
if ARGV[2] ~= '' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2])
  -- The channel's copy is best effort (the stream has the event): a
  -- refused PUBLISH (an ACL) must not fail the script between the XADD
  -- and the registration's removal, or each retry would add the event again.
  if ARGV[4] ~= '' then redis.pcall('PUBLISH', ARGV[4], ARGV[2]) end
end
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
";

// KEYS: the process set, the process's heartbeat key. ARGV: process, now
// (ms), heartbeat TTL (ms). Returns 1 if the heartbeat was still alive.
pub(super) const HEARTBEAT: &str = r"
local alive = redis.call('EXISTS', KEYS[2])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return alive
";

// KEYS: the process set, the dead process's heartbeat key, its
// connections, the events stream. ARGV: dead process, now (ms), events
// MAXLEN, batch, reaping process. Returns {-1, 0, ''} if the process is
// alive after all, else {reaped, left, first error}: the connections
// reaped (0 and nothing left: done, and the process is forgotten), and
// those whose presence entry or event failed (a key of the wrong type),
// left in the hash for the next beat.
pub(super) const REAP: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, 0, ''} end
local now = tonumber(ARGV[2])
-- Up to a batch of distinct entries, wherever they are in the hash (a
-- scan from cursor 0 would walk ever more emptied buckets).
local entries = redis.call('HRANDFIELD', KEYS[3], ARGV[4], 'WITHVALUES')
local n, left, first = 0, 0, ''
local function failed(reply)
  if type(reply) == 'table' and reply.err then
    left = left + 1
    if first == '' then first = reply.err end
    return true
  end
  return false
end
for i = 1, #entries, 2 do
  local id = entries[i]
  local ok, c = pcall(cjson.decode, entries[i + 1])
  local done = true
  if ok and type(c) == 'table' then
    if type(c.presence) == 'string' and failed(redis.pcall('HDEL', c.presence, id)) then
      done = false
    end
    if done and c.events == true then
      local since = tonumber(c.since) or now
      local ev = cjson.encode({
        type = 'disconnect', session_id = c.session_id, agent_id = c.agent_id,
        connection_id = id, process = ARGV[1], time = now, code = 1006,
        reason = 'process_lost', duration_ms = math.max(0, now - since),
        messages_in = cjson.null, messages_out = cjson.null, reaped_by = ARGV[5]})
      if failed(redis.pcall('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'event', ev)) then
        done = false
      elseif type(c.channel) == 'string' then
        redis.pcall('PUBLISH', c.channel, ev) -- best effort, as in DISCONNECT
      end
    end
  end
  if done then
    redis.call('HDEL', KEYS[3], id)
    n = n + 1
  end
end
if redis.call('HLEN', KEYS[3]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return {n, left, first}
";

// On a cluster, the part of a reap in the process's slot. KEYS: its
// heartbeat key, its connections, its closing hash, its claims. ARGV:
// batch, now (ms), the claims older than this (ms) are free, '1' for this
// process's own leftovers (no heartbeat check, nothing new taken). Takes
// again the closing entries whose claim is free (their taker failed or
// died, or left them for the next try), at most half a batch of them
// unless own (so that entries that keep failing never fill every batch),
// then moves up to the rest of a batch from the connections to the
// closing hash; each taken entry's claim is now.
// Returns -1 if the process is alive after all, 0 when it has nothing
// left at all (to forget it), else the entries taken: id, record, ...
// (none: others' fresh claims remain).
pub(super) const REAP_OWN: &str = r"
local own = ARGV[4] == '1'
if not own and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local batch = tonumber(ARGV[1])
local out = {}
local retaken = batch
if not own then retaken = math.max(1, math.floor(batch / 2)) end
local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[3], 'LIMIT', 0, retaken)
for _, id in ipairs(stale) do
  local record = redis.call('HGET', KEYS[3], id)
  if record then
    redis.call('ZADD', KEYS[4], ARGV[2], id)
    out[#out + 1] = id
    out[#out + 1] = record
  else
    redis.call('ZREM', KEYS[4], id)
  end
end
local room = batch - #out / 2
if not own and room > 0 then
  local entries = redis.call('HRANDFIELD', KEYS[2], room, 'WITHVALUES')
  for i = 1, #entries, 2 do
    redis.call('HDEL', KEYS[2], entries[i])
    redis.call('HSET', KEYS[3], entries[i], entries[i + 1])
    redis.call('ZADD', KEYS[4], ARGV[2], entries[i])
    out[#out + 1] = entries[i]
    out[#out + 1] = entries[i + 1]
  end
end
if #out == 0 and redis.call('HLEN', KEYS[2]) == 0 and redis.call('ZCARD', KEYS[4]) == 0 then
  return 0
end
return out
";

// On a cluster, a process's own removal takes its connection. KEYS: its
// connections, its closing hash, its claims. ARGV: connection id, the
// closing record (the registration and the disconnect event), now (ms).
// Returns 1 when the connection is in the closing hash (moved now, or
// already there: an earlier try whose answer was lost, or a reaper's), 0
// when it is gone (reaped and done, or never registered).
pub(super) const CLAIM: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  return 1
end
return redis.call('HEXISTS', KEYS[2], ARGV[1])
";

// On a cluster, the end of a removal or of a reap's batch. KEYS: the
// closing hash, the claims. ARGV: how many are done, their ids, then the
// ids left for the next try. The done ones are deleted; the others' claims
// go to 0, so that the next reap (or sweep) takes them at once.
pub(super) const FINISH: &str = r"
local done = tonumber(ARGV[1])
for i = 2, done + 1 do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
end
for i = done + 2, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[2], 'XX', 0, ARGV[i])
  end
end
return 1
";

// On a cluster, a disconnect event, written once per connection however
// often it is tried. KEYS: the events stream, the connection's marker.
// ARGV: event, events MAXLEN, the marker's TTL (ms). Returns 1 when it
// appended the event, 0 when the marker says it is there already.
pub(super) const EVENT_ONCE: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return 1
";
