"""One Redis client serves many threads through a few connections, without errors."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import redis

from jobs.connections import REDIS_POOL_SIZE, redis_client

pytestmark = pytest.mark.integration


def _ours(probe: redis.Redis) -> int:
    """Clients the server sees from this process (other processes may share the server)."""
    server = int(probe.connection_pool.connection_kwargs["port"])
    ports = {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == server
    }
    return sum(int(str(e["addr"]).rsplit(":", 1)[1]) in ports for e in probe.client_list())


def test_hundreds_of_threads_share_a_bounded_pool(redis_url: str) -> None:
    probe = redis_client(redis_url)
    probe.ping()  # its own connection is open before the first count
    before = _ours(probe)
    client = redis_client(redis_url)
    name = f"bi-test-pool-{threading.get_ident()}"
    try:
        with ThreadPoolExecutor(300) as pool:
            # A script that holds its connection a little: many threads at once want one.
            script = client.register_script(
                "local t = redis.call('TIME'); return redis.call('INCR', KEYS[1])"
            )
            results = list(pool.map(lambda _: script(keys=[name]), range(3000)))
        assert sorted(int(r) for r in results) == list(range(1, 3001))
        # redis-py's default pool would have opened a connection per busy thread
        # (and raised "Too many connections" past 100).
        # The pool keeps its connections open until closed: count them on the server.
        assert 1 <= _ours(probe) - before <= REDIS_POOL_SIZE
    finally:
        client.delete(name)
        client.close()
        probe.close()
