//! The Lua scripts of lifecycle tracking: a connect's registration, a
//! disconnect's removal, the heartbeat and the reaper of a dead process's
//! connections. Each runs atomically in Redis (one key slot on a cluster:
//! the cluster's step-by-step registration is in `cluster.rs`).

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
// disconnect event: nothing to do.
pub(super) const DISCONNECT: &str = r"
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
if ARGV[2] ~= '' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[2])
  if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[2]) end
end
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
// MAXLEN, batch, reaping process. Returns -1 if the process is alive after
// all, else the number of connections reaped (0: done, and the process is
// forgotten).
pub(super) const REAP: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local now = tonumber(ARGV[2])
-- Up to a batch of distinct entries, wherever they are in the hash (a
-- scan from cursor 0 would walk ever more emptied buckets).
local entries = redis.call('HRANDFIELD', KEYS[3], ARGV[4], 'WITHVALUES')
local n = 0
for i = 1, #entries, 2 do
  local id = entries[i]
  local ok, c = pcall(cjson.decode, entries[i + 1])
  if redis.call('HDEL', KEYS[3], id) == 1 and ok and type(c) == 'table' then
    if type(c.presence) == 'string' then redis.call('HDEL', c.presence, id) end
    if c.events == true then
      local since = tonumber(c.since) or now
      local ev = cjson.encode({
        type = 'disconnect', session_id = c.session_id, agent_id = c.agent_id,
        connection_id = id, process = ARGV[1], time = now, code = 1006,
        reason = 'process_lost', duration_ms = math.max(0, now - since),
        messages_in = cjson.null, messages_out = cjson.null, reaped_by = ARGV[5]})
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'event', ev)
      if type(c.channel) == 'string' then redis.call('PUBLISH', c.channel, ev) end
    end
  end
  n = n + 1
end
if redis.call('HLEN', KEYS[3]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return n
";
