"""Scenarios of a pool of attachments: several keys, each its own simulator and limits.

* ``pool-2x150``: the same RPM-bound batch on one key, then on two of 150 RPM each.
* ``pool-mixed``: three keys of 150, 200 and 250 RPM, each held at its own limit.
* ``pool-401``: two keys, one rejected (401) a window into the batch; the batch ends on
  the other, and nothing is lost.

Each simulator enforces its own key's limits, so a 429 of any of them is ours. Quick
mode multiplies limits by 10 and divides latencies by 10, as the other rows do.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

from bench import ledger
from bench.loads import bodies
from bench.measure import processes, record_sim_targets, seconds, wait_batch
from bench.rows import Row
from bench.scenarios_rate import BASE_TPM, LATENCY
from bench.stack import Attached, Run, SimSpec, Stack, StackSpec
from jobs import api

#: Each call costs 1,000 prompt + 200 completion tokens reserved: requests bind.
PROMPT_TOKENS, MAX_TOKENS = 1000, 200
#: The share of its own limit each key holds in the steady windows.
STEADY_TARGET_PCT = 98.0
#: The pool's batch time over the single key's, at most (two keys: ideally 0.5).
POOL_RATIO_TARGET = 0.52
#: After this many seconds of the batch, the second key is rejected (pool-401).
REJECT_AFTER_S = 60.0


def _spec(run: Run, rpms: list[int]) -> StackSpec:
    """A stack whose attachments have ``rpms`` (INFERENCE first), each on its simulator."""
    scaled = [r * run.scale for r in rpms]
    tpm = BASE_TPM * run.scale
    latency = run.latency(*LATENCY)

    def sim(rpm: int) -> SimSpec:
        return SimSpec(rpm=rpm, tpm=tpm, latency=latency)

    others = tuple(Attached(sim(r), rpm=r, tpm=tpm) for r in scaled[1:])
    # The default WORKER_CONCURRENCY and dispatch window, which follow the pool's rpm.
    return StackSpec(sim(scaled[0]), rpm=scaled[0], tpm=tpm, pool=others)


def _run_batch(
    st: Stack, row: Row, name: str, count: int, workers: int
) -> tuple[float | None, int]:
    """Submit ``count`` requests at once to ``workers`` processes; the batch's time and id."""
    st.start_workers(workers)
    payload = bodies(name, count, PROMPT_TOKENS, MAX_TOKENS)
    batch = api.submit_batch(payload, name=name, settings=st.settings)
    wait_batch(batch, 60.0 * (count / 100 + 4), row, stall_s=240.0)
    created, finished = ledger.batch_span(st.database_url, batch.id)
    return (None if finished is None else finished - created), batch.id


def _per_key(row: Row, st: Stack, rpms: dict[str, int]) -> None:
    """Each key's steady windows against its own limit, its calls and its 429s."""
    calls = ledger.calls(st.database_url)
    m = row.metrics
    for alias, rpm in rpms.items():
        mine = [c for c in calls if c.attachment == alias and c.status == 200]
        times = [c.started for c in mine]
        windows = ledger.steady_windows(times, [0] * len(times))
        key = alias.lower()
        m[f"{key}_calls"] = len(mine)
        m[f"{key}_steady_calls_per_window"] = ", ".join(str(n) for n, _ in windows) or None
        pct = round(100.0 * statistics.fmean(n for n, _ in windows) / rpm, 1) if windows else None
        m[f"{key}_steady_pct_of_rpm"] = pct
        m[f"{key}_sim_rate_limited"] = st.sims[alias].stats()["rate_limited"]
        row.target(
            f"{alias} steady >= {STEADY_TARGET_PCT:g}% of its {rpm} RPM",
            pct is not None and pct >= STEADY_TARGET_PCT,
            f"{pct}%" if pct is not None else "not measurable (under two windows)",
        )
    held = [m[f"{a.lower()}_steady_pct_of_rpm"] for a in rpms]
    # The summary's column: the key held least.
    m["steady_pct_of_binding"] = min((p for p in held if isinstance(p, float)), default=None)
    limited = sum(st.sims[a].stats()["rate_limited"] for a in rpms)
    dupes = sum(st.sims[a].stats()["duplicate_bodies"] for a in rpms)
    m["sim_rate_limited"] = limited
    m["sim_duplicate_bodies"] = dupes
    m["sim_calls"] = sum(st.sims[a].stats()["calls"] for a in rpms)
    counts = ledger.job_counts(st.database_url)
    m["jobs_succeeded"] = counts.get("succeeded", 0)
    m["jobs_failed"] = counts.get("failed", 0)


def two_keys(run: Run, workers: int) -> Row:
    """The same batch on one key of 150 RPM and on two; the pool's time over the one's."""
    name = f"pool-2x150-w{workers}"
    row = Row(name, f"Two keys of 150 RPM against one, {processes(workers)}")
    count = 1500
    rpm = 150 * run.scale
    row.description = (
        f"{count:,} jobs of ~{PROMPT_TOKENS:,} prompt tokens, max_tokens {MAX_TOKENS}, latency "
        f"{LATENCY[0] / run.scale:g}-{LATENCY[1] / run.scale:g} s, submitted at once: first "
        f"to one attachment of {rpm} RPM, then to INFERENCE_POOL=INFERENCE,INFERENCE_2 of "
        f"{rpm} RPM each (two simulators, two keys)."
    )
    m = row.metrics
    m.update(workers=workers, limits=f"2 x {rpm} RPM", requests=count)
    with run.stack(f"{name}-single", _spec(run, [150])) as st:
        single, _ = _run_batch(st, row, f"{name}-single", count, workers)
    m["single_key_elapsed_s"] = seconds(single)
    with run.stack(name, _spec(run, [150, 150])) as st:
        pooled, _ = _run_batch(st, row, name, count, workers)
        _per_key(row, st, {"INFERENCE": rpm, "INFERENCE_2": rpm})
    m["elapsed_s"] = seconds(pooled)
    if single and pooled:
        ratio = round(pooled / single, 3)
        m["pool_vs_single_key"] = ratio
        row.target(
            f"two keys take <= {POOL_RATIO_TARGET} x one key's time",
            ratio <= POOL_RATIO_TARGET,
            f"{pooled:.1f} s vs {single:.1f} s",
        )
    else:
        row.target("both batches finished", False, f"single {single}, pool {pooled}")
    record_sim_targets(row)
    row.target("every job succeeded", m["jobs_succeeded"] == count, str(m["jobs_succeeded"]))
    return row


def mixed_keys(run: Run, workers: int) -> Row:
    """Three keys of 150, 200 and 250 RPM: each held at its own limit."""
    name = f"pool-mixed-w{workers}"
    row = Row(name, f"Three keys of 150, 200 and 250 RPM, {processes(workers)}")
    rpms = [150, 200, 250]
    windows = 2 if run.quick else 5
    count = sum(rpms) * run.scale * windows
    row.description = (
        f"{count:,} jobs of ~{PROMPT_TOKENS:,} prompt tokens, max_tokens {MAX_TOKENS}, "
        f"submitted at once to a pool of three attachments of "
        f"{', '.join(str(r * run.scale) for r in rpms)} RPM (three simulators), "
        f"{windows} windows of the pool's limit."
    )
    m = row.metrics
    m.update(workers=workers, limits=" + ".join(f"{r * run.scale}" for r in rpms) + " RPM")
    m["requests"] = count
    with run.stack(name, _spec(run, rpms)) as st:
        elapsed, _ = _run_batch(st, row, name, count, workers)
        aliases = st.spec.aliases
        _per_key(row, st, {a: r * run.scale for a, r in zip(aliases, rpms, strict=True)})
    m["elapsed_s"] = seconds(elapsed)
    record_sim_targets(row)
    row.target("every job succeeded", m["jobs_succeeded"] == count, str(m["jobs_succeeded"]))
    return row


def rejected_key(run: Run, workers: int) -> Row:
    """Two keys of 150 RPM; the second is rejected (401) a window into the batch."""
    name = f"pool-401-w{workers}"
    row = Row(name, f"Two keys, one rejected mid-batch, {processes(workers)}")
    rpm = 150 * run.scale
    count = 600 * run.scale // (5 if run.quick else 1)
    after = REJECT_AFTER_S / run.scale
    row.description = (
        f"{count:,} jobs submitted at once to INFERENCE_POOL=INFERENCE,INFERENCE_2 of {rpm} "
        f"RPM each; {after:g} s in, INFERENCE_2's simulator answers every call 401 "
        "(its key revoked) until the end."
    )
    m = row.metrics
    m.update(workers=workers, limits=f"2 x {rpm} RPM", requests=count)
    with run.stack(name, _spec(run, [150, 150])) as st:
        st.start_workers(workers)
        payload = bodies(name, count, PROMPT_TOKENS, MAX_TOKENS)
        batch = api.submit_batch(payload, name=name, settings=st.settings)
        time.sleep(after)
        st.sims["INFERENCE_2"].outage(86_400.0, 401)
        m["rejected_at_s"] = round(after, 1)
        wait_batch(batch, 60.0 * (count / 150 + 4), row, stall_s=240.0)
        created, finished = ledger.batch_span(st.database_url, batch.id)
        calls = ledger.calls(st.database_url)
        statuses = Counter((c.attachment, c.status) for c in calls)
        m["inference_ok"] = statuses[("INFERENCE", 200)]
        m["inference_2_ok"] = statuses[("INFERENCE_2", 200)]
        m["inference_2_rejected"] = statuses[("INFERENCE_2", 401)]
        m["sim_rate_limited"] = sum(s.stats()["rate_limited"] for s in st.sims.values())
        m["sim_duplicate_bodies"] = sum(s.stats()["duplicate_bodies"] for s in st.sims.values())
        counts = ledger.job_counts(st.database_url)
    m["elapsed_s"] = seconds(None if finished is None else finished - created)
    m["jobs_succeeded"] = counts.get("succeeded", 0)
    m["jobs_failed"] = counts.get("failed", 0)
    answered = Counter(c.job_id for c in calls if c.status == 200)
    row.target(
        "the batch finished on the other key, every job answered once",
        counts.get("succeeded", 0) == count
        and len(answered) == count
        and set(answered.values()) == {1},
        str(counts),
    )
    row.target(
        "the rejected key's calls stopped",
        m["inference_2_rejected"] is not None and 0 < int(m["inference_2_rejected"] or 0) < 20,
        f"{m['inference_2_rejected']} rejected calls",
    )
    record_sim_targets(row)
    return row
