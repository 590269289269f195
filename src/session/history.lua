#!lua name=wsproxy

local MAX_LEN = __MAX_LEN__
local TTL_MS = __TTL_MS__
local RENEW_MS = __RENEW_MS__
local PUBLISH = '__PUBLISH__'
-- Whether live envelopes name the message before (classic pub/sub on a
-- cluster, where the cluster bus can lose a message without wsproxy's
-- connection dropping: see publish).
local WITH_PREV = __WITH_PREV__

-- session:<id>:history -> session:<id>, and (cluster) session:{<id>}:history
-- -> session:{<id>}
local function base_of(history)
  local base = string.match(history, '^(session:[%w%-_%.]+):history$')
    or string.match(history, '^(session:{[%w%-_%.]+}):history$')
  if not base then
    error('wsproxy: the key must be session:<id>:history, not ' .. history)
  end
  return base
end

-- An offset "<ms>-<seq>" as two numbers, or nil.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if not ms or #ms > 15 or #seq > 15 then return nil end
  return tonumber(ms), tonumber(seq)
end

local function cmp(a_ms, a_seq, b_ms, b_seq)
  if a_ms ~= b_ms then return a_ms < b_ms and -1 or 1 end
  if a_seq ~= b_seq then return a_seq < b_seq and -1 or 1 end
  return 0
end

local function envelope(id, payload)
  return '{"type":"message","offset":"' .. id .. '","data":' .. payload .. '}'
end

-- A live envelope that also names the offset of the message before it.
local function envelope_after(id, prev, payload)
  return '{"type":"message","offset":"' .. id .. '","prev":"' .. prev
    .. '","data":' .. payload .. '}'
end

-- The history's epoch, made when there is none, and whether it was made
-- now. The same hash keeps the offset of the last message trimmed away,
-- and 'started' once the epoch has had a history (a message published
-- under it, or a join that made it over a history that was there).
local function epoch_of(base)
  local key = base .. ':epoch'
  local epoch = redis.call('HGET', key, 'epoch')
  if not epoch then
    local t = redis.call('TIME')
    epoch = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('HSET', key, 'epoch', epoch)
    redis.call('PEXPIRE', key, TTL_MS)
    return epoch, true
  end
  return epoch, false
end

-- Keeps the newest MAX_LEN entries, trimming in batches of SLACK, and
-- records the newest offset trimmed (Redis' own approximate trimming
-- does not say what it removed, and a resume must know).
local SLACK = 100
local function trim(history, base, len)
  if len <= MAX_LEN + SLACK then return false end
  local cut = redis.call('XRANGE', history, '-', '+', 'COUNT', len - MAX_LEN)
  local through = cut[#cut][1]
  local ms, seq = string.match(through, '^(%d+)-(%d+)$')
  redis.call('XTRIM', history, 'MINID', ms .. '-' .. string.format('%d', tonumber(seq) + 1))
  redis.call('HSET', base .. ':epoch', 'trimmed', through)
  return true
end

-- Renews the history's and the epoch's expiry together, when due: once
-- the history has less than TTL_MS left (a PTTL, a read; a PEXPIRE is a
-- replicated write, and two a message were a fifth of a publish's cost),
-- to TTL_MS + RENEW_MS (a hundredth more), or whenever the publish wrote
-- the epoch (made it, or recorded a trim), so the epoch never expires
-- before its history.
local function keep(history, base, epoch_written)
  if epoch_written or redis.call('PTTL', history) < TTL_MS then
    redis.call('PEXPIRE', history, TTL_MS + RENEW_MS)
    redis.call('PEXPIRE', base .. ':epoch', TTL_MS + RENEW_MS)
  end
end

-- Why a message cannot be stored, or nil. Redis' cjson checks neither
-- UTF-8 nor control characters in strings, and a client's strict JSON
-- parser refuses both. Lua 5.1 patterns are slow per character unless
-- anchored with a single range (a tight loop in C): the scan jumps from
-- one byte outside printable ASCII to the next, so a message of printable
-- ASCII alone (most are) costs one pattern.
local PRINTABLE_RUN = '^[ -\127]*'
local TEXT_RUN = '^[\t\n\r -\127]*'
local NEXT_STRING, IN_STRING = '^[^"]*"[^"\\\t\n\r]*', '^[^"\\\t\n\r]*'
local PLAIN_STRING = '"[^"\\\t\n\r]*"'
local NOT_UTF8 = 'the message must be valid UTF-8'
local CONTROL = 'the message must be JSON: control characters (U+0000 to U+001F) in strings must be escaped'

-- Whether a tab, line feed or carriage return stands inside a string
-- (between tokens they are JSON's whitespace).
local function whitespace_in_string(s)
  local _, e = string.find(s, NEXT_STRING)
  while e do
    local k = e + 1
    local c = string.byte(s, k)
    if c == 34 then
      _, e = string.find(s, NEXT_STRING, k + 1)
    elseif c == 92 then
      _, e = string.find(s, IN_STRING, k + 2)
    else
      -- A tab or line break, or the end of an unterminated string.
      return c ~= nil
    end
  end
  return false
end

local function unfit(s)
  local run = PRINTABLE_RUN
  local _, e = string.find(s, run)
  local len, whitespace = #s, false
  while e < len do
    local k = e + 1
    local c, b1, b2, b3 = string.byte(s, k, k + 3)
    if c < 32 then
      -- Only tab, line feed and carriage return, and not in a string.
      if c ~= 9 and c ~= 10 and c ~= 13 then return CONTROL end
      -- From here on they do not stop the scan (pretty-printed JSON has
      -- one per line); whether one is in a string is checked once.
      whitespace, run = true, TEXT_RUN
      k = k + 1
    else
      -- UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing past
      -- U+10FFFF. DEL (127) is printable here: JSON allows it.
      local n, lo, hi = 2, 128, 191
      if c >= 194 and c <= 223 then n = 2
      elseif c == 224 then n, lo = 3, 160
      elseif c == 237 then n, hi = 3, 159
      elseif c >= 225 and c <= 239 then n = 3
      elseif c == 240 then n, lo = 4, 144
      elseif c >= 241 and c <= 243 then n = 4
      elseif c == 244 then n, hi = 4, 143
      else return NOT_UTF8 end
      if not b1 or b1 < lo or b1 > hi then return NOT_UTF8 end
      if n > 2 and (not b2 or b2 < 128 or b2 > 191) then return NOT_UTF8 end
      if n > 3 and (not b3 or b3 < 128 or b3 > 191) then return NOT_UTF8 end
      k = k + n
    end
    -- The byte after a 2- or 3-byte character is already read: when it is
    -- not ASCII either (CJK text), no scan is needed to reach it.
    local next_byte = k - 3 == e and b2 or k - 4 == e and b3 or nil
    if next_byte and next_byte >= 128 then
      e = k - 1
    else
      _, e = string.find(s, run, k)
    end
  end
  if whitespace then
    -- One pass removes every string without escapes, tabs or line breaks
    -- (the opening quote of any other stays); only if a quote is left do
    -- the strings need walking.
    local rest = string.gsub(s, PLAIN_STRING, '')
    if string.find(rest, '"', 1, true) and whitespace_in_string(s) then
      return CONTROL
    end
  end
  return nil
end

local function stream_info(history)
  local info = redis.call('XINFO', 'STREAM', history)
  local out = {}
  for i = 1, #info, 2 do out[info[i]] = info[i + 1] end
  return out
end

-- Whether a decimal point in s lacks a digit on either side ("1.",
-- "-5.", "1.e5", "-.5"): numbers Redis' cjson takes and JSON does not.
-- Each point is looked at once (a plain find, then two bytes), so a
-- message without one costs a single scan.
local function loose_point(s)
  local k = string.find(s, '.', 1, true)
  while k do
    local before, after = string.byte(s, k - 1), string.byte(s, k + 1)
    if before == 45 then return true end
    if before and before >= 48 and before <= 57
        and not (after and after >= 48 and after <= 57) then
      return true
    end
    k = string.find(s, '.', k + 1, true)
  end
  return false
end

-- s (which cjson parsed) without its strings, each replaced by a space.
local function outside_strings(s)
  local parts, i = {}, 1
  local q = string.find(s, '"', i, true)
  while q do
    parts[#parts + 1] = string.sub(s, i, q - 1)
    local k = q + 1
    while true do
      local _, e = string.find(s, '^[^"\\]*', k)
      if string.byte(s, e + 1) == 92 then
        k = e + 3
      else
        k = e + 2
        break
      end
    end
    i = k
    q = string.find(s, '"', i, true)
  end
  parts[#parts + 1] = string.sub(s, i)
  return table.concat(parts, ' ')
end

local LOOSE_NUMBER = 'the message must be JSON: a number needs a digit on both sides of its decimal point'

-- Why a message cannot be published, or nil.
local function rejected(payload)
  local why = unfit(payload)
  if why then return why end
  -- Strict JSON: Redis' cjson otherwise takes NaN, Infinity and hex
  -- numbers (refused with decode_invalid_numbers off), and a decimal
  -- point without a digit on both sides (refused here), which a client's
  -- JSON parser would refuse in the envelope. A point in a string ("Hi.")
  -- only makes the strings be set aside for a second look.
  if not pcall(cjson.decode, payload) then return 'the message must be JSON' end
  if loose_point(payload) and loose_point(outside_strings(payload)) then
    return LOOSE_NUMBER
  end
  return nil
end

-- Appends messages first..last of args to the history and publishes each
-- (the envelope on :live for reliable clients, the bare message on :down),
-- then does the per-call work once: the new-history check, the trim, the
-- expiries. Returns the offsets.
--
-- With WITH_PREV, each live envelope names the message published before
-- it ("prev", kept as 'last' in the epoch hash; none for a history's
-- first), so that a connection that never saw that one knows it missed it
-- and resumes from history: classic pub/sub reaches wsproxy over the
-- cluster bus, which drops what it could not relay while a link was down
-- without wsproxy's connection dropping. (A hash read and write cost half
-- of an XREVRANGE, whose reply carries the whole entry.)
local function publish(history, base, args, first, last)
  local ids = {}
  local live, down = base .. ':live', base .. ':down'
  local prev
  if WITH_PREV then
    prev = redis.call('HGET', base .. ':epoch', 'last')
  end
  local had_last = prev
  for i = first, last do
    local id = redis.call('XADD', history, '*', 'd', args[i])
    if prev then
      redis.call(PUBLISH, live, envelope_after(id, prev, args[i]))
    else
      redis.call(PUBLISH, live, envelope(id, args[i]))
    end
    if WITH_PREV then prev = id end
    redis.call(PUBLISH, down, args[i])
    ids[#ids + 1] = id
  end
  local len = redis.call('XLEN', history)
  -- Only what was just added: the history was gone (expired, deleted,
  -- evicted, or emptied by XDEL) while its epoch may not be. It starts
  -- again under a new epoch, so that its offsets cannot look like a
  -- continuation of the old ones. The epoch remembers that it had a
  -- history ('started'); one made by a join before anything was
  -- published keeps.
  local fresh = len == #ids
  if fresh then
    if redis.call('HEXISTS', base .. ':epoch', 'started') == 1 then
      redis.call('DEL', base .. ':epoch')
    end
    epoch_of(base)
    redis.call('HSET', base .. ':epoch', 'started', '1')
  end
  local trimmed = trim(history, base, len)
  -- After the fresh-history check, which may have made the hash anew. An
  -- HSET keeps the hash's expiry; one that made the hash (no 'last' read
  -- above: a history's first message, or an epoch hash gone) gets one.
  if WITH_PREV then redis.call('HSET', base .. ':epoch', 'last', ids[#ids]) end
  keep(history, base, fresh or trimmed or (WITH_PREV and not had_last))
  return ids
end

redis.register_function('wsproxy_publish', function(keys, args)
  local history, payload = keys[1], args[1]
  if not payload or #args ~= 1 or #keys ~= 1 then
    return redis.error_reply('ERR wsproxy_publish takes one key and one message')
  end
  local base = base_of(history)
  pcall(cjson.decode_invalid_numbers, false)
  local why = rejected(payload)
  if why then return redis.error_reply('ERR wsproxy_publish: ' .. why) end
  return publish(history, base, args, 1, 1)[1]
end)

-- Many messages of one session in one call (a reply streamed token by
-- token): all stored and published in order, or none when one is not
-- fit (the error names the first such message, counting from 1).
local MAX_BATCH = 1000
redis.register_function('wsproxy_publish_batch', function(keys, args)
  local history = keys[1]
  if #keys ~= 1 or #args < 1 or #args > MAX_BATCH then
    return redis.error_reply('ERR wsproxy_publish_batch takes one key and 1 to '
      .. MAX_BATCH .. ' messages')
  end
  local base = base_of(history)
  pcall(cjson.decode_invalid_numbers, false)
  for i = 1, #args do
    local why = rejected(args[i])
    if why then
      return redis.error_reply('ERR wsproxy_publish_batch: message ' .. i .. ': ' .. why
        .. ' (nothing was published)')
    end
  end
  return publish(history, base, args, 1, #args)
end)

redis.register_function('wsproxy_join', function(keys, args)
  local history = keys[1]
  local base = base_of(history)
  local epoch, made = epoch_of(base)
  redis.call('PEXPIRE', base .. ':epoch', TTL_MS)
  local exists = redis.call('EXISTS', history) == 1
  if made and exists then
    -- Made again over a history that is there (the epoch evicted alone).
    redis.call('HSET', base .. ':epoch', 'started', '1')
  end
  local last, deleted = '0-0', '0-0'
  if exists then
    redis.call('PEXPIRE', history, TTL_MS)
    local info = stream_info(history)
    last = info['last-generated-id']
    deleted = info['max-deleted-entry-id'] or '0-0'
  end
  local want_epoch, from = args[1] or '', args[2] or ''
  if want_epoch == '' then return {epoch, last, 'fresh'} end
  if want_epoch ~= epoch then return {epoch, last, 'epoch_changed'} end
  local f_ms, f_seq = parse(from)
  if not f_ms then return {epoch, last, 'unknown_offset'} end
  if not exists then
    -- Nothing published yet under this epoch: from "0-0", nothing was
    -- missed. Otherwise the history is gone while its epoch is not
    -- (deleted, evicted): the messages after the client's offset cannot
    -- be told, "0-0" included (it was 'resumed' with nothing, and every
    -- message since that welcome lost without a word).
    if f_ms == 0 and f_seq == 0
      and redis.call('HEXISTS', base .. ':epoch', 'started') == 0 then
      return {epoch, last, 'recovered'}
    end
    return {epoch, last, 'expired'}
  end
  local l_ms, l_seq = parse(last)
  if cmp(f_ms, f_seq, l_ms, l_seq) > 0 then
    return {epoch, last, 'unknown_offset'}
  end
  -- Trimmed (by wsproxy_publish) or deleted (XDEL) past the offset?
  -- Exactly at it, the client saw that message: the rest is all here.
  local trimmed = redis.call('HGET', base .. ':epoch', 'trimmed') or '0-0'
  local gone_at = f_ms == 0 and f_seq == 0
  for _, gone in ipairs({trimmed, deleted}) do
    local g_ms, g_seq = parse(gone)
    if g_ms then
      local c = cmp(f_ms, f_seq, g_ms, g_seq)
      if c < 0 then return {epoch, last, 'trimmed'} end
      gone_at = gone_at or c == 0
    end
  end
  -- The offset must be one this history gave out: its entry (read with
  -- the rest, and not replayed), or "0-0" or a message since removed. Any
  -- other position, another session's offset say, would skip or repeat
  -- messages.
  local entries = redis.call('XRANGE', history, from, '+')
  local first = 1
  if entries[1] and entries[1][1] == from then
    first = 2
  elseif not gone_at then
    return {epoch, last, 'unknown_offset'}
  end
  local out = {epoch, last, 'recovered'}
  for e = first, #entries do
    local entry = entries[e]
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'd' then out[#out + 1] = envelope(entry[1], fields[i + 1]) end
    end
  end
  return out
end)

-- KEYS: the shard's stream, the message's "seen" key.
-- ARGV: session, agent, client message id, data, stream MAXLEN, seen TTL (s).
-- Returns {offset, 0} stored, {first offset, 1} a resend of the same data,
-- {first offset, 2} the id already stored with other data (not stored).
redis.register_function('wsproxy_up', function(keys, args)
  local stream, seen = keys[1], keys[2]
  -- wsproxy sends what serde_json took; anyone else calling is held to
  -- the same.
  local why = unfit(args[4] or '')
  if why then return redis.error_reply('ERR wsproxy_up: ' .. why) end
  local digest = redis.sha1hex(args[4])
  local first = redis.call('GET', seen)
  if first then
    local offset, was = string.match(first, '^(%S+) (%x+)$')
    if was == digest then return {offset, 1} end
    return {offset or first, 2}
  end
  local id = redis.call('XADD', stream, 'MAXLEN', '~', args[5], '*',
    'session', args[1], 'agent', args[2], 'id', args[3], 'data', args[4])
  redis.call('SET', seen, id .. ' ' .. digest, 'EX', args[6])
  return {id, 0}
end)
