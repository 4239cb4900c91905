"""A dry run: what a batch file will cost and when it will be done, before it is stored.

:func:`estimate` validates the requests as a submission does, then, storing nothing
and never touching Redis, works out per model (each model is its own bucket):

1. the requests, and the prompt tokens the provider should count: the raw estimate
   at the mean ratio of the calibration's samples (:mod:`jobs.calibration`), or at a
   typical tokenizer's ratio (:data:`PRIOR_RATIO`) where the ledger has taught nothing
   yet;
2. the tokens the throttle holds before an answer: the calibrated estimate (with its
   margin) + max_tokens each;
3. the cost: the prompt at the input price plus 0 to all of max_tokens at the output
   price, and an expected figure from the share of max_tokens that the ledger's
   recent answers used;
4. the tokens each call counts against tpm: prompt + max_tokens under
   ``INFERENCE_TPM_CHARGE=reserve``, prompt + the expected answer under ``actual``;
5. which limit binds and when the batch would end, behind the backlog already queued
   or running on the model: the throttle paces calls one window / rpm apart where
   requests bind (or one mean recent latency / DISPATCH_WINDOW_MAX apart, the calls in
   flight being capped there, if that is longer), and admits a window's worth of
   tokens (as many whole calls as fit) at every roll where tokens do, so the last
   call starts then, and the batch ends the recent calls' 95th-percentile latency later
   (with the slowest of the calls started near its end).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

from sqlalchemy import ColumnElement, Integer, case, func, select

from jobs import store
from jobs.batchfile import BatchItem
from jobs.calibration import Calibrator
from jobs.db import session_scope
from jobs.models import Attempt, Batch, Job, JobStatus
from jobs.pricing import NO_PRICE, Price, dollars
from jobs.settings import Settings
from jobs.tokens import Script, dominant_script

#: Recent answered calls whose latency stands for the batch's calls'.
LATENCY_SAMPLES = 200
#: The quantile of their latency that the last calls of a batch are taken to end within.
TAIL_QUANTILE = 0.95
#: Queued jobs of a batch whose sizes stand for all it has left (:func:`pace`).
PACE_SAMPLE = 200

Limit = Literal["requests", "tokens"]


@dataclass(frozen=True)
class ModelEstimate:
    """One model's share of a dry run (see the module docstring for each figure)."""

    model: str
    requests: int
    prompt_tokens: int
    #: The prompt's raw estimate, before calibration.
    raw_prompt_tokens: int
    #: Answered calls the calibration learnt from, in the least known script of the
    #: requests (0: the raw estimate stands).
    calibrated_on: int
    max_tokens: int
    reserved_tokens: int
    #: Share of max_tokens recent answers used; None: none answered yet.
    completion_share: float | None
    #: USD: the least, the most and the expected; None without a price.
    usd_min: float | None
    usd_max: float | None
    usd_expected: float | None
    rpm: int | None
    tpm: int | None
    #: Requests and tokens (as the provider counts them) queued or running on the model.
    backlog_requests: int
    backlog_tokens: int
    binding: Limit | None
    #: Seconds from now until the last call ends; None where the limits are unknown.
    finish_s: float | None
    #: The recent calls' 95th-percentile latency, which the finish includes; None: no
    #: calls yet.
    latency_s: float | None


@dataclass(frozen=True)
class Estimate:
    """A dry run's figures, per model, at ``at`` (UTC)."""

    at: dt.datetime
    models: list[ModelEstimate] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(m.requests for m in self.models)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "requests": self.requests,
            "models": [asdict(m) for m in self.models],
        }


def estimate(items: Iterable[BatchItem], settings: Settings) -> Estimate:
    """The dry run of already validated ``items`` (see the module docstring)."""
    assert settings.database_url is not None
    url = settings.database_url
    per_model: dict[str, list[tuple[int, Script, int]]] = {}
    for item in items:
        request = item.request
        max_tokens = request.max_tokens or settings.default_max_tokens
        per_model.setdefault(request.model, []).append(
            (request.est_prompt_tokens, dominant_script(request.body), max_tokens)
        )
    calibrator = Calibrator(url)
    return Estimate(
        at=dt.datetime.now(dt.UTC),
        models=[
            _model(model, calls, settings, calibrator) for model, calls in sorted(per_model.items())
        ],
    )


def _model(
    model: str, calls: list[tuple[int, Script, int]], settings: Settings, cal: Calibrator
) -> ModelEstimate:
    raw = sum(tokens for tokens, _, _ in calls)
    # What the provider should count: the raw estimate at the mean ratio of the ledger's
    # samples (the calibrated estimate, with its margin, is what the throttle holds).
    samples = {script: cal.samples(model, script) for script in {s for _, s, _ in calls}}
    ratio = {script: _mean_ratio(found, script) for script, found in samples.items()}
    prompt = sum(math.ceil(tokens * ratio[script]) for tokens, script, _ in calls)
    held = sum(cal.estimate(model, script, tokens) for tokens, script, _ in calls)
    calibrated_on = min(len(found) for found in samples.values())
    max_tokens = sum(m for _, _, m in calls)
    answers = cal.completion_samples(model)
    share = sum(u for u, _ in answers) / sum(b for _, b in answers) if answers else None
    price = settings.price_for(model)
    rpm, tpm = _limits(model, settings)
    expected_answers = max_tokens if share is None else round(max_tokens * share)
    counted = prompt + (max_tokens if settings.tpm_charge == "reserve" else expected_answers)
    backlog_requests, backlog_tokens = _backlog(settings, cal, model)
    latency = _latency(settings, model)
    binding, finish_s = _finish(
        settings, model, backlog_requests + len(calls), backlog_tokens + counted, latency
    )
    return ModelEstimate(
        model=model,
        requests=len(calls),
        prompt_tokens=prompt,
        raw_prompt_tokens=raw,
        calibrated_on=calibrated_on,
        max_tokens=max_tokens,
        reserved_tokens=held + max_tokens,
        completion_share=share,
        usd_min=price.usd(prompt, 0) if price else None,
        usd_max=price.usd(prompt, max_tokens) if price else None,
        usd_expected=_expected(price, prompt, max_tokens, share),
        rpm=rpm,
        tpm=tpm,
        backlog_requests=backlog_requests,
        backlog_tokens=backlog_tokens,
        binding=binding,
        finish_s=finish_s,
        latency_s=None if latency is None else latency.tail,
    )


#: What the provider should count per raw estimated token before the ledger has taught
#: anything: typical tokenizers' ratios, not the raw estimate's deliberate excess. About
#: 4 characters a token on English text (OpenAI's rule of thumb) against the 3 bytes a raw
#: token stands for, and about 1.5 CJK characters a token against the one character
#: (3 bytes) it counts. Only the dry run's figures use these; the throttle reserves the
#: raw estimate until calibrated, which must err high.
PRIOR_RATIO: dict[Script, float] = {"latin": 0.75, "cjk": 2 / 3}


def _mean_ratio(samples: list[tuple[int, int]], script: Script) -> float:
    """The provider's count over the raw estimate, over ``(actual, raw)`` samples; the
    script's :data:`PRIOR_RATIO` without any."""
    if not samples:
        return PRIOR_RATIO[script]
    return sum(a for a, _ in samples) / sum(r for _, r in samples)


def _expected(
    price: Price | None, prompt: int, max_tokens: int, share: float | None
) -> float | None:
    if price is None or share is None:
        return None
    return price.usd(prompt, round(max_tokens * share))


def _limits(model: str, settings: Settings) -> tuple[int | None, int | None]:
    """The limits of every bucket serving ``model`` together (a pool's attachments)."""
    return settings.limits_for(model) or (None, None)


def _finish(
    settings: Settings, model: str, requests: int, tokens: int, latency: Latency | None
) -> tuple[Limit | None, float | None]:
    """Which limit binds ``requests`` calls of ``tokens`` on ``model``'s bucket, and the
    seconds until the last one ends (None where its limits are unknown)."""
    rpm, tpm = _limits(model, settings)
    if rpm is None or tpm is None or requests == 0:
        return None, None if requests else 0.0
    window = 60.0 + settings.window_margin_s
    # Calls in flight never outnumber the dispatch window, so calls as long as it takes
    # to call them all start one every latency / window, if that is the slower.
    mean, tail = latency or (0.0, 0.0)
    gap = max(window / rpm, mean / settings.dispatch_window_max)
    if requests * gap / window >= tokens / tpm:
        # Paced: one call every gap, the first one at once.
        return "requests", (requests - 1) * gap + tail
    # A window's worth of tokens at every roll, in whole calls.
    per_window = max(1, math.floor(tpm * requests / tokens))
    return "tokens", (math.ceil(requests / per_window) - 1) * window + tail


def _backlog(settings: Settings, cal: Calibrator, model: str) -> tuple[int, int]:
    """Jobs of ``model`` queued or running: how many, and their tokens as the provider
    counts them (a one-off read of every such job: the dry run's, not the pace's)."""
    assert settings.database_url is not None
    waiting = Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
    with session_scope(settings.database_url) as session:
        count, prompt, budget = session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(Job.est_prompt_tokens), 0),
                func.coalesce(func.sum(_max_tokens(settings)), 0),
            ).where(Job.model == model, waiting)
        ).one()
    return int(count), _counted(settings, cal, model, int(prompt), int(budget))


def _max_tokens(settings: Settings) -> ColumnElement[int]:
    """A job's completion budget: its request's max_tokens, or the default."""
    return func.coalesce(
        Job.request["max_tokens"].as_string().cast(Integer), settings.default_max_tokens
    )


def _counted(settings: Settings, cal: Calibrator, model: str, raw: int, budget: int) -> int:
    """Tokens of jobs whose raw prompt estimates add up to ``raw`` and completion budgets
    to ``budget``, as the provider counts them: the prompts at the ledger's mean ratio
    (the Latin one: a queued job's script is not kept), and the budgets whole, or at the
    share recent answers used under ``INFERENCE_TPM_CHARGE=actual``."""
    prompt = math.ceil(raw * _mean_ratio(cal.samples(model, "latin"), "latin"))
    answers = cal.completion_samples(model) if settings.tpm_charge == "actual" else []
    if answers:
        budget = round(budget * sum(u for u, _ in answers) / sum(b for _, b in answers))
    return prompt + budget


class Latency(NamedTuple):
    """Of the model's recent answered calls, in seconds: the mean, which sets how many
    are in flight, and the 95th percentile, which the last calls of a batch end within
    (the batch ends with the slowest of the calls started near its end)."""

    mean: float
    tail: float


def _latency(settings: Settings, model: str) -> Latency | None:
    """:class:`Latency` of the model's last answered calls; None: none yet."""
    assert settings.database_url is not None
    recent = (
        select(Attempt.latency_ms)
        .where(Attempt.model == model, Attempt.http_status == 200, Attempt.latency_ms.is_not(None))
        .order_by(Attempt.id.desc())
        .limit(LATENCY_SAMPLES)
        .subquery()
    )
    with session_scope(settings.database_url) as session:
        mean, tail = session.execute(
            select(
                func.avg(recent.c.latency_ms),
                func.percentile_cont(TAIL_QUANTILE).within_group(recent.c.latency_ms),
            )
        ).one()
    return None if mean is None else Latency(float(mean) / 1000, float(tail) / 1000)


def describe(found: Estimate) -> list[str]:
    """The dry run as lines of text, one figure each."""
    lines = ["dry run: nothing stored, nothing sent"]
    for m in found.models:
        lines.append(f"{m.model}: {m.requests:,} requests")
        source = (
            f"calibrated on {m.calibrated_on} answered calls; raw estimate {m.raw_prompt_tokens:,}"
            if m.calibrated_on
            else f"typical tokenizer ratios: no answered calls to calibrate on yet; raw "
            f"estimate {m.raw_prompt_tokens:,}"
        )
        lines.append(f"  prompt tokens: {m.prompt_tokens:,} ({source})")
        lines.append(f"  reserved: {m.reserved_tokens:,} tokens (calibrated prompt + max_tokens)")
        lines.append(f"  cost: {_cost(m)}")
        lines.append(f"  {_finish_line(m, found.at)}")
    return lines


def _cost(m: ModelEstimate) -> str:
    if m.usd_min is None or m.usd_max is None:
        return NO_PRICE
    text = f"{dollars(m.usd_min)} to {dollars(m.usd_max)}"
    if m.usd_expected is not None and m.completion_share is not None:
        text += (
            f", expected {dollars(m.usd_expected)} (recent answers used "
            f"{m.completion_share:.1%} of max_tokens)"
        )
    return text


def _finish_line(m: ModelEstimate, at: dt.datetime) -> str:
    if m.finish_s is None or m.rpm is None or m.tpm is None:
        return f"finish: unknown: {m.model} has no known limits"
    limit = f"{m.rpm:,} RPM" if m.binding == "requests" else f"{m.tpm:,} TPM"
    behind = f"behind {m.backlog_requests:,} requests already queued or running"
    ends = at + dt.timedelta(seconds=m.finish_s)
    minutes, seconds = divmod(round(m.finish_s), 60)
    latency = (
        f"the recent calls' 95th-percentile latency, {m.latency_s:.1f} s, included"
        if m.latency_s is not None
        else "plus the calls' latency, not known yet"
    )
    return (
        f"{m.binding} bind ({limit}), {behind}: expected to end in {minutes} min {seconds} s, "
        f"at {ends:%Y-%m-%d %H:%M:%S} UTC ({latency})"
    )


@dataclass(frozen=True)
class Pace:
    """A batch under way: its calls answered in the last minute, and the seconds until
    its last call should end (None: unknown; 0.0: nothing left), at ``at`` (UTC)."""

    per_minute: int
    finish_s: float | None
    at: dt.datetime

    def describe(self) -> str:
        rate = f"{self.per_minute:,} calls answered in the last minute"
        if self.finish_s is None:
            return f"{rate}; end unknown (a model without known limits)"
        ends = self.at + dt.timedelta(seconds=self.finish_s)
        return f"{rate}; expected to end in {self._left()}, at {ends:%H:%M:%S} UTC"

    def short(self) -> str:
        """For a table cell: ``148/min, 3 min 20 s left``."""
        left = "end unknown" if self.finish_s is None else f"{self._left()} left"
        return f"{self.per_minute:,}/min, {left}"

    def _left(self) -> str:
        minutes, seconds = divmod(round(self.finish_s or 0.0), 60)
        return f"{minutes} min {seconds} s"


def pace(settings: Settings, batch_id: int) -> Pace:
    """The batch's calls answered in the last 60 s, and when its last call should end:
    :func:`_finish` of its calls not yet started behind those of the batches before it,
    each the size of a sample of its own, plus a recent call's latency. It reads the
    batches' counters, the last minute's calls, the calls in flight and the sample, never
    every job, so it stays cheap on a batch of 100,000 (the dashboard asks every two
    seconds)."""
    assert settings.database_url is not None
    url = settings.database_url
    now = dt.datetime.now(dt.UTC)
    left = store.live_count("queued") + store.live_count("running")
    with session_scope(url) as session:
        answered = session.execute(
            select(func.count())
            .select_from(Attempt)
            .join(Job, Job.id == Attempt.job_id)
            .where(
                Attempt.started_at >= now - dt.timedelta(seconds=60),
                Attempt.http_status == 200,
                Job.batch_id == batch_id,
            )
        ).scalar_one()
        mine, ahead = session.execute(
            select(
                func.coalesce(func.sum(case((Batch.id == batch_id, left), else_=0)), 0),
                func.coalesce(func.sum(case((Batch.id < batch_id, left), else_=0)), 0),
            ).where(Batch.id <= batch_id, left > 0)
        ).one()
        # Running jobs in a call have started: the rest (queued, or running and waiting
        # for their turn) have not. The running ones are few (the dispatch window).
        calling = session.execute(
            select(func.count()).where(
                Job.status == JobStatus.RUNNING, Job.calling.is_(True), Job.batch_id <= batch_id
            )
        ).scalar_one()
        sample = session.execute(
            select(Job.model, Job.est_prompt_tokens, _max_tokens(settings))
            .where(
                Job.batch_id == batch_id,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                Job.calling.is_(False),
            )
            .limit(PACE_SAMPLE)
        ).all()
    latency = _latency(settings, sample[0][0] if sample else settings.model_id)
    to_start = int(mine) + int(ahead) - int(calling)
    if not mine or not sample or to_start <= 0:
        # Nothing left, or only calls in flight: they end about a call's latency from now.
        last = latency.tail if latency and mine else 0.0
        return Pace(per_minute=int(answered), finish_s=last, at=now)
    model = max({m for m, _, _ in sample}, key=[m for m, _, _ in sample].count)
    raw, budget = (sum(int(row[i]) for row in sample) for i in (1, 2))
    each = _counted(settings, Calibrator(url), model, raw, budget) / len(sample)
    _, finish = _finish(settings, model, to_start, round(to_start * each), latency)
    return Pace(per_minute=int(answered), finish_s=finish, at=now)
