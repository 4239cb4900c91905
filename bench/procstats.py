"""CPU time and memory of process trees (psutil, which the embedded servers already need)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import psutil  # type: ignore[import-untyped]


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    try:
        children = list(root.children(recursive=True))
    except psutil.Error:
        children = []
    return [root, *children]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds of each process tree, summed (vanished ones count 0)."""
    total = 0.0
    for pid in pids:
        for proc in _tree(pid):
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += float(times.user) + float(times.system)
    return total


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of each process tree, summed."""
    total = 0
    for pid in pids:
        for proc in _tree(pid):
            try:
                total += int(proc.memory_info().rss)
            except psutil.Error:
                continue
    return total


class PeakSampler:
    """Samples, once a second in a thread, the largest resident memory of any one of the
    process trees (a worker process stands for a dyno) and the most calls in flight that
    ``in_flight`` reported."""

    def __init__(self, pids: list[int], in_flight: Callable[[], int], every_s: float = 1.0):
        self.pids = pids
        self._in_flight = in_flight
        self._every = every_s
        self.peak_rss = 0
        self.peak_in_flight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.peak_rss = max([self.peak_rss, *(rss_bytes([pid]) for pid in self.pids)])
            with contextlib.suppress(Exception):
                self.peak_in_flight = max(self.peak_in_flight, self._in_flight())
