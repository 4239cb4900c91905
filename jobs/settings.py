"""Settings read once from the environment into one typed, frozen object.

Every setting uses Heroku's config-var name where one exists. Each default is
documented beside its field; the README's configuration table mirrors this file.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from jobs.attachments import (
    DEFAULT_ALIAS,
    Attachment,
    AttachmentError,
    agree,
    check_url,
    distinct_buckets,
    is_loopback_host,
    key_hash,
    limits_of,
    pool_aliases,
    usd_price,
)
from jobs.pricing import Price

__all__ = ["Attachment", "ConfigError", "ModelLimits", "Settings", "is_loopback_host"]


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class ModelLimits:
    """Provider limits for one model on one key, and its price where one is published."""

    rpm: int
    tpm: int
    context_tokens: int
    price: Price | None = None


#: The longest call latency, in seconds, for which the default dispatch window and
#: worker threads keep the key at its request limit (see DISPATCH_WINDOW_MAX).
LONG_CALL_S = 120.0
#: Threads of a worker process beyond the largest dispatch window, so that an
#: interactive job finds one free while every bulk job of the window is held.
INTERACTIVE_THREADS = 50

#: Known limits per model id. A model not listed here needs INFERENCE_RPM and
#: INFERENCE_TPM (and optionally INFERENCE_CONTEXT_TOKENS) set explicitly.
#: A price is listed only with its published source and date: Heroku's Kimi K2.5 page
#: (last updated 2026-02-18, read 2026-12-06) gives limits and no per-token price.
MODEL_LIMITS: dict[str, ModelLimits] = {
    "kimi-k2-5": ModelLimits(rpm=150, tpm=800_000, context_tokens=262_144),
}

DEFAULT_MODEL = "kimi-k2-5"
DEFAULT_CONTEXT_TOKENS = 262_144

TpmCharge = Literal["reserve", "actual"]


def normalize_database_url(url: str) -> str:
    """Rewrite Heroku's ``postgres://`` URLs so SQLAlchemy uses psycopg 3.

    SQLAlchemy 1.4+ rejects the ``postgres`` scheme, and a bare ``postgresql://``
    would pick psycopg2, which is not installed.
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Settings:
    """Every knob of the system, read once by :meth:`from_env`."""

    #: DATABASE_URL. ``None``: unset (off a dyno, the CLI fills it from the dev stack).
    database_url: str | None = None
    #: REDIS_URL. ``None``: unset (off a dyno, the CLI fills it from the dev stack).
    redis_url: str | None = None
    #: The first attachment of the pool (:mod:`jobs.attachments`) is described by the
    #: fields from here to ``price``, and by ``headroom`` and ``limits_from_env``;
    #: ``pool`` holds the others. The variables are named for the first alias of
    #: INFERENCE_POOL, ``INFERENCE`` unless it is set: INFERENCE_URL and so on.
    alias: str = DEFAULT_ALIAS
    #: INFERENCE_URL. ``None``: unset (off a dyno, the CLI starts the dev stack's simulator).
    inference_url: str | None = None
    #: INFERENCE_KEY. Never logged; ``repr`` hides it.
    inference_key: str = field(default="", repr=False)
    #: INFERENCE_MODEL_ID. Default ``kimi-k2-5``.
    model_id: str = DEFAULT_MODEL
    #: INFERENCE_RPM. Default from MODEL_LIMITS (150 for kimi-k2-5).
    rpm: int = MODEL_LIMITS[DEFAULT_MODEL].rpm
    #: INFERENCE_TPM. Default from MODEL_LIMITS (800,000 for kimi-k2-5).
    tpm: int = MODEL_LIMITS[DEFAULT_MODEL].tpm
    #: INFERENCE_CONTEXT_TOKENS. Default from MODEL_LIMITS (262,144 for kimi-k2-5).
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    #: INFERENCE_TPM_CHARGE: ``reserve`` (prompt + max_tokens, default) or ``actual``.
    tpm_charge: TpmCharge = "reserve"
    #: INFERENCE_PRICE_INPUT and INFERENCE_PRICE_OUTPUT, USD per million prompt and
    #: completion tokens of the configured model, both or neither. Default from
    #: MODEL_LIMITS (none for kimi-k2-5): reports then show tokens only.
    price: Price | None = None
    #: INFERENCE_WINDOW_MARGIN, seconds added to the 60 s window the throttle
    #: enforces, so that a call admitted exactly one window later cannot reach
    #: the provider before the earlier call's slot has left its window. Default 0.5.
    window_margin_s: float = 0.5
    #: INFERENCE_INTERACTIVE_RESERVE. Requests of every window that bulk jobs leave
    #: free for bursts of interactive ones (and the same share of tpm). Must be below
    #: the rpm. Default 0: interactive jobs take turns ahead of bulk ones anyway.
    interactive_reserve: int = 0
    #: INFERENCE_HEADROOM, a share of each limit (0 to 0.5) always left to other
    #: clients of the key, below the room the throttle learns they use. Default 0; the
    #: default of every pooled attachment's ``<ALIAS>_HEADROOM`` too.
    headroom: float = 0.0
    #: INFERENCE_POOL's attachments after the first, each read from its ``<ALIAS>_*``
    #: variables. Empty: the one attachment above.
    pool: tuple[Attachment, ...] = ()
    #: INFERENCE_DEFAULT_MAX_TOKENS. Completion tokens reserved for a request
    #: that sets no max_tokens (the body itself is sent unchanged). Default 4096.
    default_max_tokens: int = 4096
    #: INFERENCE_CONNECT_TIMEOUT, seconds. Default 10.
    connect_timeout: float = 10.0
    #: INFERENCE_READ_TIMEOUT, seconds to wait for a response. Default 300.
    read_timeout: float = 300.0
    #: INFERENCE_MAX_ATTEMPTS: HTTP calls per job before it fails (429s and
    #: rejected keys do not count). Default 8: with the default backoff the
    #: retries span at least 61.5 s, so a 30 s provider outage fails no job.
    max_attempts: int = 8
    #: INFERENCE_BACKOFF_BASE, seconds; doubles per attempt, equal jitter. Default 1.
    backoff_base: float = 1.0
    #: INFERENCE_BACKOFF_MAX, seconds; cap of one backoff sleep. Default 60.
    backoff_max: float = 60.0
    #: INFERENCE_AUTH_RETRY, seconds: after a 401/403 nothing is called for this
    #: long, then one probe call; it doubles per rejection up to 15 min. Default 60.
    auth_retry_s: float = 60.0
    #: WORKER_CONCURRENCY: threads per worker process. Default 500: the largest
    #: dispatch window the defaults allow at 150 RPM (DISPATCH_WINDOW_MAX, 450) plus
    #: 50. The window's bulk jobs may all be taken by one process (a single dyno),
    #: each holding its thread while it waits for its slot and during its call, and
    #: an interactive job is published at once but starts only on a free thread
    #: (README, "Configuration"). The pool starts threads as jobs arrive,
    #: so threads the window does not need are never started.
    worker_concurrency: int = 500
    #: DISPATCH_WINDOW: fewest bulk jobs published to Redis and not yet finished,
    #: across all workers, that the dispatcher keeps topped up; it bounds the calls
    #: in flight. Default INFERENCE_RPM + 50 (200 at 150 RPM; with a pool, the rpm of
    #: every bucket together, :attr:`pool_rpm`): a strict window
    #: admits a whole minute's requests at once and each needs a published job,
    #: plus room for calls still running at the roll. Setting it fixes the window
    #: there, unless DISPATCH_WINDOW_MAX is set too.
    dispatch_window: int = 200
    #: DISPATCH_WINDOW_MAX: the window follows the calls' latency up to here (see
    #: :func:`jobs.dispatch.window_for`): at the limit, RPM / 60 x the latency
    #: calls are in flight, and a window smaller than that holds the key below
    #: its limit. Default INFERENCE_RPM x (1 + LONG_CALL_S / 60), 450 at 150 RPM,
    #: and at most WORKER_CONCURRENCY - 50; DISPATCH_WINDOW when only that is set.
    dispatch_window_max: int = 450
    #: DISPATCH_INTERVAL, seconds between dispatcher sweeps in each worker. Default 2.
    dispatch_interval: float = 2.0
    #: DISPATCH_REDELIVER_AFTER, seconds after which a published job that no
    #: worker started is published again: its message was lost with a worker
    #: killed between taking it and starting it. Default: twice the time the
    #: largest window takes to drain at the request limit (360 s at 150 RPM and
    #: a DISPATCH_WINDOW_MAX of 450), at least 60 s; a duplicate message costs
    #: nothing.
    dispatch_redeliver_after: float = 360.0
    #: BROKER_VISIBILITY_TIMEOUT, seconds before Redis redelivers an unacked
    #: task. Default 3600; no task may wait longer than this.
    visibility_timeout: int = 3600
    #: JOB_LEASE_SECONDS: how long a running job stays owned by a worker that
    #: stopped renewing it (each worker renews its jobs every quarter of this);
    #: a killed worker's jobs are re-queued this long after its death. Default 60.
    job_lease_seconds: float = 60.0
    #: NIGHTLY_CRON: five-field cron for the scheduled batch, e.g. ``0 2 * * *``.
    nightly_cron: str | None = None
    #: NIGHTLY_SOURCE: a JSONL path, or ``package.module:callable`` returning requests.
    nightly_source: str | None = None
    #: NIGHTLY_NAME: name prefix of scheduled batches. Default ``nightly``.
    nightly_name: str = "nightly"
    #: MAINTENANCE_CRON: when stuck jobs are re-queued. Default ``30 3 * * *``.
    maintenance_cron: str = "30 3 * * *"
    #: RESULT_RETENTION_DAYS: days after a job finished (succeeded, failed or
    #: cancelled) before its request and response bodies are deleted; the ledger,
    #: status and counters stay. A non-negative integer; ``0`` keeps bodies
    #: forever (no purge is scheduled). Default 30.
    result_retention_days: int = 30
    #: PURGE_CRON: when beat runs the retention purge, in UTC. Default ``0 4 * * *``.
    purge_cron: str = "0 4 * * *"
    #: LOG_BODIES: log request/response bodies (``1``). Default off.
    log_bodies: bool = False
    #: VAR_DIR: where the dev stack's embedded servers keep their data. ``None`` (unset):
    #: the project root's ``var/`` in a source checkout, else a per-user data directory
    #: (see :func:`devstack.services.default_var_dir`).
    var_dir: Path | None = None
    #: DYNO, set by Heroku on every dyno (``worker.1``). When set, every service must come
    #: from its config var: nothing embedded and no simulator is ever started.
    dyno: str | None = None
    #: SERVICE_WAIT_SECONDS: how long a worker or beat process starting up keeps trying
    #: to reach PostgreSQL and Redis before it exits with the error. Default 60, so a
    #: short outage during a restart needs nobody to restart the dyno by hand.
    service_wait_s: float = 60.0
    #: Names of the variables that set the limits instead of MODEL_LIMITS (empty: the
    #: table's). Reported by the worker's start-up line.
    limits_from_env: tuple[str, ...] = ()
    #: API_KEYS: the bearer tokens the web process accepts, comma-separated so that a key
    #: can be rotated. Required on a dyno by the web process; never logged.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: MAX_UPLOAD_BYTES: the largest file ``POST /v1/files`` stores. Default 200 MB,
    #: OpenAI's limit for a batch input file.
    max_upload_bytes: int = 200 * 1024 * 1024
    #: WEBHOOK_URL: where an event is POSTed when a batch ends. Unset: no events.
    webhook_url: str | None = None
    #: WEBHOOK_SECRET: the Standard Webhooks signing secret (``whsec_…``); never logged.
    webhook_secret: str = field(default="", repr=False)
    #: WEBHOOK_BACKOFF_BASE, seconds after a failed delivery before the next one; doubles
    #: per attempt, equal jitter. Default 5: a receiver that restarts gets the event
    #: within seconds; the waits double up to WEBHOOK_BACKOFF_MAX, the first ten
    #: taking about an hour in all.
    webhook_backoff_base: float = 5.0
    #: WEBHOOK_BACKOFF_MAX, seconds; cap of one wait between deliveries. Default 3600:
    #: a receiver down for a day gets the event within the hour it returns.
    webhook_backoff_max: float = 3600.0
    #: DAILY_BUDGET_TOKENS and DAILY_BUDGET_USD: what the deployment may spend per UTC
    #: day, every batch and interactive job together (:mod:`jobs.daily_budget`); dollars
    #: need a price. Unset: no daily limit.
    daily_budget_tokens: int | None = None
    daily_budget_usd: float | None = None
    #: The time of day the daily budget goes by (UTC). Tests pass another clock here to
    #: cross midnight; nothing reads it from the environment.
    clock: Callable[[], dt.datetime] = field(default=utc_now, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.database_url is not None and not self.database_url.startswith(
            ("postgresql+psycopg://", "postgresql://", "postgres://")
        ):
            raise ConfigError(
                f"DATABASE_URL must be a postgres:// URL, got {_scheme(self.database_url)}"
            )
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"REDIS_URL must be a redis:// or rediss:// URL, got {_scheme(self.redis_url)}"
            )
        if self.webhook_url is not None:
            hook = urlsplit(self.webhook_url)
            if hook.scheme != "https" and not (
                hook.scheme == "http" and is_loopback_host(hook.hostname)
            ):
                raise ConfigError(
                    "WEBHOOK_URL must be https:// (plain http:// is accepted only for a "
                    "loopback receiver)"
                )
            if not _is_whsec(self.webhook_secret):
                raise ConfigError(
                    "WEBHOOK_SECRET must be set with WEBHOOK_URL, as whsec_ and base64 "
                    "(Standard Webhooks' form, what the openai SDK's webhooks.unwrap takes)"
                )
        if self.inference_url is not None:
            try:
                check_url(f"{self.alias}_URL", self.inference_url)
            except AttachmentError as exc:
                raise ConfigError(str(exc)) from None

    @property
    def simulated(self) -> bool:
        return self.inference_url is None

    @property
    def key_fingerprint(self) -> str:
        """Short, non-reversible tag of the first attachment's key."""
        return key_hash(self.inference_key)

    @property
    def bucket_name(self) -> str:
        return f"{self.model_id}:{self.key_fingerprint}"

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        """Every attachment of the pool, the first one (the fields above) first."""
        first = Attachment(
            alias=self.alias,
            url=self.inference_url,
            key=self.inference_key,
            model_id=self.model_id,
            rpm=self.rpm,
            tpm=self.tpm,
            context_tokens=self.context_tokens,
            headroom=self.headroom,
            price=self.price,
            limits_from_env=self.limits_from_env,
        )
        return (first, *self.pool)

    @property
    def served_models(self) -> frozenset[str]:
        """The models some attachment serves: the only ones a request may name."""
        return frozenset(a.model_id for a in self.attachments)

    def limits_for(self, model: str) -> tuple[int, int] | None:
        """The rpm and tpm of every bucket serving ``model`` together; ``None``: none does."""
        return limits_of(self.attachments, model)

    @property
    def pool_rpm(self) -> int:
        """Requests per minute of every bucket together: what the dispatcher feeds."""
        return sum(a.rpm for a in distinct_buckets(self.attachments))

    def price_for(self, model: str) -> Price | None:
        """The price of ``model``'s calls: its attachments' (``<ALIAS>_PRICE_*``), else
        MODEL_LIMITS'; ``None`` where none is known."""
        for attachment in self.attachments:
            if attachment.model_id == model:
                return attachment.price
        known = MODEL_LIMITS.get(model)
        return known.price if known else None

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        d = cls()  # every default is stated once, on its field
        charge = e.get("INFERENCE_TPM_CHARGE", d.tpm_charge)
        if charge not in ("reserve", "actual"):
            raise ConfigError("INFERENCE_TPM_CHARGE must be 'reserve' or 'actual'")
        headroom = _headroom(e, "INFERENCE_HEADROOM", d.headroom)
        try:
            aliases = pool_aliases(e)
            pooled = bool(e.get("INFERENCE_POOL", "").strip())
            attachments = agree(
                tuple(
                    read_attachment(e, alias, headroom=headroom, required=pooled and i > 0)
                    for i, alias in enumerate(aliases)
                )
            )
        except AttachmentError as exc:
            raise ConfigError(str(exc)) from None
        first, pool = attachments[0], attachments[1:]
        rpm = sum(a.rpm for a in distinct_buckets(attachments))
        concurrency = _int(e, "WORKER_CONCURRENCY", d.worker_concurrency, minimum=1)
        read_timeout = _float(e, "INFERENCE_READ_TIMEOUT", d.read_timeout)
        window = _int(e, "DISPATCH_WINDOW", rpm + 50, minimum=1)
        # A DISPATCH_WINDOW set alone fixes the window; else it may grow for long calls.
        follows = min(round(rpm * (1.0 + LONG_CALL_S / 60.0)), concurrency - INTERACTIVE_THREADS)
        grows_to = window if e.get("DISPATCH_WINDOW") else max(window, follows)
        window_max = _int(e, "DISPATCH_WINDOW_MAX", grows_to, minimum=window)
        reserve = _int(e, "INFERENCE_INTERACTIVE_RESERVE", d.interactive_reserve, minimum=0)
        smallest = min(attachments, key=lambda a: a.rpm)
        if reserve >= smallest.rpm:
            raise ConfigError(
                f"INFERENCE_INTERACTIVE_RESERVE must be below the rpm ({smallest.rpm}"
                f"{'' if len(attachments) == 1 else ' of ' + smallest.alias}), got {reserve}"
            )
        database_url = e.get("DATABASE_URL") or None
        var_dir = e.get("VAR_DIR")
        daily_tokens = _int(e, "DAILY_BUDGET_TOKENS", 0, minimum=1) or None
        daily_usd = _float(e, "DAILY_BUDGET_USD", 0.0) or None
        unpriced = next((a for a in attachments if a.price is None), None)
        if daily_usd is not None and unpriced is not None:
            raise ConfigError(
                f"DAILY_BUDGET_USD needs the price of {unpriced.model_id}: set "
                f"{unpriced.alias}_PRICE_INPUT and {unpriced.alias}_PRICE_OUTPUT "
                "(USD per million tokens)"
            )
        return cls(
            daily_budget_tokens=daily_tokens,
            daily_budget_usd=daily_usd,
            database_url=normalize_database_url(database_url) if database_url else None,
            redis_url=e.get("REDIS_URL") or None,
            alias=first.alias,
            inference_url=first.url,
            inference_key=first.key,
            model_id=first.model_id,
            price=first.price,
            rpm=first.rpm,
            tpm=first.tpm,
            context_tokens=first.context_tokens,
            pool=pool,
            tpm_charge="actual" if charge == "actual" else "reserve",
            window_margin_s=_float(e, "INFERENCE_WINDOW_MARGIN", d.window_margin_s, zero_ok=True),
            interactive_reserve=reserve,
            headroom=first.headroom,
            default_max_tokens=_int(
                e, "INFERENCE_DEFAULT_MAX_TOKENS", d.default_max_tokens, minimum=1
            ),
            connect_timeout=_float(e, "INFERENCE_CONNECT_TIMEOUT", d.connect_timeout),
            read_timeout=read_timeout,
            max_attempts=_int(e, "INFERENCE_MAX_ATTEMPTS", d.max_attempts, minimum=1),
            backoff_base=_float(e, "INFERENCE_BACKOFF_BASE", d.backoff_base),
            backoff_max=_float(e, "INFERENCE_BACKOFF_MAX", d.backoff_max),
            auth_retry_s=_float(e, "INFERENCE_AUTH_RETRY", d.auth_retry_s),
            worker_concurrency=concurrency,
            dispatch_window=window,
            dispatch_window_max=window_max,
            dispatch_interval=_float(e, "DISPATCH_INTERVAL", d.dispatch_interval),
            dispatch_redeliver_after=_float(
                e, "DISPATCH_REDELIVER_AFTER", max(60.0, 2 * 60.0 * window_max / rpm)
            ),
            visibility_timeout=_int(
                e, "BROKER_VISIBILITY_TIMEOUT", d.visibility_timeout, minimum=60
            ),
            job_lease_seconds=_float(e, "JOB_LEASE_SECONDS", d.job_lease_seconds),
            nightly_cron=e.get("NIGHTLY_CRON") or None,
            nightly_source=e.get("NIGHTLY_SOURCE") or None,
            nightly_name=e.get("NIGHTLY_NAME", d.nightly_name),
            maintenance_cron=e.get("MAINTENANCE_CRON", d.maintenance_cron),
            result_retention_days=_int(
                e, "RESULT_RETENTION_DAYS", d.result_retention_days, minimum=0
            ),
            purge_cron=e.get("PURGE_CRON") or d.purge_cron,
            log_bodies=e.get("LOG_BODIES", "") in ("1", "true", "yes"),
            var_dir=Path(var_dir) if var_dir else None,
            dyno=e.get("DYNO") or None,
            service_wait_s=_float(e, "SERVICE_WAIT_SECONDS", d.service_wait_s, zero_ok=True),
            limits_from_env=first.limits_from_env,
            api_keys=tuple(k.strip() for k in e.get("API_KEYS", "").split(",") if k.strip()),
            max_upload_bytes=_int(e, "MAX_UPLOAD_BYTES", d.max_upload_bytes, minimum=1),
            webhook_url=e.get("WEBHOOK_URL") or None,
            webhook_secret=e.get("WEBHOOK_SECRET", ""),
            webhook_backoff_base=_float(e, "WEBHOOK_BACKOFF_BASE", d.webhook_backoff_base),
            webhook_backoff_max=_float(e, "WEBHOOK_BACKOFF_MAX", d.webhook_backoff_max),
        )


def _is_whsec(secret: str) -> bool:
    """``whsec_`` and non-empty base64: the key the signature is made with (never shown)."""
    if not secret.startswith("whsec_"):
        return False
    try:
        return bool(base64.b64decode(secret.removeprefix("whsec_"), validate=True))
    except binascii.Error:
        return False


def _scheme(url: str) -> str:
    """The scheme of ``url`` for an error message: never the rest, which may hold a password."""
    scheme, sep, _ = url.partition("://")
    return f"{scheme}://..." if sep else "a value without a scheme"


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def read_attachment(
    env: Mapping[str, str], alias: str, *, headroom: float, required: bool
) -> Attachment:
    """One attachment from its ``<ALIAS>_*`` variables (:mod:`jobs.attachments`).

    ``required``: its URL and key must be set (a pooled alias; the first one may come
    from the dev stack off a dyno). ``headroom`` is the default of its own.
    """
    url = (env.get(f"{alias}_URL") or "").rstrip("/") or None
    key = env.get(f"{alias}_KEY", "")
    if required:
        for name, value in ((f"{alias}_URL", url), (f"{alias}_KEY", key)):
            if not value:
                raise ConfigError(
                    f"{name} is not set, and INFERENCE_POOL names {alias}: attach it with "
                    f"`heroku addons:create heroku-inference:kimi-k2-5 --as {alias} -a APP`"
                )
    if url is not None:
        check_url(f"{alias}_URL", url)
    model = env.get(f"{alias}_MODEL_ID") or DEFAULT_MODEL
    known = MODEL_LIMITS.get(model)
    rpm_name, tpm_name, context_name = (f"{alias}_{n}" for n in ("RPM", "TPM", "CONTEXT_TOKENS"))
    if known is None and not (env.get(rpm_name) and env.get(tpm_name)):
        raise ConfigError(
            f"{alias}_MODEL_ID={model!r} has no known rate limits; "
            f"set {rpm_name} and {tpm_name} for it"
        )
    return Attachment(
        alias=alias,
        url=url,
        key=key,
        model_id=model,
        rpm=_int(env, rpm_name, known.rpm if known else 0, minimum=1),
        tpm=_int(env, tpm_name, known.tpm if known else 0, minimum=1),
        context_tokens=_int(
            env, context_name, known.context_tokens if known else DEFAULT_CONTEXT_TOKENS, minimum=1
        ),
        headroom=_headroom(env, f"{alias}_HEADROOM", headroom),
        price=usd_price(env, alias, known.price if known else None),
        limits_from_env=tuple(n for n in (rpm_name, tpm_name, context_name) if env.get(n)),
    )


def _headroom(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default, zero_ok=True)
    if value > 0.5:
        raise ConfigError(f"{name} must be at most 0.5, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, zero_ok: bool = False) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(
            f"{name} must be {'zero or more' if zero_ok else 'positive'}, got {value}"
        )
    return value
