"""The inference attachments a deployment calls: one, or a pool of them.

On Heroku an app may attach ``heroku-inference`` more than once, each time under its
own alias (``--as INFERENCE_2``); every attachment brings ``<ALIAS>_URL``,
``<ALIAS>_KEY`` and ``<ALIAS>_MODEL_ID``, and has its own key and its own limits.

1. ``INFERENCE_POOL`` names the aliases to use, comma-separated
   (``INFERENCE,INFERENCE_2``). Unset, the pool is the one ``INFERENCE`` attachment.
2. Per attachment, each read from ``<ALIAS>_<NAME>`` (for ``INFERENCE`` these are the
   ``INFERENCE_*`` variables of old):

   =====================  ============================================================
   ``URL``, ``KEY``        where to call and with what; required for a pooled alias
   ``MODEL_ID``            the model it serves (default ``kimi-k2-5``)
   ``RPM``, ``TPM``        its limits (default: the model table's)
   ``CONTEXT_TOKENS``      its model's context (default: the model table's)
   ``HEADROOM``            share of its limits left to other clients of its key
                           (default ``INFERENCE_HEADROOM``)
   ``PRICE_INPUT``,        USD per million tokens; a price belongs to a model, so the
   ``PRICE_OUTPUT``        attachments of one model must agree (default: the table's)
   =====================  ============================================================

   ``INFERENCE_TPM_CHARGE`` is the provider's, not an attachment's: one for the pool.
3. Each key is its own throttle bucket (:attr:`Attachment.bucket_name`): two aliases
   that carry the same key share one, and must then give it the same limits.
4. A job runs on whichever attachment serving its model admits it first
   (:mod:`worker.pool`); the ledger records its alias and key hash, never the key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from jobs.pricing import Price

#: The alias of the single attachment, and of the variables of old.
DEFAULT_ALIAS = "INFERENCE"
#: A valid alias: what ``heroku addons:create --as`` accepts, upper case.
_ALIAS_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class AttachmentError(ValueError):
    """An attachment's variable is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Attachment:
    """One inference add-on attachment: its key, its model and its limits."""

    alias: str
    url: str | None
    key: str = field(repr=False)
    model_id: str
    rpm: int
    tpm: int
    context_tokens: int
    headroom: float
    price: Price | None
    #: The variables that set its limits instead of the model table (empty: the table's).
    limits_from_env: tuple[str, ...] = ()

    @property
    def key_hash(self) -> str:
        """Short, non-reversible tag of the key: what the ledger and Redis see of it."""
        return key_hash(self.key)

    @property
    def bucket_name(self) -> str:
        """The throttle bucket: every alias (and process) with this key shares it."""
        return f"{self.model_id}:{self.key_hash}"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def pool_aliases(env: Mapping[str, str]) -> tuple[str, ...]:
    """The aliases ``INFERENCE_POOL`` names, in order; ``(INFERENCE,)`` when unset."""
    raw = env.get("INFERENCE_POOL", "")
    if not raw.strip():
        return (DEFAULT_ALIAS,)
    aliases = tuple(part.strip() for part in raw.split(","))
    for alias in aliases:
        if not alias or not set(alias) <= _ALIAS_CHARS or alias[0].isdigit():
            raise AttachmentError(
                f"INFERENCE_POOL must list attachment aliases such as INFERENCE,INFERENCE_2 "
                f"(upper case, digits, _), got {alias!r}"
            )
    if len(set(aliases)) != len(aliases):
        twice = next(a for a in aliases if aliases.count(a) > 1)
        raise AttachmentError(f"INFERENCE_POOL names {twice} twice")
    return aliases


def check_url(name: str, url: str) -> None:
    """An inference URL must be https, so the key never travels in clear text."""
    parts = urlsplit(url)
    if parts.scheme != "https" and not (
        parts.scheme == "http" and is_loopback_host(parts.hostname)
    ):
        raise AttachmentError(
            f"{name} must be https:// (plain http:// is accepted only for a "
            "loopback simulator), so the key never travels in clear text"
        )


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def agree(attachments: tuple[Attachment, ...]) -> tuple[Attachment, ...]:
    """The pool with one price per model and one set of limits per bucket, or an error.

    An attachment without a price of its own takes the price another attachment of
    its model sets.
    """
    prices: dict[str, tuple[str, Price]] = {}
    for a in attachments:
        if a.price is None:
            continue
        seen = prices.setdefault(a.model_id, (a.alias, a.price))
        if seen[1] != a.price:
            raise AttachmentError(
                f"{a.alias}_PRICE_INPUT/_OUTPUT differ from {seen[0]}'s for {a.model_id}: "
                "a price belongs to the model, so its attachments must agree"
            )
    buckets: dict[str, Attachment] = {}
    for a in attachments:
        first = buckets.setdefault(a.bucket_name, a)
        if (first.rpm, first.tpm, first.headroom) != (a.rpm, a.tpm, a.headroom):
            raise AttachmentError(
                f"{a.alias} carries the same key as {first.alias} and so shares its bucket, "
                f"but sets other limits: give both the same {a.alias}_RPM, _TPM and _HEADROOM"
            )
    return tuple(
        replace(a, price=prices[a.model_id][1]) if a.model_id in prices else a for a in attachments
    )


def distinct_buckets(attachments: tuple[Attachment, ...]) -> tuple[Attachment, ...]:
    """One attachment per bucket, the first of each, in order."""
    seen: dict[str, Attachment] = {}
    for a in attachments:
        seen.setdefault(a.bucket_name, a)
    return tuple(seen.values())


def limits_of(attachments: tuple[Attachment, ...], model: str) -> tuple[int, int] | None:
    """The summed rpm and tpm of the buckets serving ``model``; ``None``: none does."""
    serving = [a for a in distinct_buckets(attachments) if a.model_id == model]
    if not serving:
        return None
    return sum(a.rpm for a in serving), sum(a.tpm for a in serving)


def pool_variables(attachments: tuple[Attachment, ...]) -> dict[str, str]:
    """What makes a process started with them read ``attachments``: INFERENCE_POOL and
    the ``<ALIAS>_*`` variables of each attachment after the first (whose variables the
    caller passes as it always has); empty for one attachment."""
    if len(attachments) < 2:
        return {}
    env = {"INFERENCE_POOL": ",".join(a.alias for a in attachments)}
    for a in attachments[1:]:
        env |= {
            f"{a.alias}_URL": a.url or "",
            f"{a.alias}_KEY": a.key,
            f"{a.alias}_MODEL_ID": a.model_id,
            f"{a.alias}_RPM": str(a.rpm),
            f"{a.alias}_TPM": str(a.tpm),
            f"{a.alias}_CONTEXT_TOKENS": str(a.context_tokens),
            f"{a.alias}_HEADROOM": str(a.headroom),
        }
        if a.price is not None:
            env[f"{a.alias}_PRICE_INPUT"] = str(a.price.input)
            env[f"{a.alias}_PRICE_OUTPUT"] = str(a.price.output)
    return env


def usd_price(env: Mapping[str, str], prefix: str, default: Price | None) -> Price | None:
    """``<prefix>_PRICE_INPUT`` and ``<prefix>_PRICE_OUTPUT``, both or neither."""
    names = (f"{prefix}_PRICE_INPUT", f"{prefix}_PRICE_OUTPUT")
    given = [name for name in names if env.get(name)]
    if not given:
        return default
    if len(given) == 1:
        missing = next(name for name in names if name not in given)
        raise AttachmentError(
            f"{given[0]} is set but {missing} is not: set both (USD per million tokens), or neither"
        )

    def usd(name: str) -> float:
        raw = env[name]
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise AttachmentError(f"{name} must be a price in USD per million tokens, got {raw!r}")
        return value

    return Price(input=usd(names[0]), output=usd(names[1]))
