"""One Redis client serves many threads through a few connections, without errors."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest

from jobs.connections import REDIS_POOL_SIZE, redis_client

pytestmark = pytest.mark.integration


def test_hundreds_of_threads_share_a_bounded_pool(redis_url: str) -> None:
    probe = redis_client(redis_url)
    client = redis_client(redis_url)
    # Its connections carry a name of their own: the server counts them alone, whatever
    # other clients of this process or others come and go meanwhile.
    name = f"bi-test-pool-{secrets.token_hex(4)}"
    client.connection_pool.connection_kwargs["client_name"] = name
    key = f"{name}:counter"
    try:
        with ThreadPoolExecutor(300) as pool:
            # A script that holds its connection a little: many threads at once want one.
            script = client.register_script(
                "local t = redis.call('TIME'); return redis.call('INCR', KEYS[1])"
            )
            results = list(pool.map(lambda _: script(keys=[key]), range(3000)))
        assert sorted(int(r) for r in results) == list(range(1, 3001))
        # redis-py's default pool would have opened a connection per busy thread
        # (and raised "Too many connections" past 100).
        # The pool keeps its connections open until closed: count them on the server.
        opened = [c for c in probe.client_list() if c["name"] == name]
        assert 1 <= len(opened) <= REDIS_POOL_SIZE
    finally:
        client.delete(key)
        client.close()
        probe.close()
