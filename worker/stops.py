"""What wakes a job that waits: the worker shutting down, or its batch being stopped.

A job waits for its throttle slot or between retries, for up to a window or more.
Each wait watches an event of its own (:meth:`Stops.watch`), set when:

* the worker shuts down (:meth:`Stops.stop_all`): the job goes back to the queue;
* its batch is cancelled or expires (:meth:`Stops.stop_batches`, from the dispatcher's
  sweep): the job has not sent its request, so it ends cancelled and its slot is
  released, without a call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class Stops:
    """The events of every waiting job of this process, by batch; thread-safe."""

    def __init__(self, shutdown: threading.Event) -> None:
        self.shutdown = shutdown
        self._lock = threading.Lock()
        self._watched: dict[threading.Event, int | None] = {}

    def watch(self, batch_id: int | None) -> threading.Event:
        """A new event for a job of ``batch_id``; :meth:`forget` it when the job is done."""
        event = threading.Event()
        with self._lock:
            self._watched[event] = batch_id
        if self.shutdown.is_set():
            event.set()
        return event

    def forget(self, event: threading.Event) -> None:
        with self._lock:
            self._watched.pop(event, None)

    def stop_batches(self, batch_ids: Iterable[int]) -> int:
        """Wake every job of these batches; returns how many were waiting."""
        wanted = set(batch_ids)
        with self._lock:
            hit = [event for event, batch in self._watched.items() if batch in wanted]
        for event in hit:
            event.set()
        return len(hit)

    def stop_all(self) -> None:
        """The worker shuts down: wake every job."""
        self.shutdown.set()
        with self._lock:
            events = list(self._watched)
        for event in events:
            event.set()
