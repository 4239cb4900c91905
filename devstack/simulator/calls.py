"""The simulator's books: one record per chat call it answered and the stats kept with them.

:class:`CallLog` holds the :class:`SimulatorStats` counters and the :class:`SimCall` records
side by side and updates both in one :meth:`CallLog.add` (when a call's outcome is decided)
or :meth:`CallLog.settle` (once its answer was written, or found to have nobody to read it),
so every counter is a function of the records: ``ok`` counts the records with outcome
``"ok"``, ``prompt_tokens`` sums their ``prompt_tokens``, ``duplicate_bodies`` counts the
``body_hash`` values seen on two or more of them, ``delivered`` and ``cut`` count the records
whose ``delivered`` is ``True`` and ``False``, and so on. It is not thread-safe by itself;
:class:`~devstack.simulator.Simulator` calls it under the same lock that covers admission into
its rate window.

Only the newest ``limit`` records are kept (``SimulatorConfig.call_log_limit``); the
counters still count every call, so ``stats.calls - len(records)`` is how many were dropped.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, NamedTuple

#: How a call ended; each outcome has its counter in :class:`SimulatorStats`.
Outcome = Literal["ok", "rate_limited", "client_error", "server_error", "hang", "malformed"]

_COUNTER: dict[str, str] = {
    "ok": "ok",
    "rate_limited": "rate_limited",
    "client_error": "client_errors",
    "server_error": "server_errors",
    "hang": "hangs",
    "malformed": "malformed",
}
#: Longest ``marker`` kept; a longer ``user`` field is cut to this many characters.
MARKER_CHARS = 256


@dataclass(frozen=True)
class SimulatorStats:
    """What the simulated provider saw and charged since start or the last reset."""

    calls: int = 0
    ok: int = 0
    rate_limited: int = 0
    client_errors: int = 0
    server_errors: int = 0
    hangs: int = 0
    malformed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    max_requests_in_window: int = 0
    max_tokens_in_window: int = 0
    duplicate_bodies: int = 0
    #: Answers written to a client still connected when they were ready.
    delivered: int = 0
    #: Calls whose client was gone (closed or reset its connection) when the answer was
    #: ready, or whose answer could not be written: nobody read them. ``calls - delivered -
    #: cut`` is how many answers are still being prepared (latency, hangs).
    cut: int = 0

    def as_dict(self) -> dict[str, int]:
        """The stats as a plain JSON-ready dict."""
        return dataclasses.asdict(self)


class CallIds(NamedTuple):
    """The simulator's id of a call, the caller's own if it sent one, and when it came."""

    request_id: str
    client_request_id: str | None
    #: ``time.monotonic()`` when the whole request had been read.
    arrived_at: float


@dataclass(frozen=True, slots=True)
class SimCall:
    """One chat call as the simulator answered it.

    ``status`` is the status it decided to answer (a hang's 504 included); the record is
    written when that is decided, before the simulated latency or hang, and ``delivered``
    says later whether the answer reached its client. ``outcome`` and the charge do not
    depend on it: a strict provider counts a call in its window when it admits it, so an
    ``"ok"`` call whose client went away mid-call was admitted and charged all the same.
    """

    #: The ``x-request-id`` header sent with the answer (``req-sim-N``).
    request_id: str
    #: The caller's ``X-Client-Request-Id`` header, if it sent one (the worker's call id).
    client_request_id: str | None
    status: int
    outcome: Outcome
    #: Whether the call entered the rate window (only ``"ok"`` calls do).
    admitted: bool
    #: Tokens charged to the window at admission (per ``SimulatorConfig.charge``), else 0.
    charged: int
    #: The returned ``usage`` figures; 0 when the answer carried no usage.
    prompt_tokens: int
    completion_tokens: int
    #: Hex SHA-256 of the canonical body, the identity behind ``duplicate_bodies``; ``None``
    #: when the body was never validated (refused key, bad body, forced status).
    body_hash: str | None
    #: The request's ``user`` field when it is a string (first :data:`MARKER_CHARS`
    #: characters): the worker passes it through, so a test can tag its jobs with it.
    marker: str | None
    #: ``time.monotonic()`` when the whole request had been read, whatever its outcome:
    #: when the call reached the provider (refused ones too).
    arrived_at: float
    #: ``time.monotonic()`` at admission (the rate window's own timestamp), else ``None``.
    admitted_at: float | None
    #: ``None`` until the answer is ready; then ``True`` once it was written to a client
    #: still connected, ``False`` when the client had closed or reset its connection (a
    #: killed process, a client-side timeout, :meth:`~devstack.simulator.Simulator.stop`) or
    #: the write failed. A client that already sent its next request is still connected.
    delivered: bool | None = None
    #: ``time.monotonic()`` when ``delivered`` was decided: the answer written, or found
    #: to have nobody to read it. ``None`` until then.
    settled_at: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The record as a plain JSON-ready dict."""
        return {name: getattr(self, name) for name in _CALL_FIELDS}


_CALL_FIELDS = tuple(f.name for f in dataclasses.fields(SimCall))
_STAT_FIELDS = tuple(f.name for f in dataclasses.fields(SimulatorStats))


class CallLog:
    """Counters and the newest ``limit`` call records, always updated together."""

    def __init__(self, limit: int) -> None:
        self._values = dict.fromkeys(_STAT_FIELDS, 0)
        self._ok_bodies: dict[str, int] = {}
        self._limit = limit
        # Keyed by request id, so that settle can update a record in place (in order).
        self._records: OrderedDict[str, SimCall] = OrderedDict()
        # Request ids added and not settled yet, kept or not: the counters count them all.
        self._unsettled: set[str] = set()

    def add(self, call: SimCall) -> None:
        """Count ``call`` and keep its record (dropping the oldest one when full).

        ``call.delivered`` and ``call.settled_at`` must be ``None``: :meth:`settle` sets them.
        """
        values = self._values
        values["calls"] += 1
        values[_COUNTER[call.outcome]] += 1
        if call.outcome == "ok":
            values["prompt_tokens"] += call.prompt_tokens
            values["completion_tokens"] += call.completion_tokens
            values["total_tokens"] += call.prompt_tokens + call.completion_tokens
            if call.body_hash is not None:
                seen = self._ok_bodies.get(call.body_hash, 0) + 1
                self._ok_bodies[call.body_hash] = seen
                if seen == 2:
                    values["duplicate_bodies"] += 1
        self._unsettled.add(call.request_id)
        if self._limit > 0:
            self._records[call.request_id] = call
            if len(self._records) > self._limit:
                self._records.popitem(last=False)

    def settle(self, request_id: str, delivered: bool, at: float) -> None:
        """Record whether the answer to ``request_id`` reached a client still connected.

        ``at`` is when that was decided (``time.monotonic()``).

        A request id this log did not add (the call began before a reset) or already
        settled is ignored.
        """
        try:
            self._unsettled.remove(request_id)
        except KeyError:
            return
        self._values["delivered" if delivered else "cut"] += 1
        call = self._records.get(request_id)
        if call is not None:
            self._records[request_id] = dataclasses.replace(
                call, delivered=delivered, settled_at=at
            )

    def counters(self) -> dict[str, int]:
        """A copy of the counters (the most-in-any-window figures are left at 0)."""
        return dict(self._values)

    def records(self) -> list[SimCall]:
        """A copy of the kept records, oldest first."""
        return list(self._records.values())
