"""Two beat processes at once, and the active one killed and restarted: each run fires once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import pytest

from devstack.simulator import Simulator
from jobs.connections import redis_client
from jobs.constants import QUEUE_CONTROL, TASK_NIGHTLY_BATCH
from jobs.settings import Settings
from tests.faults.harness import PrivateRedis
from tests.support import ROOT, make_settings, settings_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def start_beat(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], BinaryIO]:
    log = open(log_path, "ab")  # noqa: SIM115 - the caller closes it
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "--loglevel", "INFO"],
        env=env, cwd=ROOT, stdout=log, stderr=log,
    )  # fmt: skip
    return beat, log


def nightly_messages(redis_url: str) -> int:
    """Nightly-batch task messages waiting in the control queue."""
    client = redis_client(redis_url)
    try:
        raw = client.lrange(QUEUE_CONTROL, 0, -1)
    finally:
        client.close()
    return sum(json.loads(m)["headers"]["task"] == TASK_NIGHTLY_BATCH for m in raw)


@pytest.mark.timeout(300)
def test_beat_keeps_firing_after_redis_lost_its_data(
    clean_db: str,
    private_redis: PrivateRedis,
    simulator: Simulator,
    nightly_file: Path,
    tmp_path: Path,
) -> None:
    # Beat alone: no worker consumes, so every run it fires stays in the queue to count.
    nightly = make_settings(
        clean_db,
        private_redis.url,
        simulator.url,
        nightly_cron="* * * * *",
        nightly_source=str(nightly_file),
    )
    env = settings_env(nightly) | {"NIGHTLY_CRON": "* * * * *", "NIGHTLY_SOURCE": str(nightly_file)}
    beat, log = start_beat(env, tmp_path / "beat.log")
    try:
        wait_until(lambda: nightly_messages(private_redis.url) == 1, 90, "the first run")
        private_redis.crash()  # schedule, lock, queue: all gone
        # Down for longer than beat's longest loop (5 s): at least one tick finds it gone.
        time.sleep(6)
        private_redis.start()
        assert nightly_messages(private_redis.url) == 0
        wait_until(lambda: nightly_messages(private_redis.url) >= 1, 90, "a run after the restart")
        time.sleep(5)  # a second beat loop in the same minute must not fire it again
        assert nightly_messages(private_redis.url) == 1
        assert beat.poll() is None, "beat survived the restart"
    finally:
        if beat.poll() is None:
            beat.terminate()
            beat.wait(30)
        log.close()
    beat_log = (tmp_path / "beat.log").read_text()
    assert "event=beat_schedule_lost" in beat_log and "event=beat_lock_lost" in beat_log
    assert "event=beat_redis_unreachable" in beat_log
    print("fault=beat-redis-restart fired=1")


@pytest.mark.timeout(360)
def test_two_beats_and_a_killed_beat_fire_each_run_exactly_once(
    settings: Settings, nightly_file: Path, tmp_path: Path
) -> None:
    nightly = settings.replace(nightly_cron="* * * * *", nightly_source=str(nightly_file))
    env = settings_env(nightly) | {"NIGHTLY_CRON": "* * * * *", "NIGHTLY_SOURCE": str(nightly_file)}
    beats: list[subprocess.Popen[bytes]] = []
    logs = []

    def another_beat() -> subprocess.Popen[bytes]:
        beat, log = start_beat(env, tmp_path / f"beat-{len(beats)}.log")
        beats.append(beat)
        logs.append(log)
        return beat

    found: Counter[str] = Counter()
    seen: Counter[int] = Counter()
    #: Every send, as (when this poll first saw it, the beat that logged it).
    timeline: list[tuple[str, int]] = []

    def sends() -> Counter[str]:
        """Nightly sends across every beat's log, by the minute they were first seen.

        Log lines are logfmt without a time (Heroku's router adds it), so each send is
        stamped when this poll (every 0.1 s) first sees it; beat sends a cron slot's
        run at the start of its minute, so a send is seen within the same minute.
        """
        for i in range(len(beats)):
            rows = [
                row
                for row in (tmp_path / f"beat-{i}.log").read_text().splitlines()
                if "Scheduler: Sending due task nightly-batch" in row
            ]
            new_rows = len(rows) - seen[i]
            if new_rows > 0:
                now = time.time()
                found[time.strftime("%Y-%m-%d %H:%M", time.gmtime(now))] += new_rows
                stamp = time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now * 10) % 10}"
                timeline.extend([(stamp, i)] * new_rows)
                seen[i] = len(rows)
        return found

    try:
        first, _second = another_beat(), another_beat()
        wait_until(lambda: len(sends()) >= 1, 90, "the first run")
        # Beat logs "Sending due task" before it records the run and publishes it: a kill
        # within that instant may lose or repeat the run (a repeat is harmless, the run's
        # batch having an idempotency key per slot). This checks the lock, so the kill
        # comes once the tick is done.
        time.sleep(2.0)
        first.send_signal(signal.SIGKILL)  # whichever holds the lock, one beat dies hard
        first.wait(10)
        another_beat()  # and the platform restarts it
        # The next minute start lies up to 60 s ahead, and a lock held by the killed beat
        # lasts up to its timeout (30 s) before another beat can take it over: the run
        # after the kill is the survivors' (the restarted beat's among them).
        try:
            wait_until(lambda: len(sends()) >= 2, 140, "a run after the kill")
        except BaseException:
            print(f"sends by minute: {dict(found)}; seen (time, beat): {timeline}")
            for i in range(len(beats)):
                lines = (tmp_path / f"beat-{i}.log").read_text().splitlines()
                print(
                    f"beat-{i}:",
                    *[x for x in lines if "lock" in x or "nightly" in x or "rror" in x],
                    sep="\n  ",
                )
            raise
    finally:
        for beat in beats:
            if beat.poll() is None:
                beat.terminate()
                beat.wait(30)
        for log in logs:
            log.close()
    # The redbeat lock lets exactly one beat send each minute's run.
    fired = sends()
    assert all(n == 1 for n in fired.values()), (fired, timeline)
    print(f"fault=beats runs={len(fired)}")
