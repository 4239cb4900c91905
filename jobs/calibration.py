"""Learn how the provider counts prompt tokens, per model and script, and how much of
``max_tokens`` the answers use.

:func:`jobs.tokens.estimate_prompt_tokens` over-estimates on purpose (it must
never be why a tokens/min limit is crossed), but by how much depends on the
tokenizer and the text: Latin text costs far fewer tokens per byte than CJK.
An estimate that is twice too high halves throughput when tokens bind, so the
throttle reserves ``raw estimate * factor``, where the factor is learned from
the ``prompt_tokens`` the provider reports.

The factor is the *largest* actual/raw ratio among the last
:data:`SAMPLES` calls of that model and script, plus a margin as wide as those
ratios are spread (between :data:`MIN_MARGIN` and :data:`MAX_MARGIN`; the widest
until the samples are trusted: :data:`TRUSTED_SAMPLES` calls, or two calls of
:data:`TRUSTED_TOKENS` between them, since a long prompt's ratio averages over all
its text): it tracks the tokenizer closely but errs high, so a reservation rarely
falls short of what the provider charges.
Every point of margin is a point of throughput lost when tokens bind, so text
that the tokenizer counts consistently gets the narrowest.

Where the provider charges what a call used (``INFERENCE_TPM_CHARGE=actual``), a call
reserves its answer at the share of ``max_tokens`` that recent answers used
(:meth:`Calibrator.completion_share`) instead of all of it, and is settled at its
real count: an answer that runs longer than that is charged in full when it settles.

The samples are the ledger's own rows: each call's attempt row carries the raw
estimate it was priced from, the prompt's script and ``max_tokens``, and gets the
provider's usage when its answer is recorded. So the calibration is shared by
every worker and dyno, survives a Redis flush and a new deployment, and costs no
write of its own; each process caches what it read for :data:`CACHE_S` seconds, and
while its samples are not trusted, until it records an answer itself
(:meth:`Calibrator.answered`) or for :data:`LEARNING_CACHE_S` (another process's): the
first answers of a batch reprice the rest of its first window at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import Table, select

from jobs.db import transaction
from jobs.models import Attempt
from jobs.tokens import Script

#: Ratios kept per model and script.
SAMPLES = 64
#: Headroom on the largest recent ratio, as a share of it: the spread of the
#: ratios ((largest - smallest) / largest), clamped to these bounds.
MIN_MARGIN, MAX_MARGIN = 0.01, 0.05
#: Samples below which the spread says too little and MAX_MARGIN applies, unless at
#: least two of them count TRUSTED_TOKENS prompt tokens between them.
TRUSTED_SAMPLES, TRUSTED_TOKENS = 8, 100_000
#: Seconds a process reuses a factor before reading the ledger again; while its
#: samples are not yet trusted, other processes' answers count within the second.
CACHE_S, LEARNING_CACHE_S = 10.0, 0.5
#: Bounds of the factor: the raw estimate is never trusted below a tenth of
#: itself, nor inflated more than threefold.
MIN_FACTOR, MAX_FACTOR = 0.1, 3.0
#: Calls too small to say anything about the tokenizer (fixed overheads dominate).
MIN_RAW_TOKENS = 32

_attempts = cast(Table, Attempt.__table__)


def trusted(samples: list[tuple[int, int]]) -> bool:
    """Whether ``(actual, raw)`` samples are enough for their spread to mean something."""
    return len(samples) >= TRUSTED_SAMPLES or (
        len(samples) >= 2 and sum(actual for actual, _ in samples) >= TRUSTED_TOKENS
    )


def margin(samples: list[tuple[int, int]]) -> float:
    """Headroom on the largest actual/raw ratio of ``samples``, as a share."""
    if not trusted(samples):
        return MAX_MARGIN
    ratios = [actual / raw for actual, raw in samples]
    spread = (max(ratios) - min(ratios)) / max(ratios)
    return min(MAX_MARGIN, max(MIN_MARGIN, spread))


class Calibrator:
    """Shared per-model corrections: of the prompt-token estimate, per script, and of the
    completion budget to reserve where the provider charges actual usage."""

    def __init__(self, database_url: str, *, clock: Any = time.monotonic) -> None:
        self._database_url = database_url
        self._clock = clock
        self._lock = threading.Lock()
        # Answers this process recorded (:meth:`answered`); a value still learning is good
        # only while the count is the one it was read at.
        self._answers = 0
        # key -> (value, read again after, the answers then; None once trusted)
        self._cache: dict[tuple[str, ...], tuple[float, float, int | None]] = {}

    def factor(self, model: str, script: Script) -> float:
        """The current factor; 1.0 until the provider has reported anything."""

        def read() -> tuple[float, bool]:
            samples = self.samples(model, script)
            if not samples:
                return 1.0, False
            largest = max(actual / raw for actual, raw in samples)
            value = min(MAX_FACTOR, max(MIN_FACTOR, largest * (1 + margin(samples))))
            return value, trusted(samples)

        return self._cached(("prompt", model, script), read)

    def completion_share(self, model: str) -> float:
        """The share of ``max_tokens`` to reserve for an answer: the largest share that
        the last :data:`SAMPLES` answers of ``model`` used, plus :data:`MAX_MARGIN`;
        all of it (1.0) until :data:`TRUSTED_SAMPLES` answers were seen."""

        def read() -> tuple[float, bool]:
            samples = self.completion_samples(model)
            if len(samples) < TRUSTED_SAMPLES:
                return 1.0, False
            largest = max(used / budget for used, budget in samples)
            return min(1.0, largest * (1 + MAX_MARGIN)), True

        return self._cached(("completion", model), read)

    def _cached(self, key: tuple[str, ...], read: Callable[[], tuple[float, bool]]) -> float:
        """``read()``'s value, read again after :data:`CACHE_S` once its samples are trusted
        and after :data:`LEARNING_CACHE_S` before."""
        now = self._clock()
        with self._lock:
            cached, answers = self._cache.get(key), self._answers
            if cached is not None and now < cached[1] and cached[2] in (None, answers):
                return cached[0]
        value, sure = read()
        # Counted before the read: an answer recorded during it makes the value old at once.
        learning = None if sure else answers
        with self._lock:
            self._cache[key] = (value, now + (CACHE_S if sure else LEARNING_CACHE_S), learning)
        return value

    def answered(self) -> None:
        """This process just recorded an answer: what is still learning is read again at
        the next ask, so that the answer reprices the calls in flight at once."""
        with self._lock:
            self._answers += 1

    def samples(self, model: str, script: Script) -> list[tuple[int, int]]:
        """(actual, raw) prompt tokens of the last :data:`SAMPLES` answered calls, newest first."""
        a = _attempts.c
        query = (
            select(a.prompt_tokens, a.est_prompt_tokens)
            .where(
                a.model == model,
                a.script == script,
                a.est_prompt_tokens.is_not(None),
                a.est_prompt_tokens >= MIN_RAW_TOKENS,
                a.prompt_tokens > 0,
            )
            .order_by(a.id.desc())
            .limit(SAMPLES)
        )
        with transaction(self._database_url) as tx:
            rows = tx.execute(query).all()
        return [(int(actual), int(raw)) for actual, raw in rows]

    def completion_samples(self, model: str) -> list[tuple[int, int]]:
        """(completion tokens, max_tokens) of the last :data:`SAMPLES` answered calls."""
        a = _attempts.c
        query = (
            select(a.completion_tokens, a.max_tokens)
            .where(a.model == model, a.max_tokens > 0, a.http_status == 200)
            .order_by(a.id.desc())
            .limit(SAMPLES)
        )
        with transaction(self._database_url) as tx:
            rows = tx.execute(query).all()
        return [(int(used), int(budget)) for used, budget in rows]

    def estimate(self, model: str, script: Script, raw_tokens: int) -> int:
        """The prompt tokens to reserve for a prompt in ``script`` whose raw estimate is
        ``raw_tokens``."""
        return max(1, math.ceil(raw_tokens * self.factor(model, script)))
