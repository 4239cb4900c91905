"""Redis storage for the global throttle: a thin typed wrapper around its Lua scripts.

The scripts and the key layout are described in :mod:`worker.throttle_lua`. Every
decision is a single script call that reads the clock with Redis ``TIME``, so
workers on different machines never compare their own clocks.

This module knows nothing about waiting, errors or cost policy; :mod:`worker.throttle`
does. Redis errors propagate unchanged.
"""

from __future__ import annotations

import enum
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from jobs.constants import (
    throttle_init_key,
    throttle_interactive_key,
    throttle_log_key,
    throttle_pause_key,
)
from worker.throttle_lua import (
    ACQUIRE_LUA,
    OBSERVE_LUA,
    PAUSE_LUA,
    REFUSED_LUA,
    RELEASE_LUA,
    RESTAMP_LUA,
    SETTLE_LUA,
    USAGE_LUA,
)


class InitMode(enum.IntEnum):
    """What a placing script does when the bucket's initialised marker is missing."""

    #: Change nothing and answer :attr:`SlotStatus.UNSEEDED`.
    CHECK = 0
    #: Assume the provider's window may be full: pause the bucket for one window.
    ASSUME_FULL = 1
    #: Log the given history (age ms, tokens) before placing.
    SEED = 2


class SlotStatus(enum.IntEnum):
    """The outcome of a placing script."""

    #: The slot lay beyond the caller's max wait; nothing is held.
    TOO_FAR = 0
    #: The slot is held (admitted once it has come).
    HELD = 1
    #: The bucket needs seeding first; nothing changed.
    UNSEEDED = 2


@dataclass(frozen=True)
class _Scripts:
    acquire: Script
    settle: Script
    restamp: Script
    refused: Script
    release: Script
    pause: Script
    usage: Script
    observe: Script


_registered: weakref.WeakKeyDictionary[redis.Redis, _Scripts] = weakref.WeakKeyDictionary()
_registered_lock = threading.Lock()


def _scripts_for(client: redis.Redis) -> _Scripts:
    """Register the scripts once per client; the client reloads them after a flush."""
    with _registered_lock:
        scripts = _registered.get(client)
        if scripts is None:
            scripts = _Scripts(
                acquire=client.register_script(ACQUIRE_LUA),
                settle=client.register_script(SETTLE_LUA),
                restamp=client.register_script(RESTAMP_LUA),
                refused=client.register_script(REFUSED_LUA),
                release=client.register_script(RELEASE_LUA),
                pause=client.register_script(PAUSE_LUA),
                usage=client.register_script(USAGE_LUA),
                observe=client.register_script(OBSERVE_LUA),
            )
            _registered[client] = scripts
        return scripts


@dataclass(frozen=True)
class SlotDecision:
    """What a placing script decided: the slot, Redis time then, and the outcome."""

    slot_ms: int
    now_ms: int
    status: SlotStatus

    @property
    def admitted(self) -> bool:
        """True when the slot is held."""
        return self.status is SlotStatus.HELD


@dataclass(frozen=True)
class LogUsage:
    """Entries logged in the window ending now, and the external phantoms among them."""

    requests: int
    tokens: int
    external_requests: int
    external_tokens: int


def _decision(raw: Any) -> SlotDecision:
    slot, now, status = raw
    return SlotDecision(slot_ms=int(slot), now_ms=int(now), status=SlotStatus(int(status)))


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else value


class ThrottleStore:
    """One bucket's admissions log, pause marker and initialised marker in Redis.

    Limits travel with every call rather than living in Redis, so every client of a
    bucket must pass the same ``rpm``, ``tpm``, window and interactive cap.
    """

    def __init__(self, client: redis.Redis, bucket: str, *, window_ms: int) -> None:
        self._client = client
        self._scripts = _scripts_for(client)
        self._log = throttle_log_key(bucket)
        self._pause = throttle_pause_key(bucket)
        self._init = throttle_init_key(bucket)
        self._interactive = throttle_interactive_key(bucket)
        self.window_ms = window_ms
        self._round_trips = 0
        self._count_lock = threading.Lock()

    @property
    def round_trips(self) -> int:
        """Commands this instance has sent to Redis: one per script call or PTTL.

        redis-py loads a script again after a ``NOSCRIPT`` answer (a flushed or
        restarted Redis); those extra commands are not counted.
        """
        return self._round_trips

    def _sent(self) -> None:
        with self._count_lock:
            self._round_trips += 1

    def place(
        self,
        rid: str,
        tokens: int,
        *,
        rpm: int,
        tpm: int,
        max_wait_ms: int,
        interactive_cap: int = 0,
        interactive_reserve: int = 0,
        confirm: bool = False,
        init: InitMode = InitMode.CHECK,
        history: Sequence[tuple[int, int]] = (),
    ) -> SlotDecision:
        """Reserve a slot for ``rid`` (or confirm the one it holds) in one script call.

        ``rid`` starts with ``i.`` for an interactive request and ``b.`` for a bulk one;
        ``history`` holds ``(age ms, tokens)`` pairs, used only with :attr:`InitMode.SEED`.
        """
        args: list[int | str] = [
            rid,
            tokens,
            self.window_ms,
            rpm,
            tpm,
            interactive_cap,
            max_wait_ms,
            1 if confirm else 0,
            int(init),
            interactive_reserve,
        ]
        if init is InitMode.SEED:
            for age_ms, entry_tokens in history:
                args.extend((age_ms, entry_tokens))
        self._sent()
        raw = self._scripts.acquire(
            keys=[self._log, self._pause, self._init, self._interactive], args=args
        )
        return _decision(raw)

    def reserve(
        self,
        rid: str,
        tokens: int,
        *,
        rpm: int,
        tpm: int,
        max_wait_ms: int,
        interactive_cap: int = 0,
        interactive_reserve: int = 0,
        init: InitMode = InitMode.CHECK,
        history: Sequence[tuple[int, int]] = (),
    ) -> SlotDecision:
        """Log a new entry at the earliest admissible slot, unless it is too far away."""
        return self.place(
            rid,
            tokens,
            rpm=rpm,
            tpm=tpm,
            max_wait_ms=max_wait_ms,
            interactive_cap=interactive_cap,
            interactive_reserve=interactive_reserve,
            init=init,
            history=history,
        )

    def settle(self, rid: str, slot_ms: int, tokens: int) -> bool:
        """Set the entry's token count; False if it already left the log."""
        self._sent()
        return bool(self._scripts.settle(keys=[self._log], args=[rid, slot_ms, tokens]))

    def restamp(
        self,
        rid: str,
        slot_ms: int,
        *,
        rpm: int,
        tpm: int,
        interactive_cap: int = 0,
        interactive_reserve: int = 0,
    ) -> tuple[int, bool]:
        """Move a late entry to Redis now; returns its slot and whether it moved."""
        self._sent()
        raw = self._scripts.restamp(
            keys=[self._log, self._init, self._interactive],
            args=[rid, slot_ms, self.window_ms, rpm, tpm, interactive_cap, interactive_reserve],
        )
        return int(raw[0]), bool(int(raw[1]))

    def refused(self, rid: str, slot_ms: int) -> bool:
        """Turn a refused request's entry into an external phantom; False if gone."""
        self._sent()
        return bool(
            self._scripts.refused(
                keys=[self._log, self._interactive], args=[rid, slot_ms, self.window_ms]
            )
        )

    def release(self, rid: str, slot_ms: int, tokens: int) -> bool:
        """Remove the entry (reserved with ``tokens``); False if it was not logged."""
        self._sent()
        return bool(self._scripts.release(keys=[self._log], args=[rid, slot_ms, tokens]))

    def pause(self, pause_ms: int) -> int:
        """Extend the pause to at least now + ``pause_ms``; returns its end (ms)."""
        self._sent()
        return int(self._scripts.pause(keys=[self._pause], args=[pause_ms]))

    def pause_remaining_ms(self) -> int:
        """Milliseconds of pause left, by the marker's server-side expiry."""
        self._sent()
        remaining = int(self._client.pttl(self._pause))
        return max(remaining, 0)

    def usage(self) -> LogUsage:
        """Entries logged in the window ending now."""
        self._sent()
        raw = self._scripts.usage(keys=[self._log], args=[self.window_ms])
        requests, tokens, ext_requests, ext_tokens = (int(v) for v in raw)
        return LogUsage(requests, tokens, ext_requests, ext_tokens)

    def observe(
        self,
        pid: str,
        *,
        rpm: int,
        tpm: int,
        remaining_requests: int | None,
        remaining_tokens: int | None,
        reset_requests_ms: int | None,
        reset_tokens_ms: int | None,
        slack_requests: int,
        slack_tokens: int,
        interactive_cap: int = 0,
        interactive_reserve: int = 0,
    ) -> tuple[int, int]:
        """Add external phantoms up to the provider's reported usage; returns what was added."""
        self._sent()
        raw = self._scripts.observe(
            keys=[self._log, self._init, self._interactive],
            args=[
                self.window_ms,
                rpm,
                tpm,
                _or_minus_one(remaining_requests),
                _or_minus_one(remaining_tokens),
                _or_minus_one(reset_requests_ms),
                _or_minus_one(reset_tokens_ms),
                slack_requests,
                slack_tokens,
                pid,
                interactive_cap,
                interactive_reserve,
            ],
        )
        requests, tokens = raw
        return int(requests), int(tokens)
