"""The attachments serving one model, as a worker calls them.

Each attachment of :mod:`jobs.attachments` becomes an :class:`Endpoint`: its HTTP
client, its key circuit and its throttle bucket. The :class:`Pool` of a model is its
endpoints, one per bucket (two aliases with one key are one endpoint, the first alias
named), and a job takes a slot there:

1. Every endpoint not set aside is asked in turn, by one thread per priority and
   process at a time (:func:`worker.throttle.acquire_first`); the first that admits
   gives the slot, which names its endpoint.
2. Before calling, the slot's endpoint is checked against its key circuit
   (:meth:`Pool.gate`). An open circuit whose probe is due makes the job its probe;
   one not due is set aside in this process until it is, so that no job takes a turn
   of its bucket meanwhile and the others go on. A 401 opens the circuit and sets the
   endpoint aside the same way (:meth:`Pool.reject`).
3. With every endpoint set aside the job is handed back (:meth:`Pool.paused_reason`
   says why), unless it is the probe a dispatcher picked (:meth:`Pool.probe_of`).
4. With one attachment this is today's single bucket: one endpoint, nothing to choose.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobs.circuit import Gate, KeyCircuit
from worker.client import ModelClient
from worker.slot import Slot
from worker.throttle import Throttle, Turnstiles, acquire_first


@dataclass(frozen=True)
class Endpoint:
    """One attachment as a worker calls it; ``key_hash`` names its key, never the key."""

    alias: str
    key_hash: str
    model: str
    client: ModelClient
    circuit: KeyCircuit
    throttle: Throttle


class Pool:
    """The endpoints serving one model; thread-safe, one per model and process."""

    def __init__(self, model: str, endpoints: Sequence[Endpoint]) -> None:
        if not endpoints:
            raise ValueError(f"no attachment serves {model}")
        self.model = model
        self.endpoints = tuple(endpoints)
        self._by_bucket = {e.throttle.bucket: e for e in self.endpoints}
        self._turnstiles = Turnstiles()
        self._aside: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def single(
        cls, model: str, client: ModelClient, throttle: Throttle, circuit: KeyCircuit
    ) -> Pool:
        """A pool of one endpoint: the one attachment of a deployment without a pool."""
        endpoint = Endpoint(circuit.alias, circuit.fingerprint, model, client, circuit, throttle)
        return cls(model, [endpoint])

    def open_endpoints(self) -> list[Endpoint]:
        """The endpoints not set aside, in the pool's order."""
        now = time.monotonic()
        with self._lock:
            for bucket in [b for b, until in self._aside.items() if until <= now]:
                del self._aside[bucket]
            return [e for e in self.endpoints if e.throttle.bucket not in self._aside]

    def set_aside(self, endpoint: Endpoint, seconds: float) -> None:
        """Ask ``endpoint`` nothing in this process for ``seconds`` (its circuit is open)."""
        with self._lock:
            self._aside[endpoint.throttle.bucket] = time.monotonic() + max(0.0, seconds)

    def endpoint(self, slot: Slot) -> Endpoint:
        """The endpoint whose bucket granted ``slot``."""
        return self._by_bucket[slot.throttle.bucket]

    def take(
        self,
        price: Callable[[], int],
        *,
        priority: int,
        max_wait: float,
        stop: threading.Event,
        only: Endpoint | None = None,
    ) -> Slot:
        """A slot in the first open endpoint's bucket with room for ``price()`` tokens;
        ``only``: in that endpoint's, set aside or not (a probe's).

        Raises what :func:`worker.throttle.acquire_first` raises: :class:`NoBucket`
        when every endpoint is set aside, or becomes so while the call waits.
        """

        def buckets() -> list[Throttle]:
            if only is not None:
                return [only.throttle]
            return [e.throttle for e in self.open_endpoints()]

        throttle, admission = acquire_first(
            buckets,
            price,
            turnstiles=self._turnstiles,
            max_wait=max_wait,
            stop=stop,
            priority=priority,
        )
        return Slot(throttle, admission)

    def gate(self, endpoint: Endpoint, job_id: int, probe_lease_s: float) -> Gate:
        """Whether ``job_id`` may call through ``endpoint``: ``closed``, or ``probe`` (it
        is the call that tries a rejected key again, holding that for ``probe_lease_s``);
        ``open``: not now, and the endpoint is set aside until its probe is due."""
        circuit = endpoint.circuit
        gate = circuit.gate(job_id)
        if gate != "open":
            return gate
        claimed = circuit.claim_probe(job_id, probe_lease_s)
        if claimed > 0:
            return "probe"
        if claimed == 0:
            return "closed"
        self.set_aside(endpoint, circuit.due_in())
        return "open"

    def reject(self, endpoint: Endpoint, reason: str, status: int, job_id: int) -> float:
        """The provider rejected ``endpoint``'s key: open its circuit and set it aside
        until the next probe is due; returns the seconds until then."""
        wait_s = endpoint.circuit.open(reason, status, job_id)
        self.set_aside(endpoint, wait_s)
        return wait_s

    def probe_of(self, job_id: int) -> Endpoint | None:
        """The endpoint whose circuit has ``job_id`` as its probe, if any."""
        return next((e for e in self.endpoints if e.circuit.gate(job_id) == "probe"), None)

    def paused_reason(self) -> str:
        """Why no endpoint takes calls: each rejected key, with its next try."""
        states = [e.circuit.state() for e in self.endpoints]
        found = "; ".join(s.describe() for s in states if s is not None)
        return found or "calls paused: the provider rejected the key"
