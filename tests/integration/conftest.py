"""Fixtures of the integration tests beyond the shared ones in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.procs import WebProcess
from jobs.settings import Settings
from tests.integration.throttle_helpers import CountingRedis, counting_client
from tests.support import WEB_KEY, start_web


@pytest.fixture
def r(redis_url: str) -> Iterator[CountingRedis]:
    """A counting client on the flushed test database (see conftest's ``redis_url``)."""
    client = counting_client(redis_url)
    yield client
    client.close()


@pytest.fixture
def web(settings: Settings, tmp_path: Path) -> Iterator[WebProcess]:
    """``python -m web`` on the test's settings, accepting ``WEB_KEY``; the key never logged."""
    process = start_web(settings, tmp_path / "web.log")
    yield process
    process.stop(10)
    assert WEB_KEY not in process.log()
