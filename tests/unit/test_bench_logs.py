"""The benchmark reads what the workers logged: errors and the throttle's Redis commands."""

from __future__ import annotations

from pathlib import Path

from bench.rows import Row
from bench.runner import scan_worker_logs


def _stats(pid: int, admitted: int, trips: int) -> str:
    return (
        f"event=throttle_stats pid={pid} model=kimi-k2-5 admitted={admitted} "
        f"redis_round_trips={trips} per_admitted={trips / admitted:.2f}"
    )


def test_commands_per_admitted_call_add_up_every_process(tmp_path: Path) -> None:
    # Worker 0 was restarted (a new pid in the same file); only each pid's last line counts.
    (tmp_path / "row-worker0.log").write_text(
        "\n".join(
            [
                _stats(11, 10, 20),
                "event=succeeded job=1 batch=1 status=succeeded",
                _stats(11, 40, 90),
                _stats(12, 5, 15),
            ]
        )
        + "\n"
    )
    (tmp_path / "row-worker1.log").write_text(_stats(11, 55, 120) + "\n")
    row = Row("row", "title")
    scan_worker_logs(row, tmp_path, "row")
    assert row.metrics["throttle_admitted"] == 40 + 5 + 55
    assert row.metrics["throttle_redis_commands"] == 90 + 15 + 120
    assert row.metrics["throttle_redis_commands_per_admitted"] == 2.25
    assert row.metrics["worker_log_tracebacks"] == 0


def test_no_throttle_lines_add_no_figure(tmp_path: Path) -> None:
    (tmp_path / "row-worker0.log").write_text(
        "Traceback (most recent call last):\n  boom\nValueError: x\n"
    )
    row = Row("row", "title")
    scan_worker_logs(row, tmp_path, "row")
    assert "throttle_redis_commands_per_admitted" not in row.metrics
    assert row.metrics["worker_log_tracebacks"] == 1
