from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``REDIS_URL`` if set, else a private redis-server for the session."""
    env = os.environ.get("REDIS_URL")
    if env:
        yield env
        return
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server this test may stop and restart (fault tests)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def key_prefix() -> str:
    """A key prefix unique to the test, so tests never touch each other's keys."""
    return f"capproxy-test-{uuid.uuid4().hex[:12]}"
