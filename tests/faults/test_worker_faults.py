"""Workers killed with ``kill -9`` mid-call, and stopped the way Heroku stops a dyno."""

from __future__ import annotations

import datetime as dt
import re
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from devstack.simulator import Simulator, SimulatorConfig
from jobs.db import session_scope
from jobs.models import Attempt
from jobs.settings import Settings
from tests.faults.conftest import LEASE_S, RPM, TPM, fault_settings
from tests.faults.harness import Kill, check_invariants, fleet, submit, wait_finished
from tests.support import TEST_KEY, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def db_now(settings: Settings) -> dt.datetime:
    assert settings.database_url is not None
    with session_scope(settings.database_url) as s:
        now: dt.datetime = s.execute(select(func.clock_timestamp())).scalar_one()
        return now


def restarts_after(settings: Settings, job_ids: set[int], moment: dt.datetime) -> dict[int, float]:
    """Seconds from ``moment`` to each job's first call started after it."""
    assert settings.database_url is not None
    with session_scope(settings.database_url) as s:
        rows = s.execute(
            select(Attempt.job_id, func.min(Attempt.started_at))
            .where(Attempt.job_id.in_(job_ids), Attempt.started_at > moment)
            .group_by(Attempt.job_id)
        ).all()
    return {job_id: (started - moment).total_seconds() for job_id, started in rows}


@pytest.mark.timeout(300)
def test_kill_9_mid_call_five_times_in_a_1000_job_batch(
    fleet_settings: Settings, strict_sim: Simulator, tmp_path: Path
) -> None:
    kill_times: list[dt.datetime] = []
    kills: list[Kill] = []
    with fleet(fleet_settings, tmp_path, concurrency=40) as f:
        f.start(2)
        batch = submit(fleet_settings, 1000, tag="kill")
        for _ in range(5):
            # Kill only while calls are in flight, so each kill cuts calls mid-way.
            deadline = time.monotonic() + 30
            while batch.progress().running < 10 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            kills.append(f.kill(f.alive()[0]))
            kill_times.append(db_now(fleet_settings))
            f.start(1, wait=False)  # the platform starts a replacement
        progress = wait_finished(batch, 180, f)
    # Every paid call lost is one the simulator saw in flight to a killed worker.
    found = check_invariants(fleet_settings, strict_sim, batch, kills=kills)
    assert progress.succeeded == 1000, progress
    assert found.cut > 0, "the kills were meant to cut calls in flight"
    # Every abandoned call's job was called again, a lease (plus a sweep) after its worker
    # died.
    assert fleet_settings.database_url is not None
    with session_scope(fleet_settings.database_url) as s:
        lost = s.execute(
            select(Attempt.job_id, Attempt.started_at).where(Attempt.error_kind == "abandoned")
        ).all()
    recovery = []
    for job_id, started in lost:
        killed = min(t for t in kill_times if t >= started)
        recovery.extend(restarts_after(fleet_settings, {job_id}, killed).values())
    assert len(recovery) == len(lost)
    assert max(recovery) < LEASE_S + 20
    print(found.line("kill-9", kills=5, max_recovery_s=round(max(recovery), 1)))


@pytest.mark.timeout(300)
def test_sigterm_hands_back_within_30_s_and_the_jobs_restart_within_half_a_lease(
    clean_db: str, redis_url: str, strict_sim: Simulator, tmp_path: Path
) -> None:
    # Slow calls and backoff sleeps, so the stopped worker has jobs mid-call and mid-wait.
    # The production lease: a job the worker did not hand back waits for it to expire,
    # 45 to 60 s after the exit (renewed every 15 s), and restarts later than this
    # test allows.
    lease_s = 60.0
    settings = fault_settings(
        clean_db,
        redis_url,
        strict_sim.url,
        backoff_base=4.0,
        backoff_max=20.0,
        job_lease_seconds=lease_s,
    )
    strict_sim.set_faults(error_rate=0.3)
    with fleet(settings, tmp_path, concurrency=40) as f:
        stopping, other = f.start(2)
        batch = submit(settings, 400, tag="term")
        deadline = time.monotonic() + 30
        while strict_sim.stats().server_errors < 40 and time.monotonic() < deadline:
            time.sleep(0.1)
        sigterm_at = db_now(settings)
        started = time.monotonic()
        stopping.proc.send_signal(signal.SIGTERM)
        stopping.proc.wait(35)
        exit_s = time.monotonic() - started
        handed = {int(m) for m in re.findall(r"event=handed_back job=(\d+)", stopping.log())}
        strict_sim.set_faults(error_rate=0.0)
        progress = wait_finished(batch, 180, f)
        assert other.proc.poll() is None
    found = check_invariants(settings, strict_sim, batch)
    assert exit_s < 30, f"the worker took {exit_s:.1f} s to stop"
    assert handed, "some jobs were waiting when SIGTERM came"
    restart = restarts_after(settings, handed, sigterm_at)
    assert set(restart) == handed
    assert max(restart.values()) < lease_s / 2
    # The faults stop with SIGTERM, long before any job could spend its 8 calls.
    assert progress.succeeded == 400, progress
    print(
        found.line(
            "sigterm",
            exit_s=round(exit_s, 1),
            handed_back=len(handed),
            max_restart_s=round(max(restart.values()), 1),
        )
    )


#: Heroku's SIGTERM-to-SIGKILL grace (30 s), scaled down like the suite's leases.
GRACE_S = 3.0


@pytest.mark.timeout(300)
def test_calls_longer_than_the_sigterm_grace_are_cut_by_the_sigkill_and_called_again(
    clean_db: str, redis_url: str, tmp_path: Path
) -> None:
    """SIGTERM, then SIGKILL a grace later, with calls longer than the grace: the worker
    cannot end before the SIGKILL, the calls still running then are cut (the provider
    counted them: their rows stay ``abandoned``) and their jobs are called again once
    their leases run out, while the calls that ended within the grace are recorded."""
    latency = (2.0 * GRACE_S, 2.5 * GRACE_S)
    sim = Simulator(
        SimulatorConfig(
            key=TEST_KEY, rpm=RPM, tpm=TPM, latency_min=latency[0], latency_max=latency[1], seed=3
        )
    ).start()
    try:
        settings = fault_settings(clean_db, redis_url, sim.url, read_timeout=4 * GRACE_S)
        with fleet(settings, tmp_path, concurrency=40) as f:
            stopping, other = f.start(2)
            batch = submit(settings, 160, tag="grace")
            # Both workers' threads in calls: the first answers are still seconds away.
            wait_until(lambda: sim.stats().calls >= 80, 30, "80 calls in flight")
            sigterm_at = db_now(settings)
            kill = f.kill(stopping, grace_s=GRACE_S)
            killed_at = db_now(settings)
            f.start(1, wait=False)  # the platform starts a replacement
            progress = wait_finished(batch, 180, f)
            assert other.proc.poll() is None
        found = check_invariants(settings, sim, batch, kills=[kill])
    finally:
        sim.stop()
    assert progress.succeeded == 160, progress
    assert (killed_at - sigterm_at).total_seconds() >= GRACE_S, "it ended before the SIGKILL"
    assert found.cut > 0, "calls longer than the grace were meant to be running at the SIGKILL"
    assert settings.database_url is not None
    with session_scope(settings.database_url) as s:
        lost = (
            s.execute(select(Attempt.job_id).where(Attempt.error_kind == "abandoned"))
            .scalars()
            .all()
        )
    assert len(lost) == found.cut + found.extra_paid
    recovery = restarts_after(settings, set(lost), killed_at)
    assert set(recovery) == set(lost)
    assert max(recovery.values()) < LEASE_S + 20
    print(
        found.line(
            "sigterm-long-calls",
            grace_s=GRACE_S,
            cut_at_sigkill=found.cut,
            max_recovery_s=round(max(recovery.values()), 1),
        )
    )
