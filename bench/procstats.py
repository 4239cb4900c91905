"""CPU time and memory of process trees (psutil, which the embedded servers already need)."""

from __future__ import annotations

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
