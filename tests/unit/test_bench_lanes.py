"""The benchmark runs rows side by side in child processes and reads their rows back."""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import pytest

from bench import lanes
from bench.rows import Row
from bench.runner import SCENARIOS, select


def _row(name: str) -> Row:
    row = Row(name, f"title of {name}", description="d")
    row.metrics.update(requests=3, limits="150 RPM", elapsed_s=1.5, missing=None)
    row.target("every job succeeded", True, "3 of 3")
    row.target("no 429", False, "2 answered 429")
    row.notes.append("a note")
    row.seconds = 12.5
    return row


def test_a_row_survives_the_trip_through_json() -> None:
    row = _row("rpm-w1")
    back = Row.from_dict(json.loads(json.dumps(row.as_dict())))
    assert back == row
    assert [t.label for t in back.missed] == ["no 429"]


def test_every_paced_scenario_runs_with_one_and_three_workers() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    for base in ("rpm", "rpm10x", "tpm-reserve", "tpm-actual", "restart", "shared-key"):
        assert {f"{base}-w1", f"{base}-w3"} <= set(names)
    assert {"priority-w1", "priority-w3", "priority-reserve-w1"} <= set(names)
    for base in ("neighbour", "priority-first"):
        assert {f"{base}-w1", f"{base}-w3"} <= set(names)
    # Rows about the provider or the load, not the processes: one worker process each.
    for charge in ("reserve", "actual"):
        assert {f"tpm-{charge}-c3-w1", f"tpm-{charge}-cjk-w1"} <= set(names)
    assert {"long-docs-w1", "long-calls-w1", "neighbour-noheaders-w1"} <= set(names)
    solo = {s.name for s in SCENARIOS if s.solo}
    assert {"rpm10x-w1", "overhead-throughput-w3", "overhead-submit"} <= solo
    assert "rpm-w3" not in solo
    assert [s.name for s in select(["priority-w"], quick=False)] == ["priority-w1", "priority-w3"]


def _fake_child(script: str, starts: dict[str, float]) -> object:
    """A ``child_argv`` running ``script`` instead, noting when each lane was started."""

    def argv(name: str, redis_db: int, out: Path, logs: Path, quick: bool) -> list[str]:
        starts[name] = time.monotonic()
        return [sys.executable, "-c", script, name, str(out), str(redis_db)]

    return argv


WRITES_ROW = """
import json, sys, time
name, out, db = sys.argv[1], sys.argv[2], int(sys.argv[3])
time.sleep(0.6)
if name == "dies":
    sys.exit(3)
row = {"name": name, "title": "t", "description": "", "metrics": {"db": db},
       "targets": [], "notes": [], "error": None, "seconds": 0.6}
open(out, "w").write(json.dumps(row))
"""


def test_lanes_share_databases_stagger_starts_and_report_their_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts: dict[str, float] = {}
    monkeypatch.setattr(lanes, "child_argv", _fake_child(WRITES_ROW, starts))
    monkeypatch.setattr(lanes, "WINDOW_S", 0.4)  # two lanes start 0.2 s apart
    monkeypatch.setattr(lanes, "POLL_S", 0.05)
    got: list[Row] = []
    lanes.run_side_by_side(
        [("a", "A"), ("b", "B"), ("dies", "D"), ("c", "C")],
        redis_dbs=[5, 6],
        logs=tmp_path,
        quick=False,
        on_row=got.append,
    )
    rows = {row.name: row for row in got}
    assert set(rows) == {"a", "b", "dies", "c"}
    order = sorted(starts, key=starts.__getitem__)
    assert order[:2] == ["a", "b"]
    assert all(
        later - earlier >= 0.2 for earlier, later in itertools.pairwise(sorted(starts.values()))
    )
    # Two lanes: "a" and "b" overlap, and each later row reuses a freed database.
    assert {rows[n].metrics["db"] for n in ("a", "b", "c")} <= {5, 6}
    assert rows["a"].metrics["ran_alongside"] == "b"
    assert "a" in str(rows["b"].metrics["ran_alongside"])
    dead = rows["dies"]
    assert dead.error is not None and "status 3" in dead.error
    assert dead.title == "D"
