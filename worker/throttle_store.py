"""Redis storage for the global throttle: the Lua scripts and a thin wrapper around them.

Each bucket owns two keys (see :mod:`jobs.constants`): a sorted set logging every
admission (member ``<reservation id>:<tokens>``, score = admission time in ms of
Redis time) and a pause marker holding the Redis time (ms) until which nothing may
start. Every decision is a single script call that reads the clock with Redis
``TIME``, so workers on different machines never compare their own clocks.

Slots are handed out in non-decreasing time order. A new entry therefore only has to
fit the window that ends at its own slot: every later window that contains it holds
a subset of the entries in that one. :func:`worker.throttle.earliest_slot` is the
pure-Python statement of the same computation.

This module knows nothing about waiting, errors or cost policy; :mod:`worker.throttle`
does. Redis errors propagate unchanged.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from jobs.constants import throttle_log_key, throttle_pause_key

#: Helpers shared by the scripts that place entries. ``next_slot`` scans at most the
#: newest ``rpm`` entries: the count limit alone forbids a longer window.
_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function entry_tokens(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

local function find(log, id, slot)
  local prefix = id .. ':'
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', log, slot, slot)) do
    if string.sub(member, 1, #prefix) == prefix then
      return member
    end
  end
  return nil
end

local function next_slot(log, floor, window, rpm, tpm, cost)
  local tail = redis.call('ZREVRANGE', log, 0, rpm - 1, 'WITHSCORES')
  if #tail > 0 and tonumber(tail[2]) > floor then
    floor = tonumber(tail[2])
  end
  local count, tokens = 0, cost
  for i = 1, #tail, 2 do
    count = count + 1
    tokens = tokens + entry_tokens(tail[i])
    if count + 1 > rpm or tokens > tpm then
      return math.max(floor, tonumber(tail[i + 1]) + window)
    end
  end
  return floor
end

local function place(log, pause_key, id, cost, window, rpm, tpm, max_wait, now)
  redis.call('ZREMRANGEBYSCORE', log, '-inf', string.format('%d', now - window))
  local floor = now
  local pause_until = tonumber(redis.call('GET', pause_key) or 0)
  if pause_until > floor then
    floor = pause_until
  end
  local slot = next_slot(log, floor, window, rpm, tpm, cost)
  if slot - now > max_wait then
    return {slot, now, 0}
  end
  redis.call('ZADD', log, string.format('%d', slot), id .. ':' .. string.format('%d', cost))
  -- The newest entry must outlive its own window; older ones end sooner.
  redis.call('PEXPIRE', log, string.format('%d', slot - now + window + 1000))
  return {slot, now, 1}
end
"""

#: Reserve the earliest admissible slot for a new request.
#: KEYS[1] log, KEYS[2] pause marker.
#: ARGV[1] reservation id, ARGV[2] tokens, ARGV[3] window ms, ARGV[4] rpm, ARGV[5] tpm,
#: ARGV[6] max wait ms.
#: Returns {slot ms, now ms, admitted}; admitted = 0 means the slot lay more than
#: max wait ahead and nothing was written.
RESERVE_LUA = (
    _LUA_COMMON
    + """
return place(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
             tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), now_ms())
"""
)

#: Re-check a reservation whose slot has come, in case a pause arrived meanwhile.
#: KEYS[1] log, KEYS[2] pause marker.
#: ARGV[1] reservation id, ARGV[2] slot ms, ARGV[3] tokens, ARGV[4] window ms,
#: ARGV[5] rpm, ARGV[6] tpm, ARGV[7] max wait ms (from now).
#: Returns {slot ms, now ms, admitted}. Unpaused and still logged: the same slot and
#: admitted = 1. Otherwise the entry is removed and placed again as by RESERVE_LUA
#: (after the pause), with admitted = 0 if that slot lies beyond max wait.
CONFIRM_LUA = (
    _LUA_COMMON
    + """
local now = now_ms()
local member = find(KEYS[1], ARGV[1], ARGV[2])
local pause_until = tonumber(redis.call('GET', KEYS[2]) or 0)
if member and pause_until <= now then
  return {tonumber(ARGV[2]), now, 1}
end
if member then
  redis.call('ZREM', KEYS[1], member)
end
return place(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]),
             tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), now)
"""
)

#: Rewrite a logged entry's token count, keeping its slot.
#: KEYS[1] log. ARGV[1] reservation id, ARGV[2] slot ms, ARGV[3] tokens.
#: Returns 1 if rewritten, 0 if the entry is gone (already out of the window).
SETTLE_LUA = (
    _LUA_COMMON
    + """
local member = find(KEYS[1], ARGV[1], ARGV[2])
if not member then
  return 0
end
redis.call('ZREM', KEYS[1], member)
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1] .. ':' .. ARGV[3])
return 1
"""
)

#: Remove a logged entry for a request that was never sent.
#: KEYS[1] log. ARGV[1] reservation id, ARGV[2] slot ms.
#: Returns 1 if removed, 0 if it was not there.
RELEASE_LUA = (
    _LUA_COMMON
    + """
local member = find(KEYS[1], ARGV[1], ARGV[2])
if not member then
  return 0
end
return redis.call('ZREM', KEYS[1], member)
"""
)

#: Stop admissions until now + the given delay, never shortening an existing pause.
#: KEYS[1] pause marker. ARGV[1] pause ms.
#: Returns the pause end (ms, Redis time). The marker expires when the pause ends.
PAUSE_LUA = (
    _LUA_COMMON
    + """
local now = now_ms()
local wanted = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or 0)
if wanted > current then
  redis.call('SET', KEYS[1], string.format('%d', wanted), 'PX', string.format('%d', wanted - now))
  return wanted
end
return current
"""
)

#: Requests and tokens admitted in the window ending now (later slots not counted).
#: KEYS[1] log. ARGV[1] window ms.
#: Returns {requests, tokens}.
USAGE_LUA = (
    _LUA_COMMON
    + """
local now = now_ms()
local members = redis.call('ZRANGEBYSCORE', KEYS[1],
  string.format('(%d', now - tonumber(ARGV[1])), string.format('%d', now))
local tokens = 0
for _, member in ipairs(members) do
  tokens = tokens + entry_tokens(member)
end
return {#members, tokens}
"""
)


@dataclass(frozen=True)
class _Scripts:
    reserve: Script
    confirm: Script
    settle: Script
    release: Script
    pause: Script
    usage: Script


_registered: weakref.WeakKeyDictionary[redis.Redis, _Scripts] = weakref.WeakKeyDictionary()
_registered_lock = threading.Lock()


def _scripts_for(client: redis.Redis) -> _Scripts:
    """Register the scripts once per client; the client reloads them after a flush."""
    with _registered_lock:
        scripts = _registered.get(client)
        if scripts is None:
            scripts = _Scripts(
                reserve=client.register_script(RESERVE_LUA),
                confirm=client.register_script(CONFIRM_LUA),
                settle=client.register_script(SETTLE_LUA),
                release=client.register_script(RELEASE_LUA),
                pause=client.register_script(PAUSE_LUA),
                usage=client.register_script(USAGE_LUA),
            )
            _registered[client] = scripts
        return scripts


@dataclass(frozen=True)
class SlotDecision:
    """What a placing script decided: the slot, Redis time then, and whether it was taken."""

    slot_ms: int
    now_ms: int
    admitted: bool


def _decision(raw: Any) -> SlotDecision:
    slot, now, admitted = raw
    return SlotDecision(slot_ms=int(slot), now_ms=int(now), admitted=bool(int(admitted)))


class ThrottleStore:
    """One bucket's admissions log and pause marker in Redis.

    Limits travel with every call rather than living in Redis, so every client of a
    bucket must pass the same ``rpm``, ``tpm`` and window.
    """

    def __init__(self, client: redis.Redis, bucket: str, *, window_ms: int) -> None:
        self._client = client
        self._scripts = _scripts_for(client)
        self._log = throttle_log_key(bucket)
        self._pause = throttle_pause_key(bucket)
        self.window_ms = window_ms

    def reserve(
        self, rid: str, tokens: int, *, rpm: int, tpm: int, max_wait_ms: int
    ) -> SlotDecision:
        """Log a new entry at the earliest admissible slot, unless it is too far away."""
        raw = self._scripts.reserve(
            keys=[self._log, self._pause],
            args=[rid, tokens, self.window_ms, rpm, tpm, max_wait_ms],
        )
        return _decision(raw)

    def confirm(
        self, rid: str, slot_ms: int, tokens: int, *, rpm: int, tpm: int, max_wait_ms: int
    ) -> SlotDecision:
        """Keep the entry's slot if no pause covers now, else move it after the pause."""
        raw = self._scripts.confirm(
            keys=[self._log, self._pause],
            args=[rid, slot_ms, tokens, self.window_ms, rpm, tpm, max_wait_ms],
        )
        return _decision(raw)

    def settle(self, rid: str, slot_ms: int, tokens: int) -> bool:
        """Set the entry's token count; False if it already left the log."""
        return bool(self._scripts.settle(keys=[self._log], args=[rid, slot_ms, tokens]))

    def release(self, rid: str, slot_ms: int) -> bool:
        """Remove the entry; False if it was not logged."""
        return bool(self._scripts.release(keys=[self._log], args=[rid, slot_ms]))

    def pause(self, pause_ms: int) -> int:
        """Extend the pause to at least now + ``pause_ms``; returns its end (ms)."""
        return int(self._scripts.pause(keys=[self._pause], args=[pause_ms]))

    def pause_remaining_ms(self) -> int:
        """Milliseconds of pause left, by the marker's server-side expiry."""
        remaining = int(self._client.pttl(self._pause))
        return max(remaining, 0)

    def usage(self) -> tuple[int, int]:
        """Requests and tokens logged in the window ending now."""
        requests, tokens = self._scripts.usage(keys=[self._log], args=[self.window_ms])
        return int(requests), int(tokens)
