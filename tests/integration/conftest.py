"""Fixtures of the integration tests beyond the shared ones in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.throttle_helpers import CountingRedis, counting_client


@pytest.fixture
def r(redis_url: str) -> Iterator[CountingRedis]:
    """A counting client on the flushed test database (see conftest's ``redis_url``)."""
    client = counting_client(redis_url)
    yield client
    client.close()
