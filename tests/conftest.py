from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.app import create_app
from proxy.config import Settings
from proxy.counters import Store
from proxy.redis_store import RedisStore
from tests.fake_upstream import FakeUpstream
from tests.redis_server import RedisServer
from tests.redis_topology import RedisCluster, SentinelSet


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
    """A private redis-server this test may stop and restart (fault tests).

    Request it before ``make_client`` so that it outlives the app (whose shutdown still
    writes to it)."""
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


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> FakeUpstream:
    """The fake OpenAI-compatible upstream, served on loopback."""
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("/v1"))
    return fake


@pytest.fixture
async def redis_store(redis_url: str, key_prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_url, prefix=key_prefix, timeout_s=0.25)
    try:
        yield store
    finally:
        await store.aclose()


class ServedLikeProduction(TestServer):
    """The app served as ``capproxy serve`` serves it: a client that goes away does not
    cancel its handler (aiohttp's test server cancels by default; ``web.run_app`` does not)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        kwargs["handler_cancellation"] = False
        return await super()._make_runner(**kwargs)


MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient) -> MakeClient:
    """Start the real app on loopback with the given settings (and store)."""

    async def make(
        settings: Settings, store: Store | None = None
    ) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, None] = await aiohttp_client(
            ServedLikeProduction(create_app(settings, store=store))
        )
        return cast(TestClient[web.Request, web.Application], client)

    return make


@pytest.fixture(scope="session")
def cluster_topology() -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 masters with a replica each, for the session."""
    with RedisCluster(masters=3, replicas=1) as topology:
        yield topology


@pytest.fixture
def cluster(cluster_topology: RedisCluster) -> RedisCluster:
    """The session's cluster with every node running and all replicas in sync (a test
    that killed a node gets it back here, as a replica)."""
    cluster_topology.heal()
    return cluster_topology


@pytest.fixture(scope="session")
def sentinel_topology() -> Iterator[SentinelSet]:
    """A primary, its replica and three sentinels, for the session."""
    with SentinelSet() as topology:
        yield topology


@pytest.fixture
def sentinels(sentinel_topology: SentinelSet) -> SentinelSet:
    sentinel_topology.heal()
    return sentinel_topology
