"""Shared measurement steps: simulator totals, ledger admission rates, targets, waiting."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import sqlalchemy.exc

from bench import ledger
from bench.rows import Row
from bench.stack import Charge, SimulatorProcess
from jobs import api

#: Steady state must reach this share of the binding limit.
STEADY_TARGET_PCT = 98.0
#: A batch may take this much longer than the ideal schedule.
BATCH_TIME_SLACK = 1.03
WINDOW_S = 60.0


MB = 1024 * 1024
#: Simulator counters that together count every call whose answer is settled (written to
#: its client, or not because the client was gone); the rest are still being answered.
ANSWERED_COUNTERS = ("delivered", "cut")


def sim_in_flight(stats: dict[str, int]) -> int:
    """Calls the simulator is still answering, from its ``/stats``."""
    return stats["calls"] - sum(stats[k] for k in ANSWERED_COUNTERS)


def limits_text(rpm: int | None, tpm: int | None) -> str:
    rpm_text = f"{rpm:,} RPM" if rpm is not None else "no RPM limit"
    tpm_text = f"{tpm:,} TPM" if tpm is not None else "no TPM limit"
    return f"{rpm_text} / {tpm_text}"


def processes(workers: int) -> str:
    """``"1 worker process"``, ``"3 worker processes"``: row titles and descriptions."""
    return f"{workers} worker process" + ("es" if workers != 1 else "")


def record_sim(
    row: Row, sim: SimulatorProcess, before: dict[str, int] | None = None
) -> dict[str, int]:
    """Copy the simulator's ``/stats`` into the row as ``sim_*`` (minus ``before`` if given)."""
    stats = sim.stats()
    for key, value in stats.items():
        since = 0 if before is None or key.startswith("max_") else before.get(key, 0)
        row.metrics[f"sim_{key}"] = value - since
    return stats


def wait_batch(batch: api.BatchHandle, timeout: float, row: Row, stall_s: float = 180.0) -> bool:
    """Wait for a batch to finish; False (with a note in the row) on timeout or a stall.

    A stall is ``stall_s`` seconds without a single job finishing: a broken build should
    fail its row in minutes, not hold the run for the whole time limit.
    """
    start = time.monotonic()
    last_done, last_change = -1, start
    while True:
        progress = batch.progress()
        now = time.monotonic()
        if progress.finished and progress.running == 0:
            return True
        if progress.done != last_done:
            last_done, last_change = progress.done, now
        if now - last_change > stall_s:
            row.notes.append(
                f"batch {batch.id} stalled: no job finished for {stall_s:.0f} s "
                f"({progress.done} of {progress.total} done)"
            )
            return False
        if now - start > timeout:
            row.notes.append(f"batch {batch.id} had not finished after {timeout:.0f} s")
            return False
        time.sleep(1.0)


def cancel(batch: api.BatchHandle, row: Row) -> int:
    """Cancel a batch's queued jobs, retrying a failed cancel (noted in the row)."""
    for attempt in range(1, 4):
        try:
            return batch.cancel()
        except sqlalchemy.exc.OperationalError as exc:
            row.notes.append(f"cancel of batch {batch.id} failed (try {attempt}): {exc.orig!r}")
            time.sleep(0.5 * attempt)
    return 0


def sleep_until(deadline: float) -> None:
    """Sleep until ``time.time()`` reaches ``deadline``."""
    while (left := deadline - time.time()) > 0:
        time.sleep(min(left, 1.0))


def charged(call: ledger.Call, charge: Charge, max_tokens: int) -> int:
    """Tokens the simulator charged for an admitted call."""
    if charge == "reserve":
        return call.prompt_tokens + max_tokens
    return call.total_tokens


@dataclass(frozen=True)
class Admissions:
    """The ledger's admission timeline and what it says about pace."""

    times: list[float]
    costs: list[int]
    binding_calls: int
    binding_is_tpm: bool

    @property
    def mean_cost(self) -> float:
        return statistics.fmean(self.costs) if self.costs else 0.0


def admissions(
    calls: list[ledger.Call], charge: Charge, max_tokens: int, rpm: int, tpm: int
) -> Admissions:
    """Admitted calls (HTTP 200) with their charged tokens, and the binding limit in calls."""
    ok = [c for c in calls if c.status == 200]
    costs = [charged(c, charge, max_tokens) for c in ok]
    mean = statistics.fmean(costs) if costs else 1.0
    by_tokens = math.floor(tpm / mean) if mean > 0 else rpm
    return Admissions(
        times=[c.started for c in ok],
        costs=costs,
        binding_calls=max(1, min(rpm, by_tokens)),
        binding_is_tpm=by_tokens < rpm,
    )


def record_pace(row: Row, adm: Admissions, calls: list[ledger.Call], rpm: int, tpm: int) -> None:
    """Steady-state pace, busiest windows and 429s from the ledger; headline into the row.

    The headline ``steady_pct_of_binding`` is the mean of the aligned 60 s windows after the
    first (tokens against TPM when tokens bind, else calls against RPM). A run too short for
    one such window falls back to the stride estimate: the median time between admission
    ``i - L`` and ``i`` (``L`` = calls one window allows), which a saturated strict window
    keeps at exactly 60 s.
    """
    m = row.metrics
    m["binding_limit"] = "TPM" if adm.binding_is_tpm else "RPM"
    m["binding_calls_per_window"] = adm.binding_calls
    m["ledger_admitted"] = len(adm.times)
    m["ledger_mean_charged_tokens"] = round(adm.mean_cost, 1)
    m["ledger_rate_limited"] = sum(1 for c in calls if c.status == 429)
    m["ledger_other_errors"] = sum(1 for c in calls if c.status not in (200, 429))
    most_calls, most_tokens = ledger.max_in_window(adm.times, adm.costs, WINDOW_S)
    m["ledger_max_admitted_in_window"] = most_calls
    m["ledger_max_tokens_in_window"] = most_tokens
    sent = [c.started for c in calls]
    m["ledger_max_sent_in_window"] = ledger.max_in_window(sent, [0] * len(sent), WINDOW_S)[0]
    windows = ledger.steady_windows(adm.times, adm.costs, WINDOW_S)
    m["steady_windows"] = len(windows)
    m["steady_calls_per_window"] = ", ".join(str(n) for n, _ in windows) or None
    m["steady_tokens_per_window"] = ", ".join(f"{t:,}" for _, t in windows) or None
    period = ledger.stride_period(adm.times, adm.binding_calls)
    stride_pct = None if period is None else round(100.0 * WINDOW_S / period, 1)
    m["stride_period_s"] = None if period is None else round(period, 2)
    m["stride_pct_of_binding"] = stride_pct
    if windows:
        if adm.binding_is_tpm:
            pct = 100.0 * statistics.fmean(t for _, t in windows) / tpm
        else:
            pct = 100.0 * statistics.fmean(n for n, _ in windows) / rpm
        m["steady_pct_of_binding"] = round(pct, 1)
        m["steady_method"] = "aligned 60 s windows after the first"
    else:
        m["steady_pct_of_binding"] = stride_pct
        m["steady_method"] = "stride median (run shorter than two windows)"
    headline = m["steady_pct_of_binding"]
    row.target(
        f"steady state >= {STEADY_TARGET_PCT:g}% of the binding limit",
        isinstance(headline, float) and headline >= STEADY_TARGET_PCT,
        f"{headline}%" if headline is not None else "not measurable",
    )


def record_sim_targets(row: Row) -> None:
    """The two targets every saturating row has: no 429 and no body paid twice."""
    limited = row.metrics.get("sim_rate_limited")
    dupes = row.metrics.get("sim_duplicate_bodies")
    row.target("no 429 from the provider", limited == 0, f"{limited} answered 429")
    row.target("no body paid twice", dupes == 0, f"{dupes} duplicate bodies")


def seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
