"""Which worker processes are alive, so that a waiting user hears when none is.

Each worker process marks itself in one sorted set every :data:`MARK_EVERY_S`
seconds, scored by Redis's clock (so the dynos' clocks never matter), and removes
itself when it shuts down. A reader counts the marks younger than
:data:`ALIVE_FOR_S`. Nothing depends on this for correctness: it only tells
``submit --wait`` and ``wait()`` that nothing consumes the queue, and how to start a worker.
"""

from __future__ import annotations

import redis

from jobs.constants import WORKERS_KEY

#: Seconds between two marks of a live worker.
MARK_EVERY_S = 5.0
#: A worker not marked for this long counts as gone (three missed marks).
ALIVE_FOR_S = 3 * MARK_EVERY_S
#: What a user runs to start a worker, for the notice.
START_HINT = "start one with `python -m jobs worker` (on Heroku: `heroku ps:scale worker=1 -a APP`)"

# KEYS[1] the workers set; ARGV[1] member, ARGV[2] seconds after which a mark is dropped.
MARK_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return 1
"""

# KEYS[1] the workers set; ARGV[1] seconds a mark stays alive. Returns the live count.
COUNT_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')
"""


def mark(client: redis.Redis, member: str) -> None:
    """Say that worker ``member`` (``host:pid``) is alive now."""
    client.eval(MARK_SCRIPT, 1, WORKERS_KEY, member, str(10 * ALIVE_FOR_S))


def unmark(client: redis.Redis, member: str) -> None:
    """Say that worker ``member`` has stopped."""
    client.zrem(WORKERS_KEY, member)


def live_workers(client: redis.Redis) -> int:
    """How many worker processes marked themselves within :data:`ALIVE_FOR_S`."""
    return int(client.eval(COUNT_SCRIPT, 1, WORKERS_KEY, str(ALIVE_FOR_S)))
