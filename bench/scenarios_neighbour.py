"""A good neighbour on a shared key: our batch and another client that retries its 429s.

Our batch starts first; ``START_AFTER`` seconds later the other client sends a fifth of the
request limit, evenly spaced, and retries each 429 after the reset it was given, up to five
tries (:class:`bench.loads.PacedClient`). Everything is judged over ``MEASURE`` seconds that
begin ``SETTLE`` seconds after the other client started, from the simulator's own call log,
which sees both clients on one clock:

- the other client's refused attempts (a retry is an attempt);
- our refused calls;
- both clients' admitted calls per window, against the limit, while our backlog lasts.

The second row sends no ``x-ratelimit-*`` headers: only 429s tell anyone that the key is
shared, and the other client falls back to the ``openai`` SDK's backoff.
"""

from __future__ import annotations

import math
import time

from bench import ledger
from bench.loads import Attempt, PacedClient, bodies
from bench.measure import limits_text, processes, record_sim, sleep_until
from bench.rows import Row
from bench.scenarios_rate import BASE_RPM, BASE_TPM, LATENCY
from bench.stack import Run, SimSpec, StackSpec
from jobs import api

#: The other client's share of the request limit.
OTHER_SHARE = 0.2
#: Attempts the other client makes per request, the first included.
OTHER_TRIES = 5
#: Its ``user`` field, which the simulator's call log keeps.
OTHER_MARKER = "other-client"
#: Targets over the measured span.
OTHER_REFUSED_MAX_PCT = 5.0
OURS_REFUSED_MAX_PCT = 1.0
TOGETHER_MIN_PCT = 95.0


def _spans(quick: bool) -> tuple[float, float, float]:
    """(start after, settle, measure) in seconds."""
    return (15.0, 60.0, 60.0) if quick else (30.0, 120.0, 180.0)


def neighbour(run: Run, workers: int, headers: bool = True) -> Row:
    """Our saturating batch, and another client on the key from ``START_AFTER`` s on."""
    rpm, tpm = BASE_RPM * run.scale, BASE_TPM * run.scale
    latency = run.latency(*LATENCY)
    other_rpm = round(OTHER_SHARE * rpm)
    start_after, settle, measure = _spans(run.quick)
    total = start_after + settle + measure
    # Enough for the whole run at the full limit, so that the backlog outlasts it.
    count = rpm * math.ceil(total / 60.0 + 1)
    name = f"neighbour{'' if headers else '-noheaders'}-w{workers}"
    title = "Shared key, the other client retrying its 429s"
    if not headers:
        title += ", no rate-limit headers"
    row = Row(name, f"{title}, {processes(workers)}")
    row.description = (
        f"A saturating batch of {count:,} jobs (250-token prompts); {start_after:g} s later "
        f"another client on the same key sends {other_rpm} requests/min "
        f"({OTHER_SHARE:.0%} of the limit), evenly spaced, and retries each 429 after "
        + (
            "the reset it was given"
            if headers
            else "the openai SDK's backoff (the provider sends no x-ratelimit-* headers)"
        )
        + f", up to {OTHER_TRIES} tries. Measured over {measure:g} s from {settle:g} s after "
        "it started, from the simulator's call log; a refused retry counts as a refused "
        "attempt."
    )
    m = row.metrics
    m.update(workers=workers, limits=limits_text(rpm, tpm), requests=count)
    m.update(limit_rpm=rpm, limit_tpm=tpm, elapsed_s=total, other_client_rpm=other_rpm)
    sim = SimSpec(rpm=rpm, tpm=tpm, latency=latency, ratelimit_headers=headers)
    with run.stack(name, StackSpec(sim, rpm=rpm, tpm=tpm)) as st:
        st.start_workers(workers)
        other = PacedClient(
            st.simulator.url, st.key, other_rpm, 250, latency[1],
            tries=OTHER_TRIES, marker=OTHER_MARKER,
        )  # fmt: skip
        api.submit_batch(bodies("neighbour", count, 250, 100), settings=st.settings)
        sleep_until(time.time() + start_after)
        other.start()
        begin = time.monotonic() + settle
        end = begin + measure
        sleep_until(time.time() + settle + measure)
        other.stop()
        record_sim(row, st.simulator)
        sim_calls = st.simulator.calls()
        backlog_left = ledger.job_counts(st.database_url).get("queued", 0)
    judge(row, sim_calls, other.attempts, begin, end, rpm, headers=headers)
    m["ours_backlog_left_at_end"] = backlog_left
    return row


def judge(
    row: Row,
    sim_calls: list[dict[str, object]],
    attempts: list[Attempt],
    begin: float,
    end: float,
    rpm: int,
    *,
    headers: bool,
) -> None:
    """Fill the row's metrics and targets for the span ``[begin, end)`` (monotonic)."""
    m = row.metrics
    ours = [c for c in sim_calls if c.get("marker") != OTHER_MARKER]
    span_ours = [c for c in ours if begin <= _float(c["arrived_at"]) < end]
    ours_refused = sum(1 for c in span_ours if c["status"] == 429)
    span_other = [a for a in attempts if begin <= a.at < end]
    other_refused = sum(1 for a in span_other if a.status == 429)
    other_admitted = sum(1 for a in span_other if a.status == 200)
    minutes = (end - begin) / 60.0
    m["other_attempts"] = len(span_other)
    m["other_requests_sent"] = sum(1 for a in span_other if a.try_number == 1)
    m["other_refused"] = other_refused
    m["other_refused_pct"] = _pct(other_refused, len(span_other))
    m["other_admitted_per_min"] = round(other_admitted / minutes, 1)
    m["other_gave_up"] = sum(
        1 for a in span_other if a.status == 429 and a.try_number == OTHER_TRIES
    )
    m["other_transport_errors"] = sum(1 for a in span_other if a.status is None)
    m["ours_calls"] = len(span_ours)
    m["ours_refused"] = ours_refused
    m["ours_refused_pct"] = _pct(ours_refused, len(span_ours))
    m["ours_refused_whole_run"] = sum(1 for c in ours if c["status"] == 429)
    admitted = sorted(
        _float(c["admitted_at"]) for c in sim_calls if c.get("admitted_at") is not None
    )
    windows = [
        sum(1 for t in admitted if begin + k * 60.0 <= t < begin + (k + 1) * 60.0)
        for k in range(int((end - begin) // 60.0))
    ]
    together = 100.0 * sum(windows) / (len(windows) * rpm) if windows else None
    m["together_admitted_per_window"] = ", ".join(str(n) for n in windows) or None
    m["together_pct_of_limit"] = None if together is None else round(together, 1)
    if headers:
        row.target(
            f"the other client: <= {OTHER_REFUSED_MAX_PCT:g}% of its attempts refused",
            _below(m["other_refused_pct"], OTHER_REFUSED_MAX_PCT, inclusive=True),
            f"{m['other_refused_pct']}% ({other_refused} of {len(span_other)})",
        )
    row.target(
        f"ours: < {OURS_REFUSED_MAX_PCT:g}% of our calls refused",
        _below(m["ours_refused_pct"], OURS_REFUSED_MAX_PCT, inclusive=False),
        f"{m['ours_refused_pct']}% ({ours_refused} of {len(span_ours)})",
    )
    if headers:
        row.target(
            f"together >= {TOGETHER_MIN_PCT:g}% of the limit",
            together is not None and together >= TOGETHER_MIN_PCT,
            f"{m['together_pct_of_limit']}% ({m['together_admitted_per_window']} a window)",
        )


def _float(value: object) -> float:
    assert isinstance(value, int | float)
    return float(value)


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def _below(value: object, limit: float, *, inclusive: bool) -> bool:
    if not isinstance(value, float):
        return False
    return value <= limit if inclusive else value < limit
