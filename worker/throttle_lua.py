"""The Lua scripts of the global throttle; :mod:`worker.throttle_store` runs them.

Each bucket owns three keys (see :mod:`jobs.constants`): a sorted set logging every
admission, a pause marker holding the Redis time (ms) until which nothing may start,
and an "initialised" marker saying the log has been seeded since it was last lost.

Log members are ``<id>:<tokens>`` with a score of the admission time in ms of Redis
time. The first two characters of the id say what the entry is:

``b.``  a bulk reservation; while its slot lies in the future an interactive request
        may take the slot over, and the entry moves to the end of the queue.
``i.``  an interactive reservation that found room at once; never moved by anybody
        else. It uses the room bulk holds back for interactive arrivals.
``w.``  an interactive reservation that had to wait (it took a bulk slot over or
        joined the end of the queue): the same reservation as ``i.``, stored under
        this prefix because it took bulk's place rather than the held room, so it
        leaves the hold to later arrivals. Callers know it by its ``i.`` id.
``s.``  a call from before the log was lost, seeded from the caller's ledger.
``x.``  an external phantom: usage of the key by somebody else, learnt from the
        provider's rate-limit headers. Phantoms also join the interactive history:
        bulk holds room back for other clients' rate as for interactive jobs.

Every script reads the clock with Redis ``TIME``. Slots are found so that no window
``(t - W, t]`` holding a slot that has not started yet exceeds rpm or tpm; the
pure-Python statements of the same computations are
:mod:`worker.throttle_reference`.
"""

from __future__ import annotations

#: Windows of interactive (and external) history behind a bulk request's hold: the
#: scripts and the Python reference (:func:`worker.throttle_reference.interactive_hold`)
#: both read this one.
HISTORY_WINDOWS = 5

#: Helpers shared by every script. Entries held in Lua tables are ``{score, tokens,
#: member}`` and sorted by score. ``fit_after`` scans at most ``rpm`` entries back:
#: the count limit alone forbids a longer window.
_LUA_COMMON = (
    f"local HISTORY_WINDOWS = {HISTORY_WINDOWS}\n"
    + """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n)
  return string.format('%d', n)
end

local function entry_tokens(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

local function kind(member)
  return string.sub(member, 1, 2)
end

-- The id an interactive reservation is stored under once it had to wait.
local function waited(id)
  return 'w.' .. string.sub(id, 3)
end

local function find(log, id, slot)
  local prefix = id .. ':'
  local alias = kind(id) == 'i.' and (waited(id) .. ':') or prefix
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', log, slot, slot)) do
    local head = string.sub(member, 1, #prefix)
    if head == prefix or head == alias then
      return member
    end
  end
  return nil
end

-- A member without its token count: the id it is stored under.
local function stored_id(member)
  return string.match(member, '^(.*):%d+$')
end

local function load(log, lo_excl, hi)
  local raw = redis.call('ZRANGEBYSCORE', log, '(' .. fmt(lo_excl), hi, 'WITHSCORES')
  local out = {}
  for i = 1, #raw, 2 do
    out[#out + 1] = {tonumber(raw[i + 1]), entry_tokens(raw[i]), raw[i]}
  end
  return out
end

local function prune(log, now, window)
  redis.call('ZREMRANGEBYSCORE', log, '-inf', fmt(now - window))
end

-- Interactive entries that found room and external phantoms use the room bulk holds
-- back; interactive entries that waited took bulk's place instead.
local function held(member)
  local k = kind(member)
  return k == 'i.' or k == 'x.'
end

-- Interactive entries of either kind, counted against the takeover cap.
local function interactive(member)
  local k = kind(member)
  return k == 'i.' or k == 'w.'
end

-- Earliest t >= floor and >= arr[n]'s score at which arr[1..n] plus one more entry
-- costing `cost` fit the window ending at t. A bulk entry also leaves `hold_r`
-- requests and `hold_t` tokens of that window to interactive traffic and other
-- clients of the key, less what the window's held entries already use (nil: no
-- hold). Looking further back only adds to the left-hand sides, so the first entry
-- that breaks a limit binds.
local function fit_after(arr, n, floor, window, rpm, tpm, cost, hold_r, hold_t)
  hold_r, hold_t = hold_r or 0, hold_t or 0
  if n > 0 and arr[n][1] > floor then
    floor = arr[n][1]
  end
  local count, tokens, icount, itokens = 0, cost, 0, 0
  for i = n, math.max(1, n - rpm + 1), -1 do
    count = count + 1
    tokens = tokens + arr[i][2]
    if arr[i][3] and held(arr[i][3]) then
      icount = icount + 1
      itokens = itokens + arr[i][2]
    end
    if count + 1 + math.max(0, hold_r - icount) > rpm
      or tokens + math.max(0, hold_t - itokens) > tpm then
      return math.max(floor, arr[i][1] + window)
    end
  end
  return floor
end

-- The slot at the end of the queue: after every logged entry.
local function next_slot(log, floor, window, rpm, tpm, cost, hold_r, hold_t)
  local raw = redis.call('ZREVRANGE', log, 0, rpm - 1, 'WITHSCORES')
  local arr = {}
  for i = #raw - 1, 1, -2 do
    arr[#arr + 1] = {tonumber(raw[i + 1]), entry_tokens(raw[i]), raw[i]}
  end
  return fit_after(arr, #arr, floor, window, rpm, tpm, cost, hold_r, hold_t)
end

-- What a bulk entry leaves of its window to interactive traffic and other clients of
-- the key: their rate seen over the last HISTORY_WINDOWS windows (per window, over
-- the span actually seen), a quarter more, plus one request and one request's tokens
-- for an arrival above the rate; at least `reserve` requests (and the same share of
-- tpm) at all times; never more than the interactive share (cap requests, the same
-- share of tpm).
local function interactive_hold(hist, now, window, rpm, tpm, cap, reserve)
  redis.call('ZREMRANGEBYSCORE', hist, '-inf', fmt(now - HISTORY_WINDOWS * window))
  local hold_r = math.min(cap, reserve)
  local hold_t = math.floor(tpm * hold_r / rpm)
  local raw = redis.call('ZRANGE', hist, 0, -1, 'WITHSCORES')
  if #raw == 0 or cap <= 0 then
    return hold_r, hold_t
  end
  local count, tokens, biggest, oldest = 0, 0, 0, now
  for i = 1, #raw, 2 do
    local t = entry_tokens(raw[i])
    count = count + 1
    tokens = tokens + t
    if t > biggest then biggest = t end
    oldest = math.min(oldest, tonumber(raw[i + 1]))
  end
  local windows = math.max(window, now - oldest) / window
  hold_r = math.max(hold_r, math.min(cap, math.ceil(1.25 * count / windows) + 1))
  hold_t = math.max(hold_t, math.min(math.floor(tpm * cap / rpm),
    math.ceil(1.25 * tokens / windows) + biggest))
  return hold_r, hold_t
end

-- Move booked (future) entries later, in order, where entries inserted in the past
-- (seeds, phantoms, a late start) leave them no room. A bulk entry keeps leaving the
-- interactive hold free, as when it was booked. An entry whose window holds nothing
-- that changed keeps its slot, and so does every entry after it.
local function reschedule(log, now, window, rpm, tpm, dirty_until, hold_r, hold_t)
  local arr = load(log, now - window, '+inf')
  for k = 1, #arr do
    local e = arr[k]
    if e[1] > now then
      if e[1] >= dirty_until then
        break
      end
      local hr, ht = 0, 0
      if kind(e[3]) == 'b.' then
        hr, ht = hold_r, hold_t
      end
      local slot = fit_after(arr, k - 1, e[1], window, rpm, tpm, e[2], hr, ht)
      if slot ~= e[1] then
        e[1] = slot
        redis.call('ZADD', log, fmt(slot), e[3])
        dirty_until = math.max(dirty_until, slot + window)
      end
    end
  end
end

-- Expire the log and the initialised marker together, after the newest entry's window.
local function touch(log, init, now, window)
  local last = now
  local top = redis.call('ZREVRANGE', log, 0, 0, 'WITHSCORES')
  if #top > 0 and tonumber(top[2]) > last then
    last = tonumber(top[2])
  end
  local ttl = fmt(last - now + window + 1000)
  redis.call('PEXPIRE', log, ttl)
  redis.call('SET', init, '1', 'PX', ttl)
end

-- The slot for an interactive request and the bulk member it takes over (or nil):
-- the floor itself if the request fits there without moving anybody; else the
-- earliest not-yet-started bulk reservation in [floor, floor + 2W) whose slot it may
-- take (the windows around it stay within tpm and hold at most `cap` interactive
-- entries); else the end of the queue.
local function interactive_place(log, cost, now, floor, window, rpm, tpm, cap)
  local arr = load(log, floor - window, fmt(floor + 3 * window))
  local n = #arr
  -- Requests, tokens and interactive entries in the window ending at each entry.
  local C, F, G = {}, {}, {}
  local lo, hi, cnt, tok, inter = 1, 0, 0, 0, 0
  for j = 1, n do
    local s = arr[j][1]
    while hi < n and arr[hi + 1][1] <= s do
      hi = hi + 1
      cnt = cnt + 1
      tok = tok + arr[hi][2]
      if interactive(arr[hi][3]) then inter = inter + 1 end
    end
    while arr[lo][1] <= s - window do
      cnt = cnt - 1
      tok = tok - arr[lo][2]
      if interactive(arr[lo][3]) then inter = inter - 1 end
      lo = lo + 1
    end
    C[j], F[j], G[j] = cnt, tok, inter
  end
  local fits = true
  local c0, t0 = 1, cost
  for j = 1, n do
    local s = arr[j][1]
    if s <= floor then
      c0 = c0 + 1
      t0 = t0 + arr[j][2]
    elseif s < floor + window and (C[j] + 1 > rpm or F[j] + cost > tpm) then
      fits = false
      break
    end
  end
  if fits and c0 <= rpm and t0 <= tpm then
    return floor, nil
  end
  if cap > 0 then
    for k = 1, n do
      local e = arr[k]
      local s = e[1]
      if s >= floor + 2 * window then
        break
      end
      if s > now and s >= floor and kind(e[3]) == 'b.' then
        local delta = cost - e[2]
        local ok = true
        local j = k
        while j <= n and arr[j][1] < s + window do
          if G[j] + 1 > cap or (delta > 0 and F[j] + delta > tpm) then
            ok = false
            break
          end
          j = j + 1
        end
        if ok then
          return s, e[3]
        end
      end
    end
  end
  return next_slot(log, floor, window, rpm, tpm, cost), nil
end
"""
)

#: Reserve a slot for a new request, or confirm (and if need be move) a held one.
#: KEYS[1] log, KEYS[2] pause marker, KEYS[3] initialised marker, KEYS[4] interactive
#: history (a sorted set of recent interactive and external members, scored by Redis
#: time ms).
#: ARGV[1] reservation id (``b.``/``i.`` prefix), ARGV[2] tokens, ARGV[3] window ms,
#: ARGV[4] rpm, ARGV[5] tpm, ARGV[6] interactive cap (takeovers per window),
#: ARGV[7] max wait ms (from now), ARGV[8] 1 to confirm a held reservation,
#: ARGV[9] init mode, ARGV[10] interactive reserve (requests of every window bulk
#: leaves free even before interactive traffic is seen), then (ARGV[11], ARGV[12]),
#: ... (age ms, tokens) seed pairs.
#:
#: Init mode applies when the initialised marker is missing: 0 = change nothing and
#: answer "unseeded"; 1 = assume the provider's window may be full and pause the bucket
#: for one window; 2 = log the seed pairs at now - age. Either way the marker is set.
#:
#: Confirming keeps a logged entry whose slot no pause covers: it is admitted if the
#: slot has come, or left to sleep again if an interactive takeover moved it later.
#: A lost entry, or one a pause now covers, is placed again as if new. An interactive
#: reservation placed at a later slot than now is stored under its ``w.`` alias.
#:
#: Returns {slot ms, now ms, status}: 1 = slot held, 0 = slot beyond max wait and
#: nothing held, 2 = unseeded (nothing changed).
ACQUIRE_LUA = (
    _LUA_COMMON
    + """
local log, pause_key, init, hist = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, cost = ARGV[1], tonumber(ARGV[2])
local window, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local cap, max_wait = tonumber(ARGV[6]), tonumber(ARGV[7])
local confirming, mode = ARGV[8] == '1', tonumber(ARGV[9])
local reserve = tonumber(ARGV[10])
local member = id .. ':' .. fmt(cost)
local now = now_ms()
prune(log, now, window)
-- Only bulk placements read the hold: an interactive request that finds room never does.
local hold_r, hold_t
local function hold()
  if hold_r == nil then
    hold_r, hold_t = interactive_hold(hist, now, window, rpm, tpm, cap, reserve)
  end
  return hold_r, hold_t
end

if redis.call('EXISTS', init) == 0 then
  if mode == 0 then
    return {0, now, 2}
  end
  if mode == 1 then
    local wanted = now + window
    if wanted > tonumber(redis.call('GET', pause_key) or 0) then
      redis.call('SET', pause_key, fmt(wanted), 'PX', fmt(window))
    end
  else
    local newest = nil
    for i = 11, #ARGV - 1, 2 do
      local age = math.max(0, tonumber(ARGV[i]))
      if age < window then
        local score = now - age
        redis.call('ZADD', log, fmt(score),
          's.' .. id .. '.' .. fmt((i - 9) / 2) .. ':' .. fmt(tonumber(ARGV[i + 1])))
        if newest == nil or score > newest then newest = score end
      end
    end
    if newest ~= nil then
      local hr, ht = hold()
      reschedule(log, now, window, rpm, tpm, newest + window, hr, ht)
    end
  end
  touch(log, init, now, window)
end

local pause_until = tonumber(redis.call('GET', pause_key) or 0)
local is_interactive = kind(id) == 'i.'
if confirming then
  local logged = member
  local score = redis.call('ZSCORE', log, logged)
  if not score and is_interactive then
    logged = waited(id) .. ':' .. fmt(cost)
    score = redis.call('ZSCORE', log, logged)
  end
  if score then
    score = tonumber(score)
    if not (pause_until > now and score < pause_until) then
      if score - now > max_wait then
        redis.call('ZREM', log, logged)
        return {score, now, 0}
      end
      return {score, now, 1}
    end
    redis.call('ZREM', log, logged)
  end
end

local floor = math.max(now, pause_until)
local slot, displaced
if is_interactive then
  slot, displaced = interactive_place(log, cost, now, floor, window, rpm, tpm, cap)
else
  slot = next_slot(log, floor, window, rpm, tpm, cost, hold())
end
if slot - now > max_wait then
  return {slot, now, 0}
end
local entry = member
if is_interactive and slot > now then
  entry = waited(id) .. ':' .. fmt(cost)
end
if displaced then
  redis.call('ZREM', log, displaced)
  redis.call('ZADD', log, fmt(slot), entry)
  local hr, ht = hold()
  local moved = next_slot(log, floor, window, rpm, tpm, entry_tokens(displaced), hr, ht)
  redis.call('ZADD', log, fmt(moved), displaced)
else
  redis.call('ZADD', log, fmt(slot), entry)
end
if is_interactive then
  redis.call('ZADD', hist, fmt(now), member)
  redis.call('PEXPIRE', hist, fmt(HISTORY_WINDOWS * window))
end
touch(log, init, now, window)
return {slot, now, 1}
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
redis.call('ZADD', KEYS[1], ARGV[2], stored_id(member) .. ':' .. ARGV[3])
return 1
"""
)

#: Move the entry of a request that starts late to the time it really starts (Redis
#: now), and booked entries after it later where it leaves them no room.
#: KEYS[1] log, KEYS[2] initialised marker, KEYS[3] interactive history.
#: ARGV[1] reservation id, ARGV[2] slot ms, ARGV[3] window ms, ARGV[4] rpm,
#: ARGV[5] tpm, ARGV[6] interactive cap, ARGV[7] interactive reserve (as for ACQUIRE:
#: moved bulk entries keep the interactive hold free).
#:
#: A slot says when a call may start; the provider counts it when it arrives. Work
#: between the two (the ledger row, a busy CPU) that outlasts the window margin would
#: let the call one window later arrive inside this one's provider window.
#: Returns {new slot ms, moved}: moved is 0 when the entry is gone or not late.
RESTAMP_LUA = (
    _LUA_COMMON
    + """
local log, init, hist = KEYS[1], KEYS[2], KEYS[3]
local window, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local cap, reserve = tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
local member = find(log, ARGV[1], ARGV[2])
if not member or now <= tonumber(ARGV[2]) then
  return {tonumber(ARGV[2]), 0}
end
redis.call('ZADD', log, fmt(now), member)
local hold_r, hold_t = interactive_hold(hist, now, window, rpm, tpm, cap, reserve)
reschedule(log, now, window, rpm, tpm, now + window, hold_r, hold_t)
touch(log, init, now, window)
return {now, 1}
"""
)

#: Turn the entry of a request the provider refused (429) into an external phantom at
#: the same slot. We never admit past the limit, so somebody else took that place in
#: the provider's window; the phantom keeps it taken until it leaves ours (freeing it
#: would hand the place out again, to be refused again). It also joins the
#: interactive history, so that bulk leaves room for the other client's rate.
#: KEYS[1] log, KEYS[2] interactive history. ARGV[1] reservation id, ARGV[2] slot ms,
#: ARGV[3] window ms. Returns 1 if turned, 0 if the entry is gone.
REFUSED_LUA = (
    _LUA_COMMON
    + """
local log, hist = KEYS[1], KEYS[2]
local member = find(log, ARGV[1], ARGV[2])
if not member then
  return 0
end
local phantom = 'x.' .. string.sub(member, 3)
redis.call('ZREM', log, member)
redis.call('ZADD', log, ARGV[2], phantom)
redis.call('ZADD', hist, fmt(now_ms()), phantom)
redis.call('PEXPIRE', hist, fmt(HISTORY_WINDOWS * tonumber(ARGV[3])))
return 1
"""
)

#: Remove the entry of a request that was never sent, wherever a takeover moved it
#: (under its ``w.`` alias if it is an interactive one that waited).
#: KEYS[1] log. ARGV[1] reservation id, ARGV[2] last known slot ms, ARGV[3] tokens
#: as reserved. Returns 1 if removed, 0 if it was not there.
RELEASE_LUA = (
    _LUA_COMMON
    + """
if redis.call('ZREM', KEYS[1], ARGV[1] .. ':' .. ARGV[3]) == 1 then
  return 1
end
if kind(ARGV[1]) == 'i.'
  and redis.call('ZREM', KEYS[1], waited(ARGV[1]) .. ':' .. ARGV[3]) == 1 then
  return 1
end
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
  redis.call('SET', KEYS[1], fmt(wanted), 'PX', fmt(wanted - now))
  return wanted
end
return current
"""
)

#: Requests and tokens logged in the window ending now (later slots not counted),
#: and the part of them that is external phantoms.
#: KEYS[1] log. ARGV[1] window ms.
#: Returns {requests, tokens, external requests, external tokens}.
USAGE_LUA = (
    _LUA_COMMON
    + """
local now = now_ms()
local members = redis.call('ZRANGEBYSCORE', KEYS[1],
  '(' .. fmt(now - tonumber(ARGV[1])), fmt(now))
local tokens, ext_requests, ext_tokens = 0, 0, 0
for _, member in ipairs(members) do
  local t = entry_tokens(member)
  tokens = tokens + t
  if kind(member) == 'x.' then
    ext_requests = ext_requests + 1
    ext_tokens = ext_tokens + t
  end
end
return {#members, tokens, ext_requests, ext_tokens}
"""
)

#: Top the window up with external phantoms to the usage the provider reports.
#: KEYS[1] log, KEYS[2] initialised marker, KEYS[3] interactive history.
#: ARGV[1] window ms, ARGV[2] rpm, ARGV[3] tpm, ARGV[4] remaining requests,
#: ARGV[5] remaining tokens, ARGV[6] requests reset ms, ARGV[7] tokens reset ms
#: (each -1 when unknown), ARGV[8] slack requests, ARGV[9] slack tokens,
#: ARGV[10] phantom id, ARGV[11] interactive cap, ARGV[12] interactive reserve.
#:
#: The window ending now (our entries, seeds and phantoms already added) is compared
#: with ``limit - remaining - slack``; only the shortfall is added, so repeating an
#: observation adds nothing. Request phantoms carry no tokens; a token shortfall goes
#: on one phantom that also counts one request. A phantom sits at
#: ``now - W + reset`` so that it leaves the window when the provider's does (a full
#: window when the reset is unknown). Booked entries that no longer fit move later.
#: Nothing happens on a bucket not initialised yet: its seed will count our own calls.
#: Returns {requests added, tokens added}.
OBSERVE_LUA = (
    _LUA_COMMON
    + """
local log, init, hist = KEYS[1], KEYS[2], KEYS[3]
local window, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, reserve = tonumber(ARGV[11]), tonumber(ARGV[12])
local rem_r, rem_t = tonumber(ARGV[4]), tonumber(ARGV[5])
local reset_r, reset_t = tonumber(ARGV[6]), tonumber(ARGV[7])
local slack_r, slack_t, pid = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10]
local now = now_ms()
if redis.call('EXISTS', init) == 0 then
  return {0, 0}
end
prune(log, now, window)
local inside = redis.call('ZRANGEBYSCORE', log, '(' .. fmt(now - window), fmt(now))
local have_t = 0
for _, member in ipairs(inside) do
  have_t = have_t + entry_tokens(member)
end
local need_r, need_t = 0, 0
if rem_r >= 0 and reset_r ~= 0 then
  need_r = rpm - rem_r - slack_r - #inside
end
if rem_t >= 0 and reset_t ~= 0 then
  need_t = tpm - rem_t - slack_t - have_t
end
local function expiry_score(reset)
  if reset < 0 or reset > window then
    reset = window
  end
  return now - window + reset
end
local added_r, added_t, newest, added = 0, 0, nil, {}
if need_t > 0 then
  newest = expiry_score(reset_t)
  added[1] = 'x.' .. pid .. '.t:' .. fmt(need_t)
  redis.call('ZADD', log, fmt(newest), added[1])
  added_r, added_t = 1, need_t
end
if need_r > added_r then
  local score = expiry_score(reset_r)
  for i = added_r + 1, need_r do
    added[#added + 1] = 'x.' .. pid .. '.' .. fmt(i) .. ':0'
    redis.call('ZADD', log, fmt(score), added[#added])
  end
  added_r = need_r
  if newest == nil or score > newest then newest = score end
end
if newest == nil then
  return {0, 0}
end
-- The other client's rate joins the interactive one in the room bulk holds back,
-- so that its next calls find room instead of displacing ours.
for _, member in ipairs(added) do
  redis.call('ZADD', hist, fmt(now), member)
end
redis.call('PEXPIRE', hist, fmt(HISTORY_WINDOWS * window))
local hold_r, hold_t = interactive_hold(hist, now, window, rpm, tpm, cap, reserve)
reschedule(log, now, window, rpm, tpm, newest + window, hold_r, hold_t)
touch(log, init, now, window)
return {added_r, added_t}
"""
)
