"""The key circuit: stop calling the provider while it rejects our key (401/403).

A rejected key fails every call the same way, so failing the backlog one job at
a time would only burn it. Instead the first 401/403 opens a circuit shared by
every worker on the key (one Redis hash per key fingerprint, see
:func:`jobs.constants.circuit_key`):

* **open**: workers hand their jobs back to the queue without calling, with the
  reason as the job's last error; the dispatcher publishes nothing.
* **probe**: once ``retry_at`` passes, one dispatcher picks one queued job as the
  probe (:meth:`KeyCircuit.claim_probe`) and publishes it alone. Only the worker
  holding that job may call. A success closes the circuit; another rejection
  reopens it with the wait doubled, up to :data:`MAX_RETRY_S`.

In a pool of attachments (:mod:`jobs.attachments`) each key has its circuit. While
one key is accepted the dispatcher publishes as usual: a worker sets an attachment
whose circuit is open aside until its probe is due (:mod:`worker.pool`), and the
first job to find it due becomes its probe (:meth:`KeyCircuit.claim_probe`).

A new key has a new fingerprint and therefore starts closed: on Heroku,
changing INFERENCE_KEY restarts the dynos and work resumes at once. A key
fixed at the provider's side is found by the next probe.

Every script reads the clock with Redis ``TIME``, like the throttle, so dynos
with skewed clocks agree on ``retry_at``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import redis
from redis.commands.core import Script

from jobs.attachments import DEFAULT_ALIAS
from jobs.connections import shared_redis
from jobs.constants import KEY_PREFIX, circuit_key
from jobs.settings import Settings

#: Longest wait between two probes, however often the key was rejected.
MAX_RETRY_S = 900.0
#: An open circuit whose key nobody probes any more (a retired key) expires.
IDLE_EXPIRY_S = 7 * 24 * 3600

Gate = Literal["closed", "probe", "open"]

# KEYS[1] circuit hash. ARGV[1] reason, ARGV[2] HTTP status, ARGV[3] first wait ms,
# ARGV[4] longest wait ms, ARGV[5] job id of the caller, ARGV[6] idle expiry ms,
# ARGV[7] the alias of the attachment the key came with (for ``status``).
# Opens the circuit, or reopens it after a failed probe with the wait doubled. A
# rejection arriving while the circuit is already open (calls that were in flight
# when it opened) only refreshes the reason. Returns retry_at (ms, Redis time).
OPEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local retry_at = tonumber(redis.call('HGET', key, 'retry_at'))
local probe = redis.call('HGET', key, 'probe_job')
if retry_at == nil or probe == ARGV[5] or now >= retry_at then
  local failures = redis.call('HINCRBY', key, 'failures', 1)
  local wait = math.min(tonumber(ARGV[4]), tonumber(ARGV[3]) * 2 ^ (failures - 1))
  retry_at = now + wait
  redis.call('HSET', key, 'retry_at', string.format('%d', retry_at), 'probe_job', '')
  redis.call('HSETNX', key, 'opened_at', string.format('%d', now))
end
redis.call('HSET', key, 'reason', ARGV[1], 'status', ARGV[2], 'last_at', string.format('%d', now),
  'alias', ARGV[7])
redis.call('PEXPIRE', key, ARGV[6])
return retry_at
"""

# KEYS[1] circuit hash. ARGV[1] job id, ARGV[2] probe lease ms.
# Makes job ARGV[1] the probe when the circuit is due; the lease stops a second
# probe until this one has had time to answer (or its worker has died).
# Returns 0 when the circuit is closed, 1 when the job is now the probe, -1 when
# the circuit is open and not due.
CLAIM_PROBE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local retry_at = tonumber(redis.call('HGET', KEYS[1], 'retry_at'))
if retry_at == nil then
  return 0
end
if now < retry_at then
  return -1
end
redis.call('HSET', KEYS[1], 'probe_job', ARGV[1],
  'retry_at', string.format('%d', now + tonumber(ARGV[2])))
return 1
"""

# KEYS[1] circuit hash. ARGV[1] job id of the probe that succeeded.
# Closes the circuit unless somebody reopened it for another probe meanwhile.
CLOSE = """
if redis.call('HGET', KEYS[1], 'probe_job') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class CircuitState:
    """An open circuit, as ``status`` shows it."""

    reason: str
    status: int
    failures: int
    opened_at: dt.datetime
    retry_at: dt.datetime
    #: The alias of the attachment whose key it is (``INFERENCE`` without a pool).
    alias: str = DEFAULT_ALIAS

    def describe(self) -> str:
        """One line for ``status``: why nothing is called, and when the next try is."""
        return (
            f"calls paused: the provider rejected the inference key (HTTP {self.status}: "
            f"{self.reason}) since {self.opened_at:%Y-%m-%d %H:%M:%S}Z; jobs stay queued; "
            f"next try at {self.retry_at:%H:%M:%S}Z ({self.failures} rejected so far); "
            f"fix {self.alias}_KEY to resume"
        )

    def describe_aside(self) -> str:
        """One line for an attachment of a pool set aside while others take its calls."""
        return (
            f"{self.alias} set aside: the provider rejected its key (HTTP {self.status}: "
            f"{self.reason}) since {self.opened_at:%Y-%m-%d %H:%M:%S}Z; its calls go to "
            f"the other attachments; next try at {self.retry_at:%H:%M:%S}Z "
            f"({self.failures} rejected so far); fix {self.alias}_KEY to use it again"
        )


@dataclass(frozen=True)
class _Scripts:
    open: Script
    claim_probe: Script
    close: Script


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _seconds_until(at_ms: int, now: tuple[int, int]) -> float:
    """Seconds from Redis ``TIME`` (``now``: seconds, microseconds) to ``at_ms``, never
    negative."""
    now_s, now_us = now
    return max(0.0, at_ms / 1000 - (int(now_s) + int(now_us) / 1e6))


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).replace(tzinfo=None)


class KeyCircuit:
    """The circuit of one inference key (by fingerprint), shared through Redis."""

    def __init__(
        self,
        client: redis.Redis,
        fingerprint: str,
        *,
        first_wait_s: float,
        alias: str = DEFAULT_ALIAS,
    ) -> None:
        self.client = client
        self.fingerprint = fingerprint
        self.alias = alias
        self.key = circuit_key(fingerprint)
        self.first_wait_s = first_wait_s
        self._scripts = _Scripts(*(client.register_script(s) for s in (OPEN, CLAIM_PROBE, CLOSE)))

    def gate(self, job_id: int) -> Gate:
        """May the worker holding ``job_id`` call now? One Redis command."""
        probe = self.client.hget(self.key, "probe_job")
        if probe is None:
            return "closed"
        return "probe" if probe == str(job_id).encode() else "open"

    def open(self, reason: str, status: int, job_id: int) -> float:
        """Record a rejection by ``job_id``'s call; returns seconds until the next probe."""
        retry_at = self._scripts.open(
            keys=[self.key],
            args=[
                reason[:300],
                status,
                int(self.first_wait_s * 1000),
                int(MAX_RETRY_S * 1000),
                job_id,
                IDLE_EXPIRY_S * 1000,
                self.alias,
            ],
        )
        return _seconds_until(int(retry_at), self.client.time())

    def due_in(self) -> float:
        """Seconds until the next probe is due, by Redis time (0.0: due, or closed)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.key, "retry_at")
            pipe.time()
            retry_at, now = pipe.execute()
        return 0.0 if retry_at is None else _seconds_until(int(retry_at), now)

    def claim_probe(self, job_id: int, lease_s: float) -> int:
        """Make ``job_id`` the probe if due: 0 closed, 1 claimed, -1 open and not due."""
        return int(self._scripts.claim_probe(keys=[self.key], args=[job_id, int(lease_s * 1000)]))

    def close(self, job_id: int) -> bool:
        """The probe ``job_id`` succeeded: close the circuit."""
        return bool(self._scripts.close(keys=[self.key], args=[job_id]))

    def is_open(self) -> bool:
        """Is the circuit open (probe or not)? One Redis command."""
        return bool(self.client.exists(self.key))

    def state(self) -> CircuitState | None:
        """The open circuit, or ``None`` when calls flow."""
        raw = self.client.hgetall(self.key)
        if not raw or b"retry_at" not in raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return CircuitState(
            reason=fields.get("reason", ""),
            status=int(fields.get("status") or 0),
            failures=int(fields.get("failures") or 0),
            opened_at=_utc(int(fields.get("opened_at") or fields["retry_at"])),
            retry_at=_utc(int(fields["retry_at"])),
            alias=fields.get("alias") or DEFAULT_ALIAS,
        )


def for_settings(settings: Settings) -> list[KeyCircuit]:
    """The circuit of each key of the pool (one per key), on this process's Redis client."""
    assert settings.redis_url is not None
    client = shared_redis(settings.redis_url)
    seen: dict[str, KeyCircuit] = {}
    for a in settings.attachments:
        if a.key_hash not in seen:
            seen[a.key_hash] = KeyCircuit(
                client, a.key_hash, first_wait_s=settings.auth_retry_s, alias=a.alias
            )
    return list(seen.values())


def paused_reason(settings: Settings) -> str | None:
    """Why calls are paused, or ``None`` when they flow: the provider rejects every key
    of the pool (while one key is accepted, its attachment takes the calls).

    Without INFERENCE_KEY in this process (an operator's shell), any open
    circuit on this Redis is reported.
    """
    circuits = for_settings(settings)
    if settings.inference_key:
        states = [circuit.state() for circuit in circuits]
        if any(state is None for state in states):
            return None
    else:
        client = circuits[0].client
        states = [
            KeyCircuit(client, _text(key).rsplit(":", 1)[1], first_wait_s=0).state()
            for key in client.scan_iter(match=f"{KEY_PREFIX}circuit:*", count=100)
        ]
    found = [s.describe() for s in states if s is not None]
    return "; ".join(found) or None


def set_aside(settings: Settings) -> str | None:
    """The attachments of the pool whose key the provider rejects while another's is
    accepted (calls flow, through fewer keys), or ``None``."""
    if not settings.inference_key:
        return None
    states = [circuit.state() for circuit in for_settings(settings)]
    if all(state is not None for state in states):
        return None  # every key rejected: paused_reason says so
    return "; ".join(s.describe_aside() for s in states if s is not None) or None
