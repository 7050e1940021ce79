"""The Lua scripts: every operation that must be atomic runs in one of them.

Key layout of table NAME (everything under one hash tag, so each script
touches one Cluster slot; ``P`` = ``{shmreg:NAME}``):

=====================  =======================================================
``P:meta``             hash: the table exists (created ms, lease ttl)
``P:k:<type><key>``    an entry's value (see ``codec``); a TTL is the key's PX.
                       An owned entry's value starts with a zero byte and
                       its owner's 16-character token: a plain ``GET``
                       reads an unowned entry in one command, and tells
                       when the owner's lease must be checked too
``P:idx``              sorted set, all scores 0: every entry key (``len``,
                       ``select(prefix)`` by ``ZRANGEBYLEX``; ``SCAN`` in
                       Cluster would walk every key of the node)
``P:exp``              sorted set: entry key -> expiry (server ms), to drop
                       expired keys from the index
``P:own``              hash: owned entry key -> lease token
``P:o:<token>``        set: the entry keys a token owns (to reap them)
``P:L:<token>``        a process's lease: ``host pid start``, PX lease ttl,
                       renewed by its heartbeat thread; gone = dead owner
``P:procs``            hash: token -> ``host pid start``, kept until the
                       owner was reaped (so a reap is never lost)
``P:C:<token>``        a watcher's claim on reaping a dead token (PX)
``P:W:<host>``         the active watcher of one host (PX, renewed)
=====================  =======================================================

An entry whose owner has no lease is invisible to every read at once
(checked in the same script as the read) and left for the reaper, so
``on_death`` still sees it.  Owned writes name their token and fail with
``LEASE`` when its lease is gone (fencing).

Each script gets the prefix ``P`` as ``ARGV[1]`` and, as ``KEYS[1]``, a key
of the table (what Cluster routing needs); every other key it derives from
``P`` lies in the same slot.
"""

from __future__ import annotations

PRELUDE = r"""
local P = ARGV[1]
local IDX, EXP, OWN = P .. ':idx', P .. ':exp', P .. ':own'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function lease_alive(tok)
  return redis.call('EXISTS', P .. ':L:' .. tok) == 1
end
-- value (without the owner mark), owner token ('' if none) of a live
-- entry; nil if absent or its owner is dead
local function live_of(v)
  if not v then return nil end
  if string.byte(v, 1) == 0 then
    local o = string.sub(v, 2, 17)
    if not lease_alive(o) then return nil end
    return string.sub(v, 18), o
  end
  return v, ''
end
local function live(ek)
  return live_of(redis.call('GET', ek))
end
local function unmark(v)
  if v and string.byte(v, 1) == 0 then return string.sub(v, 18) end
  return v
end
local function drop_owner(ek)
  local o = redis.call('HGET', OWN, ek)
  if o then
    redis.call('SREM', P .. ':o:' .. o, ek)
    redis.call('HDEL', OWN, ek)
  end
end
local function unlink(ek)
  redis.call('DEL', ek)
  redis.call('ZREM', IDX, ek)
  redis.call('ZREM', EXP, ek)
  drop_owner(ek)
end
local function fence(tok)
  if tok ~= '' and not lease_alive(tok) then
    return redis.error_reply('LEASE lease of this process is gone')
  end
  return nil
end
-- store v (ttl ms or '' for none, owner token or ''); `was` is the key's
-- previous raw value if the caller read it (nil: absent, or unknown)
local function store(ek, v, ttl, tok, was)
  if tok ~= '' then v = '\0' .. tok .. v end
  if ttl ~= '' then
    redis.call('SET', ek, v, 'PX', ttl)
    redis.call('ZADD', EXP, now_ms() + tonumber(ttl), ek)
  else
    redis.call('SET', ek, v)
    redis.call('ZREM', EXP, ek)
  end
  -- A key that held a value is indexed already (every write indexes it), and
  -- only a marked (owned) one can have an owner to forget; an absent key
  -- may have left both behind when it expired.
  if not was then redis.call('ZADD', IDX, 0, ek) end
  if not was or string.byte(was, 1) == 0 then drop_owner(ek) end
  if tok ~= '' then
    redis.call('HSET', OWN, ek, tok)
    redis.call('SADD', P .. ':o:' .. tok, ek)
  end
end
-- drop expired entries from the index; how many
local function purge()
  local now = now_ms()
  local gone = redis.call('ZRANGEBYSCORE', EXP, '-inf', now, 'LIMIT', 0, 10000)
  for _, ek in ipairs(gone) do unlink(ek) end
  return #gone
end
"""

# KEYS[1] entry key.  -> {value, owner, pttl} or nil
READ = PRELUDE + r"""
local v, o = live(KEYS[1])
if not v then return nil end
return {v, o, redis.call('PTTL', KEYS[1])}
"""

# KEYS[1] entry key; ARGV: P, mode (set|new|cas), value, ttl ms|'', token|'', expected|''
# -> {1} stored, {0, current value} not stored
PUT = PRELUDE + r"""
local ek, mode, val, ttl, tok = KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local err = fence(tok)
if err then return err end
local raw = redis.call('GET', ek)
local v = live_of(raw)
if mode == 'new' and v then return {0, v} end
if mode == 'cas' and v ~= ARGV[6] then return {0} end
store(ek, val, ttl, tok, raw)
return {1}
"""

# KEYS[1] entry key; ARGV: P, only token|'' -> old value, or nil (absent, or not that owner's)
DELETE = PRELUDE + r"""
local ek = KEYS[1]
local v, o = live(ek)
if not v then return nil end
if ARGV[2] ~= '' and o ~= ARGV[2] then return nil end
unlink(ek)
return v
"""

# KEYS[1] entry key; ARGV: P, incr, default, ttl ms|'' -> new value (decimal string)
INCR = PRELUDE + r"""
local ek = KEYS[1]
local v, o = live(ek)
if not v then
  if redis.call('EXISTS', ek) == 1 then unlink(ek) end   -- a dead owner's: replaced
  -- The server's INCRBY does the int64 arithmetic (Lua numbers are doubles).
  redis.call('SET', ek, ARGV[3])
  local res = redis.pcall('INCRBY', ek, ARGV[2])
  if type(res) == 'table' then redis.call('DEL', ek); return redis.error_reply('OVERFLOW') end
  local s = redis.call('GET', ek)
  store(ek, s, ARGV[4], '')
  return s
end
local c = string.byte(v, 1)
if not (c == 45 or (c >= 48 and c <= 57)) then return redis.error_reply('NOTINT') end
if o == '' then
  local res = redis.pcall('INCRBY', ek, ARGV[2])
  if type(res) == 'table' then return redis.error_reply('OVERFLOW') end
  -- (a Lua number is a double: exact below 2^53, else read the decimal back)
  if res > -9007199254740992 and res < 9007199254740992 then return res end
  return redis.call('GET', ek)
end
-- An owned counter: the arithmetic on a scratch key, the owner mark kept.
local tmp = P .. ':tmp'
redis.call('SET', tmp, v)
local res = redis.pcall('INCRBY', tmp, ARGV[2])
local s = redis.call('GET', tmp)
redis.call('DEL', tmp)
if type(res) == 'table' then return redis.error_reply('OVERFLOW') end
redis.call('SET', ek, '\0' .. o .. s, 'KEEPTTL')
return s
"""

# KEYS[1] entry key; ARGV: P, ttl ms|'' -> 1 if live (and given the ttl), else 0
EXPIRE = PRELUDE + r"""
local ek = KEYS[1]
if not live(ek) then return 0 end
if ARGV[2] == '' then
  redis.call('PERSIST', ek)
  redis.call('ZREM', EXP, ek)
else
  redis.call('PEXPIRE', ek, ARGV[2])
  redis.call('ZADD', EXP, now_ms() + tonumber(ARGV[2]), ek)
end
return 1
"""

# KEYS[1] index; ARGV: P, min, max (ZRANGEBYLEX bounds), count
# -> flat {ek, value, owner, pttl, ...} of the live entries among the next
#    `count` index members, then the last member scanned ('' at the end)
ENTRIES = PRELUDE + r"""
local members = redis.call('ZRANGEBYLEX', IDX, ARGV[2], ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, ek in ipairs(members) do
  local v, o = live(ek)
  if v then
    out[#out + 1] = ek; out[#out + 1] = v; out[#out + 1] = o
    out[#out + 1] = redis.call('PTTL', ek)
  end
end
out[#out + 1] = (#members < tonumber(ARGV[4])) and '' or members[#members]
return out
"""

# KEYS[1] index; ARGV: P -> number of live entries
LEN = PRELUDE + r"""
purge()
local n = redis.call('ZCARD', IDX)
for _, tok in ipairs(redis.call('HKEYS', P .. ':procs')) do
  if not lease_alive(tok) then
    for _, ek in ipairs(redis.call('SMEMBERS', P .. ':o:' .. tok)) do
      if redis.call('HGET', OWN, ek) == tok and redis.call('EXISTS', ek) == 1 then n = n - 1 end
    end
  end
end
return n
"""

# KEYS[1] index; ARGV: P -> expired entries dropped
PURGE = PRELUDE + r"""
return purge()
"""

# KEYS[1] index; ARGV: P, count -> entries deleted (call until 0)
CLEAR = PRELUDE + r"""
local members = redis.call('ZRANGE', IDX, 0, tonumber(ARGV[2]) - 1)
for _, ek in ipairs(members) do unlink(ek) end
return #members
"""

# KEYS[1] procs; ARGV: P, token, info, lease ms -> 1
LEASE_TAKE = PRELUDE + r"""
redis.call('SET', P .. ':L:' .. ARGV[2], ARGV[3], 'PX', ARGV[4])
redis.call('HSET', P .. ':procs', ARGV[2], ARGV[3])
return 1
"""

# KEYS[1] procs; ARGV: P, lease ms, token... -> {1|0 per token}: renewed, or gone (never revived)
LEASE_RENEW = PRELUDE + r"""
local out = {}
for i = 3, #ARGV do
  out[#out + 1] = redis.call('PEXPIRE', P .. ':L:' .. ARGV[i], ARGV[2])
end
return out
"""

# KEYS[1] procs; ARGV: P, token -> 1 if it was alive (its entries vanish at once)
LEASE_DROP = PRELUDE + r"""
return redis.call('DEL', P .. ':L:' .. ARGV[2])
"""

# KEYS[1] procs; ARGV: P -> flat {token, info, alive 1|0, ...}
PROCS = PRELUDE + r"""
local out = {}
local all = redis.call('HGETALL', P .. ':procs')
for i = 1, #all, 2 do
  out[#out + 1] = all[i]; out[#out + 1] = all[i + 1]
  out[#out + 1] = lease_alive(all[i]) and 1 or 0
end
return out
"""

# KEYS[1] procs; ARGV: P, token, collect 1|0, delete 1|0, claimer, claim ms, force 1|0
# -> {n, ek, value, pttl, ...}; {-1} owner alive, {-2} another watcher claims it
REAP = PRELUDE + r"""
local tok, collect, delete = ARGV[2], ARGV[3] == '1', ARGV[4] == '1'
if ARGV[7] ~= '1' and lease_alive(tok) then return {-1} end
local ck = P .. ':C:' .. tok
local c = redis.call('GET', ck)
if c and c ~= ARGV[5] then return {-2} end
redis.call('SET', ck, ARGV[5], 'PX', ARGV[6])
local set = P .. ':o:' .. tok
local out = {0}
for _, ek in ipairs(redis.call('SMEMBERS', set)) do
  if redis.call('HGET', OWN, ek) == tok and redis.call('EXISTS', ek) == 1 then
    out[1] = out[1] + 1
    if collect then
      out[#out + 1] = ek; out[#out + 1] = unmark(redis.call('GET', ek))
      out[#out + 1] = redis.call('PTTL', ek)
    end
    if delete then unlink(ek) end
  elseif delete then
    redis.call('SREM', set, ek)
  end
end
return out
"""

# KEYS[1] procs; ARGV: P, token, claimer -> 1 if forgotten (its lease is gone
# and no other watcher is reaping it), else 0
RELEASE = PRELUDE + r"""
local tok = ARGV[2]
if lease_alive(tok) then return 0 end
local c = redis.call('GET', P .. ':C:' .. tok)
if c and c ~= ARGV[3] then return 0 end
redis.call('HDEL', P .. ':procs', tok)
redis.call('DEL', P .. ':C:' .. tok)
if redis.call('SCARD', P .. ':o:' .. tok) == 0 then redis.call('DEL', P .. ':o:' .. tok) end
return 1
"""

# KEYS[1] watcher key; ARGV: P, me, ms, mode (take|renew|drop) -> 1 if held after the call
WATCHER = PRELUDE + r"""
local wk, me = KEYS[1], ARGV[2]
if ARGV[4] == 'take' then
  if redis.call('SET', wk, me, 'NX', 'PX', ARGV[3]) then return 1 end
  if redis.call('GET', wk) == me then redis.call('PEXPIRE', wk, ARGV[3]); return 1 end
  return 0
end
if redis.call('GET', wk) ~= me then return 0 end
if ARGV[4] == 'renew' then redis.call('PEXPIRE', wk, ARGV[3]); return 1 end
redis.call('DEL', wk)
return 0
"""

# KEYS[1] meta; ARGV: P -> keys deleted (the whole table, in one step)
DROP_TABLE = PRELUDE + r"""
local n = 0
for _, ek in ipairs(redis.call('ZRANGE', IDX, 0, -1)) do n = n + redis.call('DEL', ek) end
for _, tok in ipairs(redis.call('HKEYS', P .. ':procs')) do
  redis.call('DEL', P .. ':L:' .. tok, P .. ':o:' .. tok, P .. ':C:' .. tok)
end
redis.call('DEL', IDX, EXP, OWN, P .. ':procs', P .. ':meta')
return n
"""

ALL = {name: body for name, body in globals().items()
       if name.isupper() and name not in ("PRELUDE", "ALL") and isinstance(body, str)}
