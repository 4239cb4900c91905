"""The daily budget: what the deployment may spend per UTC day, every job together.

``DAILY_BUDGET_TOKENS`` and ``DAILY_BUDGET_USD`` (:class:`jobs.settings.Settings`) work
as a batch's budget does (:mod:`jobs.budget`), over every call since the UTC day began
by ``Settings.clock``:

1. before a call's ledger row is written, :func:`admit` takes a transaction-scoped
   advisory lock, so admissions in every process take their turn, and adds the call's
   worst case to the day's spend; it fits, or waits while calls on the wire may free
   some, or, with nothing left to free, the day is spent;
2. a spent day is recorded in Redis (:data:`~jobs.constants.DAILY_PAUSE_KEY`), as the
   key circuit records a rejected key: the dispatcher publishes nothing, workers hand
   back the jobs they hold, and ``enqueue`` refuses at once (:func:`refuse`);
3. the record names its day and the limits it was reached under: the next UTC day, or
   a raised limit (a config var change restarts the dynos), ends the pause.
"""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import func, select

from jobs.budget import FITS, Admission, Budget, Spend, on_the_wire, spend_where, spent_words
from jobs.connections import shared_redis
from jobs.constants import DAILY_PAUSE_KEY
from jobs.settings import Settings
from jobs.store.tables import Tx
from jobs.store.tables import attempts_table as _attempts

#: The advisory lock every admission under a daily budget takes (any fixed 64-bit number).
ADMISSION_LOCK = 0x6269_6461_696C_79
#: A pause record outlives its day by this much, then Redis drops it.
RECORD_TTL_S = 2 * 24 * 3600


class DailyBudgetError(Exception):
    """The deployment's daily budget is spent: nothing is called until the next UTC day."""


def daily(settings: Settings) -> Budget:
    return Budget(settings.daily_budget_tokens, settings.daily_budget_usd)


def day_start(settings: Settings) -> dt.datetime:
    now = settings.clock().astimezone(dt.UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def spent_today(session: Tx, settings: Settings) -> Spend:
    since = _attempts.c.started_at >= day_start(settings)
    return spend_where(session, since, settings.price_for)


def admit(session: Tx, settings: Settings, call: Spend, *, lock: bool = True) -> Admission:
    """May a call of worst case ``call`` start today? Step 1 of the module docstring.
    ``lock=False``: a look that binds nothing (:func:`jobs.budget.admit`)."""
    budget = daily(settings)
    if not budget:
        return FITS
    alone = budget.exceeded_by(call)
    if alone is not None:
        return Admission("too_large", f"one call of it may take {alone} (DAILY_BUDGET_*)")
    if lock:
        session.execute(select(func.pg_advisory_xact_lock(ADMISSION_LOCK)))
    spent = spent_today(session, settings)
    over = budget.exceeded_by(spent + call)
    if over is None:
        return FITS
    if on_the_wire(session, _attempts.c.started_at >= day_start(settings)):
        return Admission("wait", over)
    day = day_start(settings)
    return Admission(
        "paused",
        f"daily budget reached: {spent_words(spent, budget)} spent on {day:%Y-%m-%d} (UTC) "
        f"of {budget.describe()}; calls resume at 00:00 UTC or when DAILY_BUDGET_* is raised",
    )


def record_pause(settings: Settings, reason: str) -> None:
    """Step 2: the day is spent, for every process."""
    assert settings.redis_url is not None
    budget = daily(settings)
    record = {
        "day": f"{day_start(settings):%Y-%m-%d}",
        "tokens": budget.tokens,
        "usd": budget.usd,
        "reason": reason,
    }
    shared_redis(settings.redis_url).set(DAILY_PAUSE_KEY, json.dumps(record), ex=RECORD_TTL_S)


def pause_reason(settings: Settings) -> str | None:
    """Why nothing is called today, or ``None``: step 3 of the module docstring."""
    budget = daily(settings)
    if not budget:
        return None
    assert settings.redis_url is not None
    raw = shared_redis(settings.redis_url).get(DAILY_PAUSE_KEY)
    if raw is None:
        return None
    record = json.loads(raw)
    if record["day"] != f"{day_start(settings):%Y-%m-%d}":
        return None
    if _raised(record.get("tokens"), budget.tokens) or _raised(record.get("usd"), budget.usd):
        return None
    reason: str = record["reason"]
    return reason


def _raised(then: float | None, now: float | None) -> bool:
    """A limit the day was spent under is higher now, or gone."""
    return then is not None and (now is None or now > then)


def refuse(settings: Settings, call: Spend) -> None:
    """``enqueue``'s check: raise :class:`DailyBudgetError` at once on a spent day, or
    for a call of worst case ``call`` that alone may take more than a day's budget."""
    reason = pause_reason(settings)
    if reason is not None:
        raise DailyBudgetError(reason)
    alone = daily(settings).exceeded_by(call)
    if alone is not None:
        raise DailyBudgetError(
            f"this request may take {alone} (DAILY_BUDGET_*): lower its max_tokens"
        )
