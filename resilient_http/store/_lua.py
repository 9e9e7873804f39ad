"""The Lua scripts of the Redis store: each one decision, atomic, on one upstream's keys.

Time is the server's ``TIME``, in microseconds, never a worker's clock.
Every number is a whole number of microseconds (a token's interval is
rounded to one), so GCRA's arithmetic is exact: ``burst`` calls at once are
never refused by a rounding error. Answers are durations from the server's now. Every
write sets an expiry. Values read back that are not numbers count as absent.
"""

from __future__ import annotations

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function num(v) return tonumber(v) or 0 end
local function fmt(x) return string.format('%.17g', x) end
local function ms(us) return math.max(1, math.ceil(us / 1000)) end
"""

# KEYS: the limit's theoretical arrival time, the upstream's hold, the limit's
# line (the last turn given to a caller). ARGV: µs per token (whole), burst,
# cost, most µs the caller may wait, turns: 0 none, 1 a turn if refused, 2 and
# the next turn if allowed.
# Returns {allowed 0/1, µs until the slot (refused: until the caller's turn),
# µs of hold left, µs until the caller's next turn (0: none given)}.
GCRA = (
    _PRELUDE
    + """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local hold = num(redis.call('GET', KEYS[2]))
local arrival = math.max(now, hold)
local tat = math.max(num(redis.call('GET', KEYS[1])), arrival)
local new_tat = tat + tonumber(ARGV[3]) * interval
local held = math.ceil(arrival - now)
local function turn(free)
  local t = math.max(free, num(redis.call('GET', KEYS[3])) + interval)
  redis.call('SET', KEYS[3], fmt(t), 'PX', ms(t - now + interval))
  return math.ceil(t - now)
end
local free = math.max(arrival, new_tat - burst * interval)
local wait = math.ceil(free - now)
local turns = tonumber(ARGV[5])
if wait > tonumber(ARGV[4]) then
  if turns > 0 then wait = turn(free) end
  return {0, wait, held, 0}
end
redis.call('SET', KEYS[1], fmt(new_tat), 'PX', ms(new_tat - now))
local later = 0
if turns > 1 then later = turn(math.max(arrival, new_tat + interval - burst * interval)) end
return {1, wait, held, later}
"""
)

# KEYS: the upstream's hold. ARGV: µs. Keeps the later end. Returns µs left.
HOLD = (
    _PRELUDE
    + """
local till = math.max(num(redis.call('GET', KEYS[1])), now + tonumber(ARGV[1]))
if till > now then redis.call('SET', KEYS[1], fmt(till), 'PX', ms(till - now)) end
return math.ceil(till - now)
"""
)

# The breaker's record: one hash per upstream with the round, when it ends
# being open, whether it closed, trial slots out (and when they are free
# again), and successful trials. Scripts answer {state, round, µs until
# half-open}, state 0 closed, 1 open, 2 half-open.
_CIRCUIT = (
    _PRELUDE
    + """
local f = redis.call('HMGET', KEYS[1], 'round', 'until', 'closed', 'out', 'out_until', 'ok')
local c = {exists = f[1] ~= false, round = num(f[1]), till = num(f[2]), closed = f[3] == '1',
           out = num(f[4]), out_until = num(f[5]), ok = num(f[6])}
if c.out_until <= now then c.out = 0 end
local function view()
  if not c.exists or c.closed then return {0, c.round, 0} end
  if now < c.till then return {1, c.round, math.ceil(c.till - now)} end
  return {2, c.round, 0}
end
local function half_open(round)
  return c.exists and not c.closed and c.round == round and c.till <= now
end
"""
)

CIRCUIT = _CIRCUIT + "return view()\n"

# ARGV: µs open, the last round the caller knows, µs to keep the record after.
OPEN = (
    _CIRCUIT
    + """
local after = tonumber(ARGV[2])
if c.exists and not c.closed and (c.round > after or c.till > now) then return view() end
c = {exists = true, round = math.max(c.round, after) + 1, till = now + tonumber(ARGV[1]), closed = false,
     out = 0, out_until = 0, ok = 0}
redis.call('HSET', KEYS[1], 'round', c.round, 'until', fmt(c.till), 'closed', 0, 'out', 0, 'out_until', 0, 'ok', 0)
redis.call('PEXPIRE', KEYS[1], ms(tonumber(ARGV[1]) + tonumber(ARGV[3])))
return view()
"""
)

# ARGV: round, slots, µs before untouched slots are free, µs to keep the record. Returns 1 if claimed.
CLAIM = (
    _CIRCUIT
    + """
if not half_open(tonumber(ARGV[1])) or c.out + c.ok >= tonumber(ARGV[2]) then return 0 end
if c.out == 0 then redis.call('HSET', KEYS[1], 'out_until', fmt(now + tonumber(ARGV[3]))) end
redis.call('HSET', KEYS[1], 'out', c.out + 1)
redis.call('PEXPIRE', KEYS[1], ms(tonumber(ARGV[4])))
return 1
"""
)

# ARGV: round. Returns 1 if a slot was given back.
RELEASE = (
    _CIRCUIT
    + """
if not half_open(tonumber(ARGV[1])) or c.out <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'out', c.out - 1)
return 1
"""
)

# ARGV: round, slots, µs to keep the record.
SUCCEEDED = (
    _CIRCUIT
    + """
if not half_open(tonumber(ARGV[1])) then return view() end
c.ok = c.ok + 1
c.closed = c.ok >= tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'out', math.max(0, c.out - 1), 'ok', c.ok, 'closed', c.closed and 1 or 0)
redis.call('PEXPIRE', KEYS[1], ms(tonumber(ARGV[3])))
return view()
"""
)

# KEYS: the live workers (a sorted set: worker id -> µs its heartbeat ends).
# ARGV: worker id, µs. Returns the number of live workers.
HEARTBEAT = (
    _PRELUDE
    + """
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], fmt(now + ttl), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
if redis.call('PTTL', KEYS[1]) < ms(ttl) then redis.call('PEXPIRE', KEYS[1], ms(ttl)) end
return redis.call('ZCARD', KEYS[1])
"""
)
