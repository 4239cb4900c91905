"""Scenarios about the system itself: priority, overhead, memory, and the Celery baseline."""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import threading
import time

import httpx
import redis
from celery import Celery

from bench import baseline_app, ledger, procstats
from bench.loads import bodies, chat_body, plain_loop, plain_pool, write_batch_file
from bench.measure import (
    MB,
    cancel,
    limits_text,
    processes,
    record_sim,
    record_sim_targets,
    seconds,
    sim_in_flight,
    sleep_until,
    wait_batch,
)
from bench.rows import Row
from bench.scenarios_rate import BASE_RPM, BASE_TPM, LATENCY
from bench.stack import Run, SimSpec, SimulatorProcess, StackSpec
from devstack.procs import WebProcess
from jobs import api
from jobs.models import Priority
from jobs.settings import Settings

#: What the system is told when the simulator has no limits at all.
LIFTED_RPM = 1_000_000
LIFTED_TPM = 10_000_000_000
#: Threads of the plain httpx comparison client: the worker's default concurrency.
POOL_THREADS = 100
#: Jobs/s end to end with the limits lifted, and worker CPU per job (dispatcher
#: included), that the overhead rows aim at.
TARGET_JOBS_PER_S = 200.0
TARGET_CPU_MS_PER_JOB = 5.0
#: A Heroku standard-1X dyno.
DYNO_MB = 512


def _round_opt(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def priority(run: Run, workers: int) -> Row:
    """Interactive jobs over a bulk backlog, with the default settings."""
    return _priority(run, f"priority-w{workers}", workers, reserve_share=0.0)


def priority_reserve(run: Run, workers: int) -> Row:
    """The same with INFERENCE_INTERACTIVE_RESERVE at a tenth of the request limit."""
    return _priority(run, f"priority-reserve-w{workers}", workers, reserve_share=0.1)


def priority_first(run: Run, workers: int) -> Row:
    """Default settings, an interactive job every 2.5 s: 24 inside the first window."""
    return _priority(run, f"priority-first-w{workers}", workers, reserve_share=0.0, every=2.5)


#: Interactive arrivals a first-window row must have inside its first window.
FIRST_WINDOW_ARRIVALS = 20


def _priority(
    run: Run, name: str, workers: int, *, reserve_share: float, every: float = 5.0
) -> Row:
    """Interactive ``enqueue`` jobs every ``every`` s on top of a saturating bulk backlog."""
    rpm, tpm = BASE_RPM * run.scale, BASE_TPM * run.scale
    reserve = round(reserve_share * rpm)
    latency = run.latency(*LATENCY)
    duration = 100.0 if run.quick else 240.0
    backlog = 5_000 if run.quick else 10_000
    steady_after = 60.0 if run.quick else 120.0
    # Jobs enqueued within this long of the bulk batch's submission arrive in the
    # provider's first window, which its first calls open a moment later.
    first_window = 60.0
    title = f"Priority: interactive jobs over a bulk backlog, reserve {reserve}"
    row = Row(name, f"{title}, {processes(workers)}")
    row.description = (
        f"A {backlog:,}-job bulk batch (250-token prompts) saturates the limit; an interactive "
        f"job is enqueued every {every:g} s for {duration:g} s, from the start. "
        f"INFERENCE_INTERACTIVE_RESERVE={reserve}"
        + (
            " (the default). "
            if reserve == Settings().interactive_reserve
            else ": bulk leaves that many requests of every window free. "
        )
        + "Wait = first call start - job creation (ledger); the steady-state figures leave "
        f"out jobs enqueued in the first {steady_after:g} s. Bulk waits cover only the bulk "
        "jobs that were called."
    )
    m = row.metrics
    m.update(
        workers=workers,
        limits=limits_text(rpm, tpm),
        requests=backlog,
        elapsed_s=duration,
        limit_rpm=rpm,
        limit_tpm=tpm,
        interactive_reserve=reserve,
    )
    sim = SimSpec(rpm=rpm, tpm=tpm, latency=latency)
    spec = StackSpec(sim, rpm=rpm, tpm=tpm, interactive_reserve=reserve)
    with run.stack(name, spec) as st:
        st.start_workers(workers)
        batch = api.submit_batch(bodies("bulk", backlog, 250, 100), settings=st.settings)
        started = time.time()
        handles: list[api.JobHandle] = []
        index = 0
        while time.time() < started + duration:
            body = chat_body("interactive", index, 250, 100)
            handles.append(api.enqueue(body["messages"], max_tokens=100, settings=st.settings))
            index += 1
            sleep_until(started + index * every)
        cancel(batch, row)
        # Let interactive jobs already waiting on the throttle get their call.
        give_up = time.time() + 60.0 + latency[1]
        for handle in handles:
            try:
                handle.wait(timeout=max(0.1, give_up - time.time()), poll=0.5)
            except TimeoutError:
                break
        record_sim(row, st.simulator)
        waits_i, never_i = ledger.first_call_waits(st.database_url, Priority.INTERACTIVE)
        waits_b, never_b = ledger.first_call_waits(st.database_url, Priority.BULK)
        steady_i, _ = ledger.first_call_waits(
            st.database_url, Priority.INTERACTIVE, created_after=started + steady_after
        )
        first_i, _ = ledger.first_call_waits(
            st.database_url, Priority.INTERACTIVE, created_before=started + first_window
        )
        slow = ledger.slow_first_calls(
            st.database_url, Priority.INTERACTIVE, since=started, over_s=2.0
        )
    m["interactive_enqueued"] = len(handles)
    m["interactive_called"] = len(waits_i)
    m["interactive_never_called"] = never_i
    m["interactive_first_window_called"] = len(first_i)
    _record_waits(
        row,
        interactive=waits_i,
        interactive_first_window=first_i,
        interactive_steady=steady_i,
        bulk=waits_b,
    )
    # When the slow interactive jobs were enqueued says which phase kept them waiting.
    m["interactive_slow_waits"] = (
        "; ".join(f"{created:.0f} s: {wait:.1f} s" for created, wait in slow) or "none"
    )
    m["bulk_called"] = len(waits_b)
    m["bulk_never_called"] = never_b
    _priority_targets(row, first_window_arrivals=every < 60.0 / FIRST_WINDOW_ARRIVALS)
    record_sim_targets(row)
    return row


def _priority_targets(row: Row, *, first_window_arrivals: bool) -> None:
    m = row.metrics
    p95 = m["interactive_wait_p95_s"]
    row.target("interactive p95 wait < 2 s", isinstance(p95, float) and p95 < 2.0, f"p95 {p95} s")
    never = m["interactive_never_called"]
    row.target("every interactive job was called", never == 0, f"{never} never called")
    if first_window_arrivals:
        first = m["interactive_first_window_called"]
        first_p95 = m["interactive_first_window_wait_p95_s"]
        first_max = m["interactive_first_window_wait_max_s"]
        row.target(
            f"at least {FIRST_WINDOW_ARRIVALS} interactive jobs enqueued in the first window",
            isinstance(first, int) and first >= FIRST_WINDOW_ARRIVALS,
            f"{first} called",
        )
        row.target(
            "first-window interactive p95 wait < 2 s",
            isinstance(first_p95, float) and first_p95 < 2.0,
            f"p95 {first_p95} s, longest {first_max} s",
        )


def _record_waits(row: Row, **waits: list[float]) -> None:
    """The p50, p95 and longest of each list of waits, under its name."""
    for label, values in waits.items():
        row.metrics[f"{label}_wait_p50_s"] = _round_opt(ledger.percentile(values, 50))
        row.metrics[f"{label}_wait_p95_s"] = _round_opt(ledger.percentile(values, 95))
        row.metrics[f"{label}_wait_max_s"] = _round_opt(max(values) if values else None)


#: WORKER_CONCURRENCY and DISPATCH_WINDOW of the rows with lifted limits. The
#: window's default follows the request limit, and would publish a whole lifted
#: batch to Redis at once.
LIFTED_CONCURRENCY = 100


def _lifted(latency: tuple[float, float], concurrency: int = LIFTED_CONCURRENCY) -> StackSpec:
    sim = SimSpec(latency=latency)
    return StackSpec(
        sim,
        rpm=LIFTED_RPM,
        tpm=LIFTED_TPM,
        concurrency=concurrency,
        dispatch_window=concurrency,
    )


def _plain_clients(row: Row, sim: SimulatorProcess, key: str, loop_count: int, count: int) -> None:
    """The comparison: plain httpx, sequential and then pooled, on the same simulator."""
    m = row.metrics
    sim0 = procstats.cpu_seconds([sim.pid])
    loop = plain_loop(sim.url, key, loop_count, "loop", 100)
    sim1 = procstats.cpu_seconds([sim.pid])
    pool = plain_pool(sim.url, key, count, "pool", 100, POOL_THREADS)
    sim2 = procstats.cpu_seconds([sim.pid])
    for label, result, sim_cpu in (("loop", loop, sim1 - sim0), ("pool", pool, sim2 - sim1)):
        m[f"{label}_calls"] = result.calls
        m[f"{label}_ok"] = result.ok
        m[f"{label}_calls_per_s"] = round(result.calls / result.seconds, 1)
        m[f"{label}_client_cpu_ms_per_call"] = round(1000.0 * result.cpu_seconds / result.calls, 2)
        m[f"simulator_cpu_ms_per_call_{label}"] = round(1000.0 * sim_cpu / result.calls, 2)
    m["pool_threads"] = POOL_THREADS


def overhead_throughput(run: Run, workers: int) -> Row:
    """Limits lifted, latency 0: jobs/s through the stack vs a plain httpx loop."""
    count = 1_500 if run.quick else 5_000
    loop_count = 1_000 if run.quick else 2_000
    name = f"overhead-throughput-w{workers}"
    row = Row(name, f"Overhead: limits lifted, latency 0, {processes(workers)}")
    row.description = (
        f"{count:,} jobs (100-token prompts, max_tokens 16) through {processes(workers)} "
        f"(WORKER_CONCURRENCY {LIFTED_CONCURRENCY} each, DISPATCH_WINDOW "
        f"{LIFTED_CONCURRENCY}) against a "
        "simulator without limits or latency; then "
        f"{loop_count:,} sequential calls from one thread with a plain httpx client, and "
        f"{count:,} calls from {POOL_THREADS} threads sharing one plain httpx client."
    )
    m = row.metrics
    m.update(workers=workers, limits="lifted", requests=count)
    with run.stack(name, _lifted((0.0, 0.0))) as st:
        st.start_workers(workers)
        worker_pids = [w.pid for w in st.workers]
        cpu0 = procstats.cpu_seconds(worker_pids)
        sim0 = procstats.cpu_seconds([st.simulator.pid])
        payload = bodies("overhead", count, 100, 16)
        t0 = time.perf_counter()
        batch = api.submit_batch(payload, settings=st.settings)
        m["submit_s"] = seconds(time.perf_counter() - t0)
        wait_batch(batch, 900.0, row)
        worker_cpu = procstats.cpu_seconds(worker_pids) - cpu0
        sim_cpu = procstats.cpu_seconds([st.simulator.pid]) - sim0
        created, finished = ledger.batch_span(st.database_url, batch.id)
        counts = ledger.job_counts(st.database_url)
        calls = ledger.calls(st.database_url)
        record_sim(row, st.simulator)
        _plain_clients(row, st.simulator, st.key, loop_count, count)
    done = counts.get("succeeded", 0)
    elapsed = (finished - created) if finished is not None else None
    rate = done / elapsed if elapsed else None
    m["elapsed_s"] = _round_opt(elapsed)
    m["jobs_succeeded"] = done
    m["stack_jobs_per_s"] = _round_opt(rate, 1)
    if calls:
        first = calls[0].started
        last = max(c.started + (c.latency_s or 0.0) for c in calls)
        m["first_call_after_submit_s"] = round(first - created, 2)
        m["calls_phase_s"] = round(last - first, 2)
        m["calls_phase_jobs_per_s"] = round(done / (last - first), 1) if last > first else None
    m["worker_cpu_ms_per_job"] = round(1000.0 * worker_cpu / done, 2) if done else None
    m["simulator_cpu_ms_per_call_stack"] = round(1000.0 * sim_cpu / done, 2) if done else None
    pool_rate = m.get("pool_calls_per_s")
    if rate is not None and isinstance(pool_rate, float) and pool_rate > 0:
        m["stack_vs_pool_pct"] = round(100.0 * rate / pool_rate, 1)
    _throughput_targets(row, rate)
    row.target("every job succeeded", done == count, f"{done} of {count}")
    return row


def _throughput_targets(row: Row, rate: float | None) -> None:
    """The overhead row's targets: jobs/s and worker CPU per job. On a machine slower than
    the one the target was set on (its plain loop under 800 calls/s), the jobs/s target
    is a quarter of the loop's rate in the same run."""
    m = row.metrics
    loop_rate = m.get("loop_calls_per_s")
    wanted = TARGET_JOBS_PER_S
    if isinstance(loop_rate, float) and loop_rate < 4 * TARGET_JOBS_PER_S:
        wanted = round(loop_rate / 4, 1)
    m["target_jobs_per_s"] = wanted
    row.target(
        f"stack >= {wanted:g} jobs/s",
        rate is not None and rate >= wanted,
        f"{m['stack_jobs_per_s']} jobs/s",
    )
    cpu_ms = m["worker_cpu_ms_per_job"]
    row.target(
        f"worker CPU <= {TARGET_CPU_MS_PER_JOB:g} ms per job",
        isinstance(cpu_ms, float) and cpu_ms <= TARGET_CPU_MS_PER_JOB,
        f"{cpu_ms} ms",
    )


def overhead_rss(run: Run) -> Row:
    """Resident memory of one worker process with 100 calls in flight."""
    latency = 10.0 if run.quick else 20.0
    row = Row("overhead-rss", "Overhead: worker RSS with 100 calls in flight")
    row.description = (
        f"1 worker (WORKER_CONCURRENCY={LIFTED_CONCURRENCY}), simulator latency "
        f"fixed at {latency:g} s and no "
        "limits; 100 jobs of 1,000-token prompts. RSS of the worker's process tree (psutil) "
        "sampled once the ledger shows 100 calls in flight."
    )
    m = row.metrics
    m.update(workers=1, limits="lifted", requests=100)
    with run.stack("overhead-rss", _lifted((latency, latency))) as st:
        st.start_workers(1)
        pids = [w.pid for w in st.workers]
        time.sleep(2.0)
        m["rss_idle_mb"] = round(procstats.rss_bytes(pids) / MB, 1)
        batch = api.submit_batch(bodies("rss", 100, 1000, 200), settings=st.settings)
        # The calls may start late (a slow throttle start); wait for them, not a fixed time.
        deadline = time.monotonic() + 120.0 + latency
        flying = 0
        while time.monotonic() < deadline:
            flying = ledger.in_flight(st.database_url)
            if flying >= 100 or ledger.job_counts(st.database_url).get("succeeded", 0):
                break
            time.sleep(0.2)
        samples = []
        for _ in range(5):
            samples.append(procstats.rss_bytes(pids))
            time.sleep(0.2)
        m["ledger_in_flight"] = ledger.in_flight(st.database_url)
        stats = st.simulator.stats()
        m["sim_in_flight"] = sim_in_flight(stats)
        m["rss_in_flight_mb"] = round(max(samples) / MB, 1)
        wait_batch(batch, latency + 120.0, row)
        m["rss_after_mb"] = round(procstats.rss_bytes(pids) / MB, 1)
        record_sim(row, st.simulator)
    m["rss_per_call_in_flight_kb"] = round(
        (float(m["rss_in_flight_mb"] or 0) - float(m["rss_idle_mb"] or 0)) * 1024 / 100, 1
    )
    row.target("100 calls were in flight", flying >= 100, f"{flying} seen in the ledger")
    rss = float(m["rss_in_flight_mb"] or 0)
    row.target("RSS < 300 MB with 100 calls in flight", rss < 300, f"{rss} MB")
    return row


def _redis_bytes_in_db(client: redis.Redis) -> int:
    """MEMORY USAGE summed over every key of the client's database."""
    total = 0
    for key in client.scan_iter(count=1000):
        total += int(client.memory_usage(key) or 0)
    return total


def overhead_submit(run: Run) -> Row:
    """``python -m jobs submit`` of a big file with no worker running."""
    lines = 100_000
    row = Row("overhead-submit", f"Overhead: submitting a {lines:,}-line batch file")
    row.description = (
        f"`python -m jobs submit FILE` of {lines:,} OpenAI Batch lines (100-token prompts) in a "
        "subprocess, no worker running. Peak memory = the subprocess's ru_maxrss; Redis = "
        "INFO used_memory delta (whole server) and MEMORY USAGE of the benchmark database's keys."
    )
    m = row.metrics
    m.update(workers=0, limits="n/a", requests=lines)
    with run.stack("overhead-submit", _lifted((0.0, 0.0))) as st:
        path = run.logs / "submit.jsonl"
        m["file_mb"] = round(write_batch_file(path, "submit", lines, 100, 16) / MB, 1)
        info0 = st.redis_conn.info("memory")
        db0 = ledger.database_bytes(st.database_url)
        argv = [sys.executable, "-m", "jobs", "submit", str(path), "--name", "bench-submit"]
        with open(run.logs / "submit.log", "wb") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=st.env, stdout=log, stderr=log)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            elapsed = time.perf_counter() - t0
        path.unlink()
        info1 = st.redis_conn.info("memory")
        m["exit_status"] = proc.returncode
        m["elapsed_s"] = round(elapsed, 1)
        m["lines_per_s"] = round(lines / elapsed)
        m["peak_rss_mb"] = round(usage.ru_maxrss * 1024 / MB, 1)
        delta = int(info1["used_memory"]) - int(info0["used_memory"])
        m["redis_used_memory_delta_mb"] = round(delta / MB, 2)
        m["redis_keys_in_db"] = int(st.redis_conn.dbsize())
        m["redis_db_key_bytes_mb"] = round(_redis_bytes_in_db(st.redis_conn) / MB, 2)
        m["postgres_growth_mb"] = round((ledger.database_bytes(st.database_url) - db0) / MB, 1)
        counts = ledger.job_counts(st.database_url)
    m["jobs_stored"] = sum(counts.values())
    row.target("submit exited 0", proc.returncode == 0, f"exit {proc.returncode}")
    row.target("every line stored", m["jobs_stored"] == lines, f"{m['jobs_stored']} jobs")
    rss = float(m["peak_rss_mb"] or 0)
    row.target(f"peak RSS <= {DYNO_MB} MB", rss <= DYNO_MB, f"{rss} MB")
    grown = float(m["redis_db_key_bytes_mb"] or 0)
    row.target("Redis holds <= 5 MB for the backlog", grown <= 5.0, f"{grown} MB")
    elapsed = float(m["elapsed_s"] or 0)
    row.target("submit in < 20 s", 0 < elapsed < 20, f"{elapsed} s")
    return row


#: The web process's memory target while it stores an upload.
WEB_RSS_MB = 300


def web_upload(run: Run) -> Row:
    """``POST /v1/files`` of a big file to ``python -m web``, then ``POST /v1/batches``."""
    lines = 100_000
    row = Row("web-upload", f"Web: uploading a {lines:,}-line batch file")
    row.description = (
        f"The openai SDK's upload path, `POST /v1/files` (multipart) of {lines:,} OpenAI Batch "
        "lines to `python -m web`, streamed with httpx from disk; then `POST /v1/batches` "
        "(answers `validating` at once; no worker runs). Peak RSS = the web process's, "
        "sampled every 50 ms during the upload."
    )
    m = row.metrics
    m.update(workers=0, limits="n/a", requests=lines)
    key = "bench-" + secrets.token_hex(8)
    with run.stack("web-upload", _lifted((0.0, 0.0))) as st:
        path = run.logs / "upload.jsonl"
        size = write_batch_file(path, "upload", lines, 100, 16)
        m["file_mb"] = round(size / MB, 1)
        web = WebProcess(st.env | {"API_KEYS": key}, run.logs / "web.log")
        try:
            web.wait_ready()
            rss0 = procstats.rss_bytes([web.pid])
            peak = [rss0]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.05):
                    peak.append(procstats.rss_bytes([web.pid]))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=web.url, headers=headers, timeout=300) as http:
                t0 = time.perf_counter()
                with path.open("rb") as fh:
                    reply = http.post(
                        "/v1/files", files={"file": ("upload.jsonl", fh)}, data={"purpose": "batch"}
                    )
                m["upload_s"] = round(time.perf_counter() - t0, 1)
                done.set()
                sampler.join()
                stored = reply.json() if reply.status_code == 200 else {}
                t1 = time.perf_counter()
                created = http.post(
                    "/v1/batches",
                    json={
                        "input_file_id": stored.get("id"),
                        "endpoint": "/v1/chat/completions",
                        "completion_window": "24h",
                    },
                )
                m["create_batch_ms"] = round((time.perf_counter() - t1) * 1000)
        finally:
            web.stop(10)
            path.unlink(missing_ok=True)
    m["upload_status"] = reply.status_code
    m["stored_bytes"] = stored.get("bytes")
    m["upload_mb_per_s"] = round(size / MB / max(float(m["upload_s"] or 0), 1e-9), 1)
    m["web_rss_start_mb"] = round(rss0 / MB, 1)
    m["web_peak_rss_mb"] = round(max(peak) / MB, 1)
    m["batch_status"] = created.json().get("status") if created.status_code == 200 else None
    row.target("upload stored whole", m["stored_bytes"] == size, f"{m['stored_bytes']} bytes")
    rss = float(m["web_peak_rss_mb"] or 0)
    row.target(f"web peak RSS < {WEB_RSS_MB} MB", rss < WEB_RSS_MB, f"{rss} MB")
    row.target(
        "batch answered validating", m["batch_status"] == "validating", str(m["batch_status"])
    )
    return row


def _send_times(client: redis.Redis) -> list[tuple[float, int]]:
    """The baseline tasks' send log: (epoch seconds, HTTP status), oldest first."""
    out: list[tuple[float, int]] = []
    for raw in client.lrange(baseline_app.SENDS_KEY, 0, -1):
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        at, status = text.split()
        out.append((float(at), int(status)))
    out.sort()
    return out


def baseline(run: Run) -> Row:
    """Celery's per-worker ``rate_limit`` with 3 workers and no shared throttle.

    Quick mode keeps the real 150 RPM here: Celery's rate limiter on the threads pool
    releases only a few tasks a second per worker, so a 10x ``rate_limit`` would stay under
    a 10x provider limit and show nothing.
    """
    rpm, tpm = BASE_RPM, BASE_TPM
    latency = run.latency(*LATENCY)
    duration = 130.0 if run.quick else 240.0
    count = rpm * math.ceil(duration / 60.0 + 1)
    row = Row("baseline-celery", f'Baseline: Celery rate_limit="{rpm}/m", 3 workers, no throttle')
    row.description = (
        f'bench/baseline_app.py: one task POSTing with httpx, rate_limit="{rpm}/m", Celery '
        f"retry with exponential backoff on 429; {count:,} tasks, 3 worker processes, "
        f"{duration:g} s, real limits in both modes. Sent-per-window comes from the tasks' "
        "own send log."
    )
    m = row.metrics
    m.update(workers=3, limits=limits_text(rpm, tpm), requests=count, elapsed_s=duration)
    m.update(limit_rpm=rpm, limit_tpm=tpm)
    sim = SimSpec(rpm=rpm, tpm=tpm, latency=latency)
    with run.stack("baseline-celery", StackSpec(sim, rpm=rpm, tpm=tpm)) as st:
        # A plain Celery deployment: SIGTERM is Celery's own warm shutdown.
        env = {k: v for k, v in st.env.items() if k != "REMAP_SIGTERM"}
        env["BASELINE_RATE_LIMIT"] = f"{rpm}/m"
        argv = [
            sys.executable, "-m", "celery", "-A", "bench.baseline_app", "worker",
            "--pool", "threads", "--concurrency", "100", "--queues", baseline_app.QUEUE,
            "--without-gossip", "--without-mingle", "--loglevel", "INFO",
        ]  # fmt: skip
        st.start_workers(3, argv=argv, env=env)
        producer = Celery("bench_producer", broker=st.servers.redis_url)
        started = time.time()
        with producer.producer_or_acquire() as pub:
            for i in range(count):
                producer.send_task(
                    baseline_app.TASK_NAME,
                    args=[chat_body("baseline", i, 1000, 200)],
                    queue=baseline_app.QUEUE,
                    producer=pub,
                )
        sleep_until(started + duration)
        record_sim(row, st.simulator)
        sends = _send_times(st.redis_conn)
        producer.close()
    times = [t for t, _ in sends]
    m["sent_logged"] = len(sends)
    m["sent_max_in_window"] = ledger.max_in_window(times, [0] * len(times), 60.0)[0]
    calls = int(m.get("sim_calls") or 0)
    limited = int(m.get("sim_rate_limited") or 0)
    m["sim_429_fraction_pct"] = round(100.0 * limited / calls, 2) if calls else None
    m["admitted_per_min"] = round(float(m.get("sim_ok") or 0) * 60.0 / duration, 1)
    record_sim_targets(row)
    row.notes.append("The baseline has no ledger; its targets are ours, shown for comparison.")
    return row
