"""Scenarios about pace under the limits: RPM-bound, TPM-bound, restarts, a shared key.

Full mode uses the real limits (150 RPM / 800,000 TPM) and latencies; quick mode multiplies
limits by 10 and divides latencies by 10, so the same number of calls is in flight while
each run lasts about two windows instead of five.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, replace

from bench import ledger, procstats
from bench.loads import CJK_BELOW, PacedClient, bodies
from bench.measure import (
    BATCH_TIME_SLACK,
    MB,
    Admissions,
    admissions,
    limits_text,
    processes,
    record_pace,
    record_sim,
    record_sim_targets,
    seconds,
    sim_in_flight,
    sleep_until,
    wait_batch,
)
from bench.rows import Row
from bench.stack import Charge, Run, SimSpec, StackSpec
from jobs import api
from jobs.dryrun import ModelEstimate
from jobs.settings import Settings

BASE_RPM = 150
BASE_TPM = 800_000
#: Simulated latency of a call in full mode, seconds (uniform).
LATENCY = (2.0, 20.0)
#: Completion tokens the simulator gives a call on average (16 + hash % 48, under max_tokens).
MEAN_COMPLETION = 39.5


@dataclass(frozen=True)
class Load:
    """A saturating batch: limits, workers, request size and how many windows it lasts."""

    rpm: int
    tpm: int
    workers: int
    prompt_tokens: int
    max_tokens: int
    charge: Charge
    latency: tuple[float, float]
    windows: int
    #: WORKER_CONCURRENCY of each worker process; None: the default.
    concurrency: int | None = None
    #: DISPATCH_WINDOW (fixed there); None: the default, which follows the latency.
    dispatch_window: int | None = None
    #: Characters a token in the simulator's count (CJK text below 2).
    chars_per_token: float = 4.0
    #: Batch time allowed, as a multiple of the ideal.
    slack: float = BATCH_TIME_SLACK

    def stack_spec(self) -> StackSpec:
        """The simulator and the system's settings this load runs on."""
        sim = SimSpec(
            rpm=self.rpm,
            tpm=self.tpm,
            charge=self.charge,
            latency=self.latency,
            chars_per_token=self.chars_per_token,
        )
        return StackSpec(
            sim,
            rpm=self.rpm,
            tpm=self.tpm,
            concurrency=self.concurrency,
            dispatch_window=self.dispatch_window,
        )

    def calls_per_window(self) -> int:
        per_call = self.prompt_tokens + (
            self.max_tokens if self.charge == "reserve" else MEAN_COMPLETION
        )
        return max(1, min(self.rpm, math.floor(self.tpm / per_call)))


def saturate(run: Run, name: str, title: str, load: Load) -> Row:
    """Submit ``windows`` windows' worth of calls at once and measure the pace they ran at."""
    row = Row(name, title)
    per_window = load.calls_per_window()
    count = per_window * load.windows
    row.description = _describe(load, count)
    m = row.metrics
    m.update(workers=load.workers, limits=limits_text(load.rpm, load.tpm), requests=count)
    m.update(limit_rpm=load.rpm, limit_tpm=load.tpm)
    with run.stack(name, load.stack_spec()) as st:
        st.start_workers(load.workers)
        payload = bodies(
            name, count, load.prompt_tokens, load.max_tokens, chars_per_token=load.chars_per_token
        )
        before = api.estimate_batch(payload, settings=st.settings).models[0]
        t0 = time.perf_counter()
        batch = api.submit_batch(payload, name=name, settings=st.settings)
        m["submit_s"] = seconds(time.perf_counter() - t0)
        # Enough for a slow start plus the ideal schedule; a slower system is cut off
        # here (and misses its batch-time target) rather than stretching the run.
        budget = 60.0 * (load.windows + 2) + 2 * load.latency[1]
        pids = [w.pid for w in st.workers]
        with procstats.PeakSampler(pids, lambda: sim_in_flight(st.simulator.stats())) as peak:
            # No job ends before the first calls return: a stall is longer than they take.
            wait_batch(batch, budget, row, stall_s=max(180.0, load.latency[1] + 60.0))
        m["worker_peak_rss_mb"] = round(peak.peak_rss / MB, 1)
        m["sim_peak_calls_in_flight"] = peak.peak_in_flight
        record_sim(row, st.simulator)
        calls = ledger.calls(st.database_url)
        created, finished = ledger.batch_span(st.database_url, batch.id)
        counts = ledger.job_counts(st.database_url)
        # The same dry run once the ledger has taught the calibration and the latency.
        after = api.estimate_batch(payload, settings=st.settings).models[0]
    record_dry_runs(row, before, after, finished - created if finished else None)
    adm = admissions(calls, load.charge, load.max_tokens, load.rpm, load.tpm)
    record_pace(row, adm, calls, load.rpm, load.tpm)
    ideal = ideal_batch_s(count, adm.binding_calls, calls, load.latency)
    m["ideal_batch_s"] = round(ideal, 1)
    record_schedule(row, adm, count)
    if calls:
        m["first_call_after_submit_s"] = round(calls[0].started - created, 2)
    m["jobs_succeeded"] = counts.get("succeeded", 0)
    m["jobs_failed"] = counts.get("failed", 0)
    if finished is not None:
        elapsed = finished - created
        m["elapsed_s"] = round(elapsed, 1)
        m["batch_vs_ideal"] = round(elapsed / ideal, 3)
        row.target(
            f"batch time <= {load.slack:.2f} x ideal",
            elapsed <= load.slack * ideal,
            f"{elapsed:.1f} s vs ideal {ideal:.1f} s",
        )
    else:
        row.target("batch finished", False, f"cut off after {budget:.0f} s")
    record_sim_targets(row)
    row.target("every job succeeded", counts.get("succeeded", 0) == count, str(counts))
    return row


def record_schedule(row: Row, adm: Admissions, count: int) -> None:
    """Where a slower batch lost its time against the ideal, which admits a window's worth
    at once and the last calls at the last roll."""
    if not adm.times:
        return
    m, t0 = row.metrics, adm.times[0]
    m["first_window_calls_in_1_s"] = bisect.bisect_right(adm.times, t0 + 1.0)
    m["first_window_calls"] = bisect.bisect_left(adm.times, t0 + 60.0)
    # When the first window held all it can: its last call's place comes back one window
    # (and the log's margin) later, every window, up to the batch's last call.
    if len(adm.times) >= adm.binding_calls:
        m["first_window_full_s"] = round(adm.times[adm.binding_calls - 1] - t0, 2)
    m["last_admission_after_first_s"] = round(adm.times[-1] - t0, 1)
    m["ideal_last_admission_s"] = 60.0 * (math.ceil(count / adm.binding_calls) - 1)


def record_dry_runs(
    row: Row, before: ModelEstimate, after: ModelEstimate, elapsed: float | None
) -> None:
    """What ``submit --dry-run`` said of the batch on a fresh deployment (``before``) and
    once its calls had taught the calibration (``after``), against what happened."""
    m = row.metrics
    charged = int(m.get("sim_prompt_tokens") or 0)
    for when, found in (("fresh", before), ("calibrated", after)):
        m[f"dryrun_{when}_prompt_tokens"] = found.prompt_tokens
        if charged:
            m[f"dryrun_{when}_prompt_vs_ledger"] = round(found.prompt_tokens / charged, 3)
        if found.finish_s is not None:
            m[f"dryrun_{when}_finish_s"] = round(found.finish_s, 1)
            if elapsed:
                m[f"dryrun_{when}_finish_vs_measured"] = round(found.finish_s / elapsed, 3)


def _describe(load: Load, count: int) -> str:
    defaults = Settings.from_env({"INFERENCE_RPM": str(load.rpm), "INFERENCE_TPM": str(load.tpm)})
    threads = (
        f"WORKER_CONCURRENCY={load.concurrency}"
        if load.concurrency is not None
        else f"the default WORKER_CONCURRENCY ({defaults.worker_concurrency})"
    )
    window = (
        f"DISPATCH_WINDOW={load.dispatch_window}"
        if load.dispatch_window is not None
        else f"the default DISPATCH_WINDOW ({defaults.dispatch_window}, growing with the "
        f"latency up to DISPATCH_WINDOW_MAX {defaults.dispatch_window_max})"
    )
    text = (
        f"{count:,} jobs of ~{load.prompt_tokens:,} prompt tokens, max_tokens "
        f"{load.max_tokens:,}, charge={load.charge}, latency {load.latency[0]:g}-"
        f"{load.latency[1]:g} s, submitted at once to {load.workers} worker process(es) "
        f"with {threads} and {window}."
    )
    if load.chars_per_token != 4.0:
        script = "CJK" if load.chars_per_token < CJK_BELOW else "English"
        text += (
            f" The simulator counts {load.chars_per_token:g} characters a token ({script} text)."
        )
    return text


def ideal_batch_s(
    count: int, per_window: int, calls: list[ledger.Call], latency: tuple[float, float]
) -> float:
    """What a perfect client would take: the strict window's rolls, then the last call.

    It admits ``per_window`` calls at once and as many more at every roll, so the
    admissions span ``(ceil(count / per_window) - 1)`` windows; the batch ends when
    the slowest call of the last burst returns. That call's latency is the provider's
    draw, not the client's doing, so it is taken from the ledger: the longest latency
    among the last burst's worth of calls to start (the mean latency when the ledger
    has none, e.g. a cut-off run).
    """
    windows = math.ceil(count / per_window) - 1
    last = count - windows * per_window
    tail = [c.latency_s for c in calls[-last:] if c.latency_s is not None] if last else []
    return windows * 60.0 + (max(tail) if tail else sum(latency) / 2)


def _rpm_load(run: Run, workers: int, factor: int) -> Load:
    return Load(
        rpm=BASE_RPM * factor * run.scale,
        tpm=BASE_TPM * factor * run.scale,
        workers=workers,
        prompt_tokens=1000,
        max_tokens=200,
        charge="reserve",
        latency=run.latency(*LATENCY),
        windows=2 if run.quick else 5,
    )


def rpm(run: Run, workers: int, factor: int = 1) -> Row:
    """A saturating RPM-bound batch at ``factor`` times the real limits."""
    load = _rpm_load(run, workers, factor)
    if factor > 1 and workers == 1:
        # One process needs a thread per call in flight: 25 calls/s of 2-20 s each is
        # 275 on average, above the default WORKER_CONCURRENCY.
        load = replace(load, concurrency=400)
    prefix = "rpm" if factor == 1 else f"rpm{factor}x"
    title = "RPM-bound" + (f" at {factor}x limits" if factor > 1 else "")
    return saturate(run, f"{prefix}-w{workers}", f"{title}, {processes(workers)}", load)


def _tpm_load(run: Run, charge: Charge, workers: int) -> Load:
    return Load(
        rpm=BASE_RPM * run.scale,
        tpm=BASE_TPM * run.scale,
        workers=workers,
        prompt_tokens=8000,
        max_tokens=1000,
        charge=charge,
        latency=run.latency(*LATENCY),
        windows=2 if run.quick else 5,
    )


def tpm(run: Run, workers: int, charge: Charge, chars_per_token: float = 4.0) -> Row:
    """A TPM-bound batch under one charge mode, on ``workers`` worker processes.

    ``chars_per_token`` other than 4 names the row after the simulator's count (``c3``,
    ``cjk``), so that an estimate tuned to one tokenizer shows its error on the others.
    """
    load = replace(_tpm_load(run, charge, workers), chars_per_token=chars_per_token)
    name, title = f"tpm-{charge}", f"TPM-bound, charge={charge}"
    if chars_per_token != 4.0:
        name += "-cjk" if chars_per_token < CJK_BELOW else f"-c{chars_per_token:g}"
        title += f", {chars_per_token:g} characters a token"
    return saturate(run, f"{name}-w{workers}", f"{title}, {processes(workers)}", load)


#: Long documents: prompts of about 130,000 tokens, six of which fit 800,000 TPM.
LONG_DOC_TOKENS = 130_000


def long_docs(run: Run, workers: int) -> Row:
    """A dozen ~130,000-token prompts: whole windows of a few very large calls."""
    load = Load(
        rpm=BASE_RPM * run.scale,
        tpm=BASE_TPM * run.scale,
        workers=workers,
        prompt_tokens=LONG_DOC_TOKENS,
        max_tokens=1000,
        charge="reserve",
        latency=run.latency(*LATENCY),
        # Six fit a window (131,000 tokens each, max_tokens included): a dozen prompts.
        windows=2,
        slack=1.15,
    )
    # Full mode only: the quick run's ten times the TPM would take ten times the prompts.
    title = f"Long documents of ~{LONG_DOC_TOKENS:,} prompt tokens, {processes(workers)}"
    return saturate(run, f"long-docs-w{workers}", title, load)


#: Long calls: reasoning answers of a few thousand tokens take about this long.
LONG_CALL_S = (85.0, 95.0)


def long_calls(run: Run, workers: int) -> Row:
    """An RPM-bound batch whose calls take 85-95 s: the limit times the latency in flight."""
    load = replace(_rpm_load(run, workers, 1), latency=run.latency(*LONG_CALL_S), windows=4)
    title = f"Long calls of {LONG_CALL_S[0]:g}-{LONG_CALL_S[1]:g} s, {processes(workers)}"
    return saturate(run, f"long-calls-w{workers}", title, load)


#: Calls near the default read timeout (INFERENCE_READ_TIMEOUT, 300 s).
NEAR_TIMEOUT_S = (285.0, 295.0)
#: Threads and dispatch window that hold the whole limit times such calls in flight:
#: 150 RPM x 295 s / 60 = 738 calls, plus a minute's requests waiting their turn.
WIDE_CONCURRENCY, WIDE_WINDOW = 950, 900


def near_timeout(run: Run, workers: int, wide: bool = False) -> Row:
    """An RPM-bound batch whose calls take 285-295 s. With the defaults the dispatch
    window (DISPATCH_WINDOW_MAX) caps the calls in flight, and so the rate; ``wide``
    raises the threads and the window to what the limit times the latency needs, to
    measure the memory that takes."""
    load = replace(
        _rpm_load(run, workers, 1),
        latency=run.latency(*NEAR_TIMEOUT_S),
        # Wide: more than the limit times the latency (738 calls), so that all are in
        # flight at once; the default's window caps it well below that anyway.
        windows=6 if wide else 4,
        # The default's rate is capped by its window, not paced by the limit.
        slack=1.03 if wide else 3.0,
        concurrency=WIDE_CONCURRENCY if wide else None,
        dispatch_window=WIDE_WINDOW if wide else None,
    )
    name = f"near-timeout{'-wide' if wide else ''}-w{workers}"
    title = f"Calls of {NEAR_TIMEOUT_S[0]:g}-{NEAR_TIMEOUT_S[1]:g} s, " + (
        f"{WIDE_CONCURRENCY} threads and a window of {WIDE_WINDOW}, " if wide else "defaults, "
    )
    return saturate(run, name, title + processes(workers), load)


#: The dry run's finish time may miss the measured one by this share.
DRY_RUN_SLACK = 0.10


def eta_behind(run: Run, workers: int) -> Row:
    """The dry run of a batch submitted behind another on the same key: its finish time
    against the measured one. A small batch first teaches the ledger the calls' latency
    and the calibration, as on a deployment already in use."""
    load = _rpm_load(run, workers, 1)
    ahead, count, warm = 2 * load.rpm, 2 * load.rpm, 20
    row = Row(f"eta-behind-w{workers}", f"Dry run behind a queued batch, {processes(workers)}")
    row.description = (
        f"{warm} jobs first (latency and calibration in the ledger), then a batch of "
        f"{ahead:,} and, right behind it, the measured batch of {count:,}, all RPM-bound "
        f"(~{load.prompt_tokens:,} prompt tokens, max_tokens {load.max_tokens}, latency "
        f"{load.latency[0]:g}-{load.latency[1]:g} s); the measured batch's dry run is taken "
        "just before it is submitted."
    )
    m = row.metrics
    m.update(workers=workers, limits=limits_text(load.rpm, load.tpm), requests=count)
    with run.stack(row.name, load.stack_spec()) as st:
        st.start_workers(workers)
        size = (load.prompt_tokens, load.max_tokens)
        first = api.submit_batch(bodies("warm", warm, *size), settings=st.settings)
        wait_batch(first, 120.0 + 2 * load.latency[1], row)
        api.submit_batch(bodies("ahead", ahead, *size), settings=st.settings)
        payload = bodies("measured", count, *size)
        found = api.estimate_batch(payload, settings=st.settings).models[0]
        batch = api.submit_batch(payload, settings=st.settings)
        budget = 60.0 * ((ahead + count) / load.rpm + 2) + 2 * load.latency[1]
        wait_batch(batch, budget, row)
        created, finished = ledger.batch_span(st.database_url, batch.id)
        record_sim(row, st.simulator)
    m["dryrun_backlog_requests"] = found.backlog_requests
    m["dryrun_latency_s"] = None if found.latency_s is None else round(found.latency_s, 1)
    m["dryrun_finish_s"] = None if found.finish_s is None else round(found.finish_s, 1)
    if finished is None or found.finish_s is None:
        row.target("batch finished, dry run timed it", False, f"finished {finished}")
        return row
    elapsed = finished - created
    m["elapsed_s"] = round(elapsed, 1)
    m["dryrun_finish_vs_measured"] = round(found.finish_s / elapsed, 3)
    row.target(
        f"dry run's finish within {DRY_RUN_SLACK:.0%} of the measured",
        abs(found.finish_s / elapsed - 1) <= DRY_RUN_SLACK,
        f"{found.finish_s:.1f} s said, {elapsed:.1f} s measured",
    )
    record_sim_targets(row)
    return row


def _wait_first_admission(database_url: str, deadline: float) -> float | None:
    """Epoch time of the first admitted call, polling the ledger until ``deadline``."""
    while time.time() < deadline:
        first = ledger.first_admission(database_url)
        if first is not None:
            return first
        time.sleep(0.5)
    return None


def restart(run: Run, workers: int) -> Row:
    """Start saturated, FLUSHDB the Redis database mid-run; admissions after each event."""
    rpm, tpm = BASE_RPM * run.scale, BASE_TPM * run.scale
    latency = run.latency(*LATENCY)
    flush_after, observe = (75.0, 125.0) if run.quick else (150.0, 130.0)
    # Room for a slow start (up to a window) plus the run, so the backlog never runs dry.
    count = rpm * math.ceil((60.0 + flush_after + observe) / 60.0 + 2)
    name = f"restart-w{workers}"
    row = Row(name, f"Start-up and Redis FLUSHDB mid-run, {processes(workers)}")
    row.description = (
        f"{count:,} jobs (250-token prompts, max_tokens 100) submitted to {processes(workers)} "
        "already running; "
        f"{flush_after:g} s after the first admitted call the benchmark's Redis database is "
        "flushed (throttle log, Celery queues and bindings gone), then watched for "
        f"{observe:g} s. Counts per interval come from the ledger."
    )
    m = row.metrics
    m.update(workers=workers, limits=limits_text(rpm, tpm), requests=count)
    m.update(limit_rpm=rpm, limit_tpm=tpm)
    sim = SimSpec(rpm=rpm, tpm=tpm, latency=latency)
    with run.stack(name, StackSpec(sim, rpm=rpm, tpm=tpm)) as st:
        st.start_workers(workers)
        batch = api.submit_batch(bodies("restart", count, 250, 100), settings=st.settings)
        start, _ = ledger.batch_span(st.database_url, batch.id)
        first = _wait_first_admission(st.database_url, start + 240.0)
        sleep_until((first if first is not None else start) + flush_after)
        before = st.simulator.stats()
        flushed = time.time()
        st.redis_conn.flushdb()
        sleep_until(flushed + observe)
        record_sim(row, st.simulator)
        calls = ledger.calls(st.database_url)
        counts = ledger.job_counts(st.database_url)
        m["worker_log_dispatch_errors"] = st.worker_log_count("dispatch_error")
    m["elapsed_s"] = round(flushed + observe - start, 1)
    m["sim_rate_limited_after_flush"] = int(m["sim_rate_limited"] or 0) - before["rate_limited"]
    ok = [c.started for c in calls if c.status == 200]
    limited = [c.started for c in calls if c.status == 429]
    m["first_admission_after_start_s"] = seconds(first - start) if first is not None else None
    m["admitted_first_60s_after_start"] = ledger.count_between(ok, start, start + 60)
    m["rate_limited_first_60s_after_start"] = ledger.count_between(limited, start, start + 60)
    m["admitted_60s_before_flush"] = ledger.count_between(ok, flushed - 60, flushed)
    after = ledger.count_between(ok, flushed, flushed + 60)
    m["admitted_first_60s_after_flush"] = after
    m["admitted_60_120s_after_flush"] = ledger.count_between(ok, flushed + 60, flushed + 120)
    m["rate_limited_after_flush_ledger"] = ledger.count_between(limited, flushed, math.inf)
    later = [t for t in ok if t >= flushed]
    m["first_admission_after_flush_s"] = seconds(later[0] - flushed) if later else None
    m["jobs_at_end"] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    adm = admissions(calls, "reserve", 100, rpm, tpm)
    m["ledger_max_admitted_in_window"] = ledger.max_in_window(adm.times, adm.costs, 60.0)[0]
    started = int(m["admitted_first_60s_after_start"] or 0)
    row.target(
        "full quota in the first 60 s after submission (>= 95%)",
        started >= 0.95 * rpm,
        f"{started} of {rpm}",
    )
    row.target(
        "no 429 in the first 60 s",
        m["rate_limited_first_60s_after_start"] == 0,
        f"{m['rate_limited_first_60s_after_start']}",
    )
    row.target(
        "no 429 after the flush",
        m["sim_rate_limited_after_flush"] == 0,
        f"{m['sim_rate_limited_after_flush']} answered 429 (simulator)",
    )
    row.target(
        "keeps pace in the 60 s after the flush (>= 90% of a window)",
        after >= 0.9 * rpm,
        f"{after} of {rpm}",
    )
    return row


def shared_key(run: Run, workers: int) -> Row:
    """Our batch plus another client on the same key at a fifth of the RPM."""
    rpm, tpm = BASE_RPM * run.scale, BASE_TPM * run.scale
    latency = run.latency(*LATENCY)
    other_rpm = rpm // 5
    duration = 130.0 if run.quick else 240.0
    count = rpm * math.ceil(duration / 60.0 + 2)
    name = f"shared-key-w{workers}"
    row = Row(name, f"Shared key: another client sends 20% of the RPM, {processes(workers)}")
    row.description = (
        f"A saturating batch of {count:,} jobs (250-token prompts) while a plain httpx "
        f"client sends {other_rpm} requests/min on the same key (no throttle, no backoff), "
        f"for {duration:g} s."
    )
    m = row.metrics
    m.update(workers=workers, limits=limits_text(rpm, tpm), requests=count)
    m.update(limit_rpm=rpm, limit_tpm=tpm, elapsed_s=duration, other_client_rpm=other_rpm)
    sim = SimSpec(rpm=rpm, tpm=tpm, latency=latency)
    with run.stack(name, StackSpec(sim, rpm=rpm, tpm=tpm)) as st:
        st.start_workers(workers)
        other = PacedClient(st.simulator.url, st.key, other_rpm, 250, latency[1])
        payload = bodies("shared", count, 250, 100)
        started = time.time()
        other.start()
        api.submit_batch(payload, settings=st.settings)
        sleep_until(started + duration)
        other.stop()
        record_sim(row, st.simulator)
        calls = ledger.calls(st.database_url)
    ours_429 = sum(1 for c in calls if c.status == 429)
    if calls:
        # When our refused calls started, from our first call: at start-up, at a
        # window roll or in between tells which mechanism let the other client in.
        m["ours_429_at_s"] = (
            ", ".join(f"{c.started - calls[0].started:.1f}" for c in calls if c.status == 429)
            or "none"
        )
    m["ours_calls"] = len(calls)
    m["ours_admitted"] = sum(1 for c in calls if c.status == 200)
    m["ours_rate_limited"] = ours_429
    m["ours_429_fraction_pct"] = round(100.0 * ours_429 / len(calls), 2) if calls else None
    m["other_sent"] = other.sent
    m["other_admitted"] = other.statuses.get(200, 0)
    m["other_rate_limited"] = other.statuses.get(429, 0)
    m["other_transport_errors"] = other.errors
    m["other_429_fraction_pct"] = (
        round(100.0 * other.statuses.get(429, 0) / other.sent, 2) if other.sent else None
    )
    adm = admissions(calls, "reserve", 100, rpm, tpm)
    windows = ledger.steady_windows(adm.times, adm.costs)
    m["ours_admitted_per_window_after_first"] = ", ".join(str(n) for n, _ in windows) or None
    fraction = m["ours_429_fraction_pct"]
    row.target(
        "< 1% of our calls answered 429",
        isinstance(fraction, float) and fraction < 1.0,
        f"{fraction}% ({ours_429} of {len(calls)})",
    )
    return row
