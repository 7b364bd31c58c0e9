"""The Lua scripts of the Redis session store: each runs atomically inside Redis.

Layout under a key prefix P (ARGV[1] of every script):
  P.."s:"..id      hash  m model, o owner, p position (decimal), l layers, h/c raw float32, t idle TTL ms;
                         its Redis expiry is the idle TTL, refreshed on every access
  P.."idx"         zset  id -> expiry (ms) when last looked at: counts the store's sessions
  P.."own:"..owner zset  the same, per owner: counts a principal's sessions
  P.."mdl:"..model zset  the same, per model version key (`m`): counts the sessions pinned to a version
  P.."models"      set   the model version keys that may have sessions
  P.."meta"        hash  id -> "<state bytes> <owner> <model>", to unaccount a session whose hash Redis expired
                         (sessions written before versions were counted have "<state bytes> <owner>": they are
                         in no per-model index)
  P.."bytes"       int   state bytes of the indexed sessions

The indexes are not refreshed on each step (a step writes only its session's hash): an entry whose
recorded expiry passed is looked at again (`prune`), re-scored from the hash's remaining TTL if the
session lives on, forgotten otherwise. Time comes from Redis (`TIME`), so replicas' clocks never mix.
Keys are built inside the scripts: the store needs one Redis (or a primary with replicas), not a Cluster.
"""

from __future__ import annotations

_COMMON = """
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function meta_of(id)
  local meta = redis.call('HGET', P .. 'meta', id)
  if not meta then return nil, nil, nil end
  local space = string.find(meta, ' ', 1, true)
  local rest = string.sub(meta, space + 1)
  local second = string.find(rest, ' ', 1, true)
  if not second then return tonumber(string.sub(meta, 1, space - 1)), rest, nil end
  return tonumber(string.sub(meta, 1, space - 1)), string.sub(rest, 1, second - 1), string.sub(rest, second + 1)
end
local function forget(id)
  local bytes, owner, model = meta_of(id)
  redis.call('ZREM', P .. 'idx', id)
  if bytes then
    redis.call('ZREM', P .. 'own:' .. owner, id)
    if model then redis.call('ZREM', P .. 'mdl:' .. model, id) end
    redis.call('DECRBY', P .. 'bytes', bytes)
    redis.call('HDEL', P .. 'meta', id)
  end
end
local function prune(zkey, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'LIMIT', 0, limit)
  local gone = 0
  for _, id in ipairs(ids) do
    local pttl = redis.call('PTTL', P .. 's:' .. id)
    if pttl == -2 then
      forget(id)
      gone = gone + 1
    else
      local score = now + math.max(pttl, 1000)
      local _, owner, model = meta_of(id)
      redis.call('ZADD', P .. 'idx', score, id)
      if owner then redis.call('ZADD', P .. 'own:' .. owner, score, id) end
      if model then redis.call('ZADD', P .. 'mdl:' .. model, score, id) end
    end
  end
  return gone, #ids
end
"""

# ARGV: P, id, model, owner, position, layers, h, c, ttl_ms, max_sessions, evict (1/0), max_per_owner (0: none)
# -> {status, expires_at_ms, evicted}; status 'ok', 'full' or 'owner_full'. An existing id is replaced.
CREATE = _COMMON + """
local id, owner, ttl = ARGV[2], ARGV[4], tonumber(ARGV[9])
local key = P .. 's:' .. id
local now = now_ms()
if redis.call('EXISTS', key) == 1 then
  redis.call('DEL', key)
  forget(id)
end
local per_owner = tonumber(ARGV[12])
if per_owner > 0 and owner ~= '' then
  local own = P .. 'own:' .. owner
  if redis.call('ZCARD', own) >= per_owner then prune(own, now, per_owner) end
  if redis.call('ZCARD', own) >= per_owner then return {'owner_full', 0, 0} end
end
local evicted = 0
local max_sessions = tonumber(ARGV[10])
if redis.call('ZCARD', P .. 'idx') >= max_sessions then
  prune(P .. 'idx', now, 1000)
  if redis.call('ZCARD', P .. 'idx') >= max_sessions then
    if ARGV[11] ~= '1' then return {'full', 0, 0} end
    local victim = redis.call('ZRANGE', P .. 'idx', 0, 0)[1]
    redis.call('DEL', P .. 's:' .. victim)
    forget(victim)
    evicted = 1
  end
end
redis.call('HSET', key, 'm', ARGV[3], 'o', owner, 'p', ARGV[5], 'l', ARGV[6], 'h', ARGV[7], 'c', ARGV[8], 't', ttl)
redis.call('PEXPIRE', key, ttl)
local bytes = string.len(ARGV[7]) + string.len(ARGV[8])
redis.call('ZADD', P .. 'idx', now + ttl, id)
redis.call('ZADD', P .. 'own:' .. owner, now + ttl, id)
redis.call('ZADD', P .. 'mdl:' .. ARGV[3], now + ttl, id)
redis.call('SADD', P .. 'models', ARGV[3])
redis.call('HSET', P .. 'meta', id, bytes .. ' ' .. owner .. ' ' .. ARGV[3])
redis.call('INCRBY', P .. 'bytes', bytes)
return {'ok', now + ttl, evicted}
"""

FIELDS = ("m", "o", "p", "l", "h", "c", "t")

# KEYS: session hashes. -> {now_ms, then the FIELDS of each (all nil where missing)}; refreshes their expiry.
LOAD = """
local t = redis.call('TIME')
local out = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
for _, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'm', 'o', 'p', 'l', 'h', 'c', 't')
  if v[1] and v[7] then
    redis.call('PEXPIRE', key, v[7])
  else
    v = {false, false, false, false, false, false, false}
  end
  for j = 1, 7 do out[#out + 1] = v[j] end
end
return out
"""

# KEYS[1]: session hash; ARGV: expected position, new position, h, c -> 1 applied, 0 not (moved or gone).
# Positions compare as decimal strings: exact for any uint64, where Lua numbers are not.
COMMIT = """
if redis.call('HGET', KEYS[1], 'p') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'p', ARGV[2], 'h', ARGV[3], 'c', ARGV[4])
redis.call('PEXPIRE', KEYS[1], redis.call('HGET', KEYS[1], 't'))
return 1
"""

# ARGV: P, id -> {now_ms, FIELDS...} of the removed session, or nil if there was none.
DELETE = _COMMON + """
local key = P .. 's:' .. ARGV[2]
local v = redis.call('HMGET', key, 'm', 'o', 'p', 'l', 'h', 'c', 't')
if not v[1] then return false end
redis.call('DEL', key)
forget(ARGV[2])
table.insert(v, 1, now_ms())
return v
"""

# ARGV: P, limit -> {sessions forgotten, entries looked at, sessions indexed, state bytes}.
SWEEP = _COMMON + """
local gone, seen = prune(P .. 'idx', now_ms(), tonumber(ARGV[2]))
return {gone, seen, redis.call('ZCARD', P .. 'idx'), tonumber(redis.call('GET', P .. 'bytes') or '0')}
"""

# ARGV: P, limit -> {model, live sessions, model, live sessions, ...} of every model version key with sessions.
# Entries whose recorded expiry passed are looked at again first (at most `limit` per version).
COUNT = _COMMON + """
local now, out = now_ms(), {}
for _, model in ipairs(redis.call('SMEMBERS', P .. 'models')) do
  local zkey = P .. 'mdl:' .. model
  prune(zkey, now, tonumber(ARGV[2]))
  local count = redis.call('ZCARD', zkey)
  if count == 0 then
    redis.call('SREM', P .. 'models', model)
  else
    out[#out + 1] = model
    out[#out + 1] = count
  end
end
return out
"""
