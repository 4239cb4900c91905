"""The throttle's storage: one bucket's keys in Redis and the scripts that change them.

:mod:`worker.throttle` decides when to ask and what to do with the answer; this
module only stores. Each script is one constant with its KEYS/ARGV contract and
reads the clock with Redis ``TIME``, so workers on different machines never
compare their own clocks. Redis errors propagate unchanged.

A bucket's keys (names in :mod:`jobs.constants`), all sharing one hash tag:

=========  ======  ====================================================================
log        zset    one member per admitted call (its id), scored by Redis time (ms)
costs      hash    id -> tokens charged for that call (reserved, then settled)
pause      string  Redis time (ms) until which nothing is admitted (after a 429)
total      string  the tokens of every call in the log, kept by each script that changes
                   it, so that no script reads the whole log; missing: the log was lost
                   and must be seeded
pace       hash    turn: Redis time (ms) of the next bulk turn; wanted: until when an
                   interactive call waits for room
room       hash    the room learnt for other clients of the key: requests, tokens, at
=========  ======  ====================================================================

The log, the costs and the total expire together one window after the last
admission; so does the pace. The room lives longer (see :mod:`worker.throttle`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis
from redis.commands.core import Script

from jobs.constants import (
    throttle_costs_key,
    throttle_log_key,
    throttle_pace_key,
    throttle_pause_key,
    throttle_room_key,
    throttle_total_key,
)

#: How :data:`ADMIT` treats a call: a new one, one admitted before that starts late and
#: asks again, or one already sent.
Mode = Literal["new", "again", "sent"]
NEW: Final = "new"
AGAIN: Final = "again"
SENT: Final = "sent"

#: Helpers every script starts with.
_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function sum_of(costs, ids)
  local total = 0
  for i = 1, #ids, 1000 do
    local part = redis.call('HMGET', costs, unpack(ids, i, math.min(i + 999, #ids)))
    for j = 1, #part do total = total + (tonumber(part[j]) or 0) end
  end
  return total
end

-- Forget the calls that left the window: the log's members, their costs, and their
-- tokens in the total (if there is one).
local function prune(log, costs, total_key, now, window)
  local gone = redis.call('ZRANGEBYSCORE', log, '-inf', now - window)
  if #gone == 0 then return end
  local freed = sum_of(costs, gone)
  for i = 1, #gone, 1000 do
    redis.call('HDEL', costs, unpack(gone, i, math.min(i + 999, #gone)))
  end
  redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
  if redis.call('EXISTS', total_key) == 1 then redis.call('INCRBY', total_key, -freed) end
end
"""

#: Admit a call now, or say how long until it could be.
#:
#: KEYS: log, costs, pause, total, pace, room.
#: ARGV: id, tokens, window ms, rpm, tpm, reserved requests, reserved tokens, floor
#: requests, floor tokens, bulk (1 or 0), mode (:data:`NEW`, :data:`AGAIN` or
#: :data:`SENT`), the provider's window ms.
#:
#: The call fits when the window ending now, with it, holds at most ``rpm`` less the
#: room (the larger of the learnt room and the floor) requests and ``tpm`` less the
#: room tokens; a bulk call also leaves the reserve free. Where requests bind (the
#: window holds a larger share of them than of tokens), calls take turns one window /
#: that many requests apart: a bulk call waits for its turn, an interactive one
#: takes the next turn without waiting for it. While an interactive call waits for
#: room, bulk calls wait too, so that room coming free goes to it. An id already in
#: the log is taken out first: a late call admits itself AGAIN at the time it really
#: starts (it has had its turn: only the room counts), and one already SENT is
#: logged at once, whatever the limits say.
#:
#: Returns ``{0, stamp, requests, tokens}`` admitted, with its log time (now, or 1 ms
#: after the last call logged, so that the log's order is the admissions') and our
#: calls in the provider's window ending then (this one included); ``{1, ms}`` try
#: again in ms; ``{2, 0}`` the log must be seeded first (nothing changed).
ADMIT = (
    _COMMON
    + """
local log, costs, pause, total_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local pace, room = KEYS[5], KEYS[6]
local id, cost, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rpm, tpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local reserve_r, reserve_t = tonumber(ARGV[6]), tonumber(ARGV[7])
local floor_r, floor_t, bulk = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10] == '1'
local mode, span = ARGV[11], tonumber(ARGV[12])
local now = now_ms()
if redis.call('EXISTS', total_key) == 0 then return {2, 0} end
prune(log, costs, total_key, now, window)
if redis.call('ZSCORE', log, id) then
  redis.call('INCRBY', total_key, -(tonumber(redis.call('HGET', costs, id)) or 0))
  redis.call('ZREM', log, id)
  redis.call('HDEL', costs, id)
end
local count, total = redis.call('ZCARD', log), tonumber(redis.call('GET', total_key))
local function log_it()
  -- Stamps strictly increase, in the order calls are admitted: a call admitted in the
  -- same ms as the one before is logged 1 ms after it (later: the safe side).
  local stamp = now
  local last = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
  if #last > 0 and tonumber(last[2]) >= stamp then stamp = tonumber(last[2]) + 1 end
  redis.call('ZADD', log, stamp, id)
  redis.call('HSET', costs, id, cost)
  redis.call('PEXPIRE', log, window)
  redis.call('PEXPIRE', costs, window)
  redis.call('SET', total_key, total + cost, 'PX', window)
  -- Ours in the provider's window ending at the stamp: the log less its older calls.
  local older = redis.call('ZRANGEBYSCORE', log, '-inf', stamp - span)
  return {0, stamp, count + 1 - #older, total + cost - sum_of(costs, older)}
end
if mode == 'sent' then return log_it() end
local paused = tonumber(redis.call('GET', pause) or '0')
if paused > now then return {1, paused - now} end
local learnt = redis.call('HMGET', room, 'requests', 'tokens')
local open_r = rpm - math.max(floor_r, tonumber(learnt[1]) or 0)
local open_t = tpm - math.max(floor_t, tonumber(learnt[2]) or 0)
local limit_r, limit_t = open_r, open_t
if bulk then
  limit_r, limit_t = limit_r - reserve_r, limit_t - reserve_t
end
if limit_r < 1 or cost > limit_t then return {1, window} end
local wait = 0
if count + 1 > limit_r then
  local oldest = redis.call('ZRANGE', log, count - limit_r, count - limit_r, 'WITHSCORES')
  wait = tonumber(oldest[2]) + window - now
end
local needed = total + cost
-- Requests bind when the window's share of them is the larger: only then are turns kept.
local paced = (count + 1) * open_t >= needed * open_r
-- Over the tokens: wait for the oldest calls to leave, read a hundred at a time.
local from = 0
while needed > limit_t and from < count do
  local chunk = redis.call('ZRANGE', log, from, from + 99, 'WITHSCORES')
  local ids = {}
  for k = 1, #chunk, 2 do ids[#ids + 1] = chunk[k] end
  local spent = redis.call('HMGET', costs, unpack(ids))
  for k = 1, #ids do
    needed = needed - (tonumber(spent[k]) or 0)
    if needed <= limit_t then
      wait = math.max(wait, tonumber(chunk[2 * k]) + window - now)
      break
    end
  end
  from = from + 100
end
local turns = redis.call('HMGET', pace, 'turn', 'wanted')
local turn, wanted = tonumber(turns[1]) or 0, tonumber(turns[2]) or 0
if mode == 'again' then paced = false end
if bulk and paced and turn > now then wait = math.max(wait, turn - now) end
if bulk and mode == 'new' and wanted > now then wait = math.max(wait, wanted - now) end
if wait > 0 then
  if not bulk and mode == 'new' then redis.call('HSET', pace, 'wanted', now + wait + 100) end
  redis.call('PEXPIRE', pace, window)
  return {1, wait}
end
if not bulk then redis.call('HDEL', pace, 'wanted') end
if paced then
  -- A turn taken a little late keeps the schedule; after an idle spell it starts anew.
  local gap = math.floor(window / open_r)
  if turn < now - math.floor(gap / 2) then turn = now end
  redis.call('HSET', pace, 'turn', turn + gap)
  redis.call('PEXPIRE', pace, window)
end
return log_it()
"""
)

#: Charge logged calls another amount, or take them out of the log; then say what the
#: bucket holds: the calls of the last ``span`` ms and the learnt room.
#:
#: KEYS: log, costs, total, room, pause.
#: ARGV: span ms, after ms (Redis time), within ms, then (id, tokens, was) triples;
#: tokens -1 takes the call out; ``was`` not empty: only if the call is still charged
#: exactly that (a new price for a call in flight never overwrites its settlement). A
#: call already gone from the window is left alone.
#: Returns ``{now, requests, tokens, room requests, room tokens, room at, pause left,
#: later requests, later tokens}``, the last two for our calls admitted in
#: ``(after, after + within]``: they may have reached the provider before the call
#: admitted at ``after``.
SETTLE = (
    _COMMON
    + """
local log, costs, total_key, room, pause = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local delta = 0
for i = 4, #ARGV, 3 do
  local id, tokens, was = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local current = redis.call('ZSCORE', log, id) and redis.call('HGET', costs, id)
  if current and (was == '' or current == was) then
    if tokens < 0 then
      redis.call('ZREM', log, id)
      redis.call('HDEL', costs, id)
      delta = delta - (tonumber(current) or 0)
    else
      redis.call('HSET', costs, id, tokens)
      delta = delta + tokens - (tonumber(current) or 0)
    end
  end
end
local total = redis.call('GET', total_key)
if delta ~= 0 and total then total = redis.call('INCRBY', total_key, delta) end
local now, after, within = now_ms(), tonumber(ARGV[2]), tonumber(ARGV[3])
local since = now - tonumber(ARGV[1])
-- The calls since then: with the total, the log less its older calls; without (the log
-- is lost), those calls themselves.
local requests, tokens
if total then
  local older = redis.call('ZRANGEBYSCORE', log, '-inf', since)
  requests = redis.call('ZCARD', log) - #older
  tokens = tonumber(total) - sum_of(costs, older)
else
  local ids = redis.call('ZRANGEBYSCORE', log, '(' .. since, '+inf')
  requests, tokens = #ids, sum_of(costs, ids)
end
local later = {}
if within > 0 then
  later = redis.call('ZRANGEBYSCORE', log, '(' .. after, after + within)
end
local learnt = redis.call('HMGET', room, 'requests', 'tokens', 'at')
local paused = tonumber(redis.call('GET', pause) or '0')
return {now, requests, tokens, tonumber(learnt[1]) or 0, tonumber(learnt[2]) or 0,
        tonumber(learnt[3]) or 0, math.max(0, paused - now), #later, sum_of(costs, later)}
"""
)

#: Rebuild a lost log from the caller's history, once.
#:
#: KEYS: log, costs, total.  ARGV: window ms, then (age ms, tokens) pairs.
#: Only while the total is missing, so two seeders never log a history twice; the total
#: is then the tokens of the whole log.
#: Returns 1 if this call seeded the log.
SEED = (
    _COMMON
    + """
local log, costs, total_key, window = KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1])
if redis.call('EXISTS', total_key) == 1 then return 0 end
local now = now_ms()
for i = 2, #ARGV, 2 do
  local id = 's.' .. (i / 2)
  redis.call('ZADD', log, now - tonumber(ARGV[i]), id)
  redis.call('HSET', costs, id, ARGV[i + 1])
end
prune(log, costs, total_key, now, window)
redis.call('PEXPIRE', log, window)
redis.call('PEXPIRE', costs, window)
redis.call('SET', total_key, sum_of(costs, redis.call('ZRANGE', log, 0, -1)), 'PX', window)
return 1
"""
)

#: Admit nothing for a while; a longer pause already set stays.
#:
#: KEYS: pause.  ARGV: ms.  Returns the pause's end in Redis time (ms).
PAUSE = (
    _COMMON
    + """
local ends = now_ms() + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current >= ends then return current end
redis.call('SET', KEYS[1], ends, 'PX', ARGV[1])
return ends
"""
)


@dataclass(frozen=True)
class Verdict:
    """What :data:`ADMIT` said: admitted (at Redis time ``at_ms``, with ``ours``: our
    requests and tokens in the provider's window then), wait ``wait_ms``, or the log
    must be seeded first."""

    admitted: bool
    at_ms: int = 0
    wait_ms: int = 0
    unseeded: bool = False
    ours: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Room:
    """Requests and tokens of every window left to other clients of the key, and the
    Redis time (ms) they were last grown or shrunk."""

    requests: int = 0
    tokens: int = 0
    at_ms: int = 0


@dataclass(frozen=True)
class Look:
    """What :data:`SETTLE` says the bucket holds."""

    now_ms: int
    requests: int
    tokens: int
    room: Room
    pause_ms: int
    later: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class _Scripts:
    admit: Script
    settle: Script
    seed: Script
    pause: Script


class BucketStore:
    """One bucket's keys; every method is one Redis round trip."""

    def __init__(self, client: redis.Redis, bucket: str, *, window_ms: int) -> None:
        self._client = client
        # Registering only hashes the source; the client loads it again after a flush.
        scripts = (ADMIT, SETTLE, SEED, PAUSE)
        self._scripts = _Scripts(*(client.register_script(script) for script in scripts))
        self.window_ms = window_ms
        self.log = throttle_log_key(bucket)
        self.costs = throttle_costs_key(bucket)
        self.pause_key = throttle_pause_key(bucket)
        self.total = throttle_total_key(bucket)
        self.pace = throttle_pace_key(bucket)
        self.room_key = throttle_room_key(bucket)
        self._lock = threading.Lock()
        self._round_trips = 0

    @property
    def round_trips(self) -> int:
        """Commands sent so far by every thread."""
        return self._round_trips

    def _sent(self) -> None:
        """Count one command sent to Redis (script or pipeline)."""
        with self._lock:
            self._round_trips += 1

    def _run(self, script: Script, keys: list[str], args: Sequence[Any]) -> Any:
        self._sent()
        return script(keys=keys, args=list(args))

    def admit(
        self,
        rid: str,
        tokens: int,
        *,
        rpm: int,
        tpm: int,
        reserve: tuple[int, int],
        floor: tuple[int, int],
        bulk: bool,
        span_ms: int,
        mode: Mode = "new",
    ) -> Verdict:
        keys = [self.log, self.costs, self.pause_key, self.total, self.pace, self.room_key]
        args = (rid, tokens, self.window_ms, rpm, tpm, *reserve, *floor, int(bulk), mode)
        status, value, *ours = self._run(self._scripts.admit, keys, (*args, span_ms))
        if status == 0:
            return Verdict(admitted=True, at_ms=int(value), ours=(int(ours[0]), int(ours[1])))
        return Verdict(admitted=False, wait_ms=int(value), unseeded=status == 2)

    def settle(
        self,
        changes: Sequence[tuple[str, int, int | None]],
        span_ms: int,
        after_ms: int = 0,
        within_ms: int = 0,
    ) -> Look:
        """Charge ``(id, tokens, was)`` calls ``tokens`` (``-1``: take the call out) where
        they are still charged ``was`` (``None``: whatever they are), then look."""
        keys = [self.log, self.costs, self.total, self.room_key, self.pause_key]
        args: list[int | str] = [span_ms, after_ms, within_ms]
        args += [v for rid, now, was in changes for v in (rid, now, "" if was is None else was)]
        now, requests, tokens, room_r, room_t, at, paused, later_r, later_t = self._run(
            self._scripts.settle, keys, args
        )
        room = Room(requests=int(room_r), tokens=int(room_t), at_ms=int(at))
        later = (int(later_r), int(later_t))
        return Look(int(now), int(requests), int(tokens), room, int(paused), later)

    def seed(self, history: Sequence[tuple[int, int]]) -> bool:
        """Log ``(age ms, tokens)`` pairs if the log is still lost."""
        args = [self.window_ms, *(v for pair in history for v in pair)]
        return bool(self._run(self._scripts.seed, [self.log, self.costs, self.total], args))

    def pause(self, pause_ms: int) -> int:
        return int(self._run(self._scripts.pause, [self.pause_key], (pause_ms,)))

    def set_room(self, room: Room, *, keep_ms: int) -> None:
        """Store the learnt room; it is forgotten ``keep_ms`` after its last change."""
        self._sent()
        with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.room_key,
                mapping={"requests": room.requests, "tokens": room.tokens, "at": room.at_ms},
            )
            pipe.pexpire(self.room_key, keep_ms)
            pipe.execute()
