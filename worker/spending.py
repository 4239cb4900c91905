"""A job's call against the budgets, for the runner: what the call may cost, and
whether the day's budget and its batch's let it start.

1. :class:`Cost` prices one try of a job: what the throttle reserves (``price``) and
   what a budget counts until the answer (``worst_case``, prompt plus all of
   max_tokens), both from the calibrated estimate, which keeps learning.
2. :func:`look` asks before a throttle turn is taken, binding nothing, so a job that
   must wait for budget leaves the turn to one that may call.
   :func:`cost_of` builds it for a job's checked request.
3. :func:`admit` decides, in the transaction that writes the call's ledger row
   (:func:`begin`): the
   day's budget first (its advisory lock), then the batch's (its row, before the
   job's), recording a pause where one is reached (:mod:`jobs.daily_budget`,
   :mod:`jobs.budget`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from jobs import budget, daily_budget, store
from jobs.budget import Admission, Spend
from jobs.calibration import Calibrator
from jobs.logfmt import log_event
from jobs.settings import Settings
from jobs.store import ClaimedJob, Tx
from jobs.tokens import Script, dominant_script
from jobs.validation import CheckedRequest
from worker.pool import Endpoint
from worker.reported import Usage


@dataclass(frozen=True)
class Cost:
    """One try of ``job``: the raw prompt estimate, the completion budget, and the
    calibrated estimate and answer share, asked again at each use."""

    job: ClaimedJob
    script: Script
    raw_prompt: int
    max_tokens: int
    estimate: Callable[[], int]
    answer_budget: Callable[[], int]
    settings: Settings

    def price(self) -> int:
        """What the throttle reserves for the call."""
        return self.estimate() + self.answer_budget()

    def worst_prompt(self) -> int:
        return max(self.raw_prompt, self.estimate())

    def worst_case(self, worst_prompt: int | None = None) -> Spend:
        """What a budget counts the call at until its answer."""
        prompt = self.worst_prompt() if worst_prompt is None else worst_prompt
        return budget.worst_case(self.job.model, prompt, self.max_tokens, self.settings.price_for)


def cost_of(
    job: ClaimedJob,
    checked: CheckedRequest,
    settings: Settings,
    calibrator: Calibrator | None,
    patient: Callable[[Callable[[], int]], int],
) -> Cost:
    """The job's call as the throttle and the budgets price it. ``patient`` runs a read of
    the calibration through a brief outage."""
    max_tokens = checked.max_tokens or settings.default_max_tokens
    raw_prompt = max(checked.est_prompt_tokens, job.est_prompt_tokens)
    # With the answer's prompt_tokens, the ledger row these go on calibrates the estimate.
    script = dominant_script(job.request)

    def estimate() -> int:
        """Prompt tokens to reserve: the raw estimate, corrected by calibration if any."""
        if calibrator is None:
            return raw_prompt
        return patient(lambda: calibrator.estimate(job.model, script, raw_prompt))

    def answer_budget() -> int:
        """Completion tokens to reserve: all of ``max_tokens`` where the provider charges
        it, else the share recent answers used (``max_tokens`` until that is known)."""
        if settings.tpm_charge != "actual" or calibrator is None:
            return max_tokens
        share = patient(lambda: math.ceil(max_tokens * calibrator.completion_share(job.model)))
        return min(max_tokens, share)

    return Cost(job, script, raw_prompt, max_tokens, estimate, answer_budget, settings)


def charge(settings: Settings, usage: Usage, max_tokens: int) -> int:
    """What an answered call counts in the bucket: what the provider counts in its window."""
    if settings.tpm_charge == "actual":
        return usage.prompt_tokens + usage.completion_tokens
    return usage.prompt_tokens + max_tokens


def needs_look(cost: Cost) -> bool:
    """Only a job of a budgeted batch, or one under a daily budget, asks the database."""
    return cost.job.budgeted or bool(daily_budget.daily(cost.settings))


def look(tx: Tx, cost: Cost, call: Spend) -> Admission:
    """Step 2: would the call, of worst case ``call``, fit now? (Priced before the
    transaction: the calibration may read the database on a connection of its own.)"""
    job, settings = cost.job, cost.settings
    today = daily_budget.admit(tx, settings, call, lock=False)
    if today.verdict != "fits" or job.batch_id is None:
        return today
    return budget.admit(tx, job.batch_id, call, settings.price_for, lock=False)


def admit(tx: Tx, cost: Cost, worst_prompt: int) -> Admission:
    """Step 3: may the call start? The caller writes its ledger row in ``tx`` if so."""
    job, settings = cost.job, cost.settings
    call = cost.worst_case(worst_prompt)
    today = daily_budget.admit(tx, settings, call)
    if today.verdict == "paused" and today.reason is not None:
        daily_budget.record_pause(settings, today.reason)
        log_event("daily_budget_spent", reason=today.reason)
    if today.verdict != "fits" or job.batch_id is None:
        return today
    admission = budget.admit(tx, job.batch_id, call, settings.price_for)
    reason = admission.reason or ""
    if admission.verdict == "paused" and store.pause_batch(tx, job.batch_id, reason):
        log_event("batch_paused", batch=job.batch_id, reason=reason)
    return admission


def begin(
    cost: Cost, worst_prompt: int, endpoint: Endpoint, tx: Tx, *, lease_s: float
) -> int | Admission | None:
    """The call's ledger row and its attempt number, if the budgets let it start
    (:func:`admit`, in the same transaction); else their verdict. ``None``: the job is no
    longer running. ``worst_prompt`` is priced before the transaction, as for :func:`look`."""
    admission = admit(tx, cost, worst_prompt)
    if admission.verdict != "fits":
        return admission
    return store.begin_attempt(
        tx,
        cost.job.id,
        lease_s=lease_s,
        est_prompt_tokens=cost.raw_prompt,
        script=cost.script,
        max_tokens=cost.max_tokens,
        worst_prompt_tokens=worst_prompt,
        attachment=endpoint.alias,
        key_hash=endpoint.key_hash,
    )
