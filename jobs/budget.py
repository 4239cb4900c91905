"""Budgets: a batch never starts a call that could take it past what it may spend.

1. A batch's budget is a number of tokens, of dollars, or both
   (``batches.budget_tokens`` / ``budget_usd``); dollars need the model's price.
2. Its spend is read from the ledger: a call the provider answered counts the usage it
   reported; a call without an answer (in flight, lost with its worker, timed out)
   counts its worst case, ``worst_prompt_tokens`` plus ``max_tokens``.
3. Before a call's ledger row is written, :func:`admit` locks the batch row, so workers
   in every process take their turn, and adds the call's worst case to the spend:
   - it fits: the row is written in the same transaction, and counts from then on;
   - it does not, and calls of the batch are still on the wire: the job waits for their
     answers to free what they reserved beyond what they used;
   - it does not, and nothing can free more: the batch pauses, its reason on the
     batch row (:func:`jobs.store.pause_batch`), and its jobs stay queued;
   - it never could, alone (the budget was lowered below it): its job fails,
     ``over_budget``.
4. Raising the budget (:func:`jobs.store.set_budget`) clears the pause.

So the spend recorded never exceeds the budget, and a paused batch has spent at least
its budget minus the worst case of the call that did not fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import ColumnElement, and_, case, func, select

from jobs.batchfile import BatchItem
from jobs.pricing import NO_PRICE, Price, dollars
from jobs.store.tables import Tx
from jobs.store.tables import attempts_table as _attempts
from jobs.store.tables import batches_table as _batches
from jobs.store.tables import jobs_table as _jobs
from jobs.validation import ValidationError

PriceFor = Callable[[str], Price | None]


@dataclass(frozen=True)
class Spend:
    """Tokens and, where every model involved has a price, dollars."""

    tokens: int = 0
    usd: float | None = 0.0

    def __add__(self, other: Spend) -> Spend:
        usd = None if self.usd is None or other.usd is None else self.usd + other.usd
        return Spend(self.tokens + other.tokens, usd)

    @classmethod
    def of(cls, model: str, prompt: int, completion: int, price_for: PriceFor) -> Spend:
        price = price_for(model)
        return cls(prompt + completion, price.usd(prompt, completion) if price else None)


@dataclass(frozen=True)
class Budget:
    """What a batch may spend: tokens, dollars, or both (``None``: no limit of that kind)."""

    tokens: int | None = None
    usd: float | None = None

    @classmethod
    def parse(
        cls,
        tokens: object = None,
        usd: object = None,
        *,
        names: tuple[str, str] = ("budget_tokens", "budget_usd"),
    ) -> Budget:
        """From CLI flags, API arguments or a batch's metadata (strings there), ``None``
        or ``""`` for no limit. Raises :class:`ValidationError` naming the bad one by
        its name in ``names``."""
        count = _number(names[0], tokens, int)
        return cls(None if count is None else int(count), _number(names[1], usd, float))

    def __bool__(self) -> bool:
        return self.tokens is not None or self.usd is not None

    def exceeded_by(self, spend: Spend) -> str | None:
        """Which limit ``spend`` goes past, in words, or ``None`` within both."""
        if self.tokens is not None and spend.tokens > self.tokens:
            return f"{spend.tokens:,} tokens of a budget of {self.tokens:,}"
        if self.usd is not None:
            if spend.usd is None:
                return f"a dollar budget without a price ({NO_PRICE})"
            if spend.usd > self.usd:
                return f"{dollars(spend.usd)} of a budget of {dollars(self.usd)}"
        return None

    def describe(self) -> str:
        parts = []
        if self.tokens is not None:
            parts.append(f"{self.tokens:,} tokens")
        if self.usd is not None:
            parts.append(dollars(self.usd))
        return " and ".join(parts) or "none"


def _number(name: str, value: object, kind: type[int] | type[float]) -> int | float | None:
    if value is None or value == "":
        return None
    try:
        number = kind(value) if isinstance(value, (str, int, float)) else None
    except ValueError:
        number = None
    if isinstance(value, bool) or number is None or not math.isfinite(number):
        what = "a whole number of tokens" if kind is int else "a number of US dollars"
        raise ValidationError(f"must be {what}, got {value!r}", field=name)
    if number <= 0:
        raise ValidationError(f"must be above 0, got {value!r}", field=name)
    return number


def worst_case(model: str, prompt_tokens: int, max_tokens: int, price_for: PriceFor) -> Spend:
    """The most one call may cost: its prompt estimate plus its whole ``max_tokens``."""
    return Spend.of(model, prompt_tokens, max_tokens, price_for)


def check_items(
    items: Iterable[BatchItem], budget: Budget, default_max_tokens: int, price_for: PriceFor
) -> Iterator[BatchItem]:
    """``items``, each checked to fit ``budget`` alone: one that never could fails its line.

    A dollar budget needs a price for every model the batch names.
    """
    for item in items:
        request = item.request
        worst = worst_case(
            request.model,
            request.est_prompt_tokens,
            request.max_tokens or default_max_tokens,
            price_for,
        )
        if budget.usd is not None and worst.usd is None:
            raise ValidationError(
                f"a dollar budget needs a price for {request.model}: set "
                "INFERENCE_PRICE_INPUT and INFERENCE_PRICE_OUTPUT (USD per million tokens)",
                line=item.line,
                field="body.model",
            )
        over = budget.exceeded_by(worst)
        if over is not None:
            raise ValidationError(
                f"one call of it may take {over}: raise the budget or lower max_tokens",
                line=item.line,
                field="body.max_tokens",
            )
        yield item


def spend(session: Tx, batch_id: int, price_for: PriceFor) -> Spend:
    """What a batch has spent by the ledger, each unanswered call at its worst case."""
    return spend_where(session, _jobs.c.batch_id == batch_id, price_for)


def spend_where(session: Tx, which: ColumnElement[bool], price_for: PriceFor) -> Spend:
    """What the calls ``which`` picks (a condition on attempts and their jobs) spent, each
    unanswered call at its worst case."""
    a, j = _attempts.c, _jobs.c
    unknown = and_(a.http_status.is_(None), a.worst_prompt_tokens.is_not(None))
    prompt = case((unknown, a.worst_prompt_tokens), else_=a.prompt_tokens)
    completion = case((unknown, func.coalesce(a.max_tokens, 0)), else_=a.completion_tokens)
    rows = session.execute(
        select(a.model, func.sum(prompt), func.sum(completion))
        .join(_jobs, j.id == a.job_id)
        .where(which)
        .group_by(a.model)
    )
    total = Spend()
    for model, prompt_sum, completion_sum in rows:
        total = total + Spend.of(model, int(prompt_sum), int(completion_sum), price_for)
    return total


def on_the_wire(session: Tx, which: ColumnElement[bool]) -> int:
    """Calls ``which`` picks that are on the wire: their answers may free what they hold."""
    a, j = _attempts.c, _jobs.c
    count: int = session.execute(
        select(func.count())
        .select_from(_attempts.join(_jobs, j.id == a.job_id))
        .where(which, a.http_status.is_(None), a.error_kind.is_(None))
    ).scalar_one()
    return count


def budget_of(session: Tx, batch_id: int) -> Budget:
    b = _batches.c
    row = session.execute(
        select(b.budget_tokens, b.budget_usd).where(b.id == batch_id)
    ).one_or_none()
    return Budget() if row is None else Budget(row.budget_tokens, row.budget_usd)


#: ``too_large``: the call alone may take more than the whole budget; it never fits.
Verdict = Literal["fits", "wait", "paused", "too_large"]


@dataclass(frozen=True)
class Admission:
    verdict: Verdict
    #: Why it did not fit: the batch's pause reason.
    reason: str | None = None


FITS = Admission("fits")


def admit(
    session: Tx,
    batch_id: int,
    call: Spend,
    price_for: PriceFor,
    *,
    lock: bool = True,
) -> Admission:
    """May a call of worst case ``call`` start? Step 3 of the module docstring.

    Locks the batch row, only for a batch with a budget or a pause; the caller then
    writes the ledger row (the job's row) in the same transaction when it fits: the
    batch's row before its jobs', the order a cancel takes them in too. ``lock=False``
    is a worker's look before it takes a throttle turn: the same verdict, not binding,
    so a job that must wait lets the turn go to another.
    """
    b, j = _batches.c, _jobs.c
    row = session.execute(
        select(b.budget_tokens, b.budget_usd, b.paused_reason).where(b.id == batch_id)
    ).one_or_none()
    if row is None or (row.budget_tokens, row.budget_usd, row.paused_reason) == (None,) * 3:
        return FITS
    if lock:
        # Read again under the lock: the row read without one (so that a batch without
        # a budget is never locked) may have changed since.
        row = session.execute(
            select(b.budget_tokens, b.budget_usd, b.paused_reason)
            .where(b.id == batch_id)
            .with_for_update()
        ).one()
    if row.paused_reason is not None:
        return Admission("paused", row.paused_reason)
    budget = Budget(row.budget_tokens, row.budget_usd)
    alone = budget.exceeded_by(call)
    if alone is not None:
        return Admission("too_large", f"one call of it may take {alone}")
    spent = spend(session, batch_id, price_for)
    over = budget.exceeded_by(spent + call)
    if over is None:
        return FITS
    if on_the_wire(session, j.batch_id == batch_id):
        return Admission("wait", over)
    reason = (
        f"budget reached: {spent_words(spent, budget)} spent of {budget.describe()}, "
        f"and the next call may take {spent_words(call, budget)} more"
    )
    return Admission("paused", reason)


def spent_words(spend: Spend, budget: Budget) -> str:
    parts = []
    if budget.tokens is not None or spend.usd is None:
        parts.append(f"{spend.tokens:,} tokens")
    if budget.usd is not None and spend.usd is not None:
        parts.append(dollars(spend.usd))
    return " and ".join(parts)


@dataclass(frozen=True)
class Standing:
    """A batch's budget, what it has spent by :func:`spend`, and why it is paused."""

    budget: Budget
    spent: Spend
    paused_reason: str | None

    def describe(self) -> str:
        """``budget: 1,200 of 5,000 tokens spent``, or ``budget: none``."""
        if not self.budget:
            return "budget: none"
        return f"budget: {spent_words(self.spent, self.budget)} spent of {self.budget.describe()}"

    def as_dict(self) -> dict[str, object]:
        return {
            "tokens": self.budget.tokens,
            "usd": self.budget.usd,
            "spent_tokens": self.spent.tokens,
            "spent_usd": self.spent.usd,
        }


def standing(session: Tx, batch_id: int, price_for: PriceFor) -> Standing:
    b = _batches.c
    row = session.execute(
        select(b.budget_tokens, b.budget_usd, b.paused_reason).where(b.id == batch_id)
    ).one()
    budget = Budget(row.budget_tokens, row.budget_usd)
    spent = spend(session, batch_id, price_for) if budget else Spend()
    return Standing(budget, spent, row.paused_reason)
