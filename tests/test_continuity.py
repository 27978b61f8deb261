"""No silent budget resets: a store that lost recorded spend (restarted empty, flushed, a
cluster shard that lost its data) is noticed by every replica, said once (log, metric,
alert), and refused or gone on from, as configured; the spend journal restores it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpServer

from proxy.cli import main
from proxy.config import Settings
from proxy.journal import Journal, journal_files, read_entries
from proxy.redis_store import RedisStore
from proxy.state import JOURNAL, METRICS
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import OTHER_KEY, auth, chat, settings_for, spent
from tests.redis_server import RedisServer
from tests.redis_topology import RedisCluster
from tests.test_alerts import Receiver

CHAT = "/v1/chat/completions"
REQUEST = Decimal("0.00005")  # the fake upstream's usage at test-model's price
WAIT_S = 10


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> AsyncIterator[Receiver]:
    fake = Receiver()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("/hook"))
    yield fake
    fake.release.set()


def caps(upstream_url: str, store_url: str, **over: Any) -> Settings:
    return settings_for(upstream_url, store={"url": store_url, **over.pop("store", {})}, **over)


def journal_of(client: TestClient[Any, Any]) -> Journal:
    journal: Journal | None = client.app[JOURNAL]
    assert journal is not None
    return journal


async def status(client: TestClient[Any, Any], key: str | None = None) -> int:
    resp = await client.post(CHAT, json=chat(max_tokens=10), headers=auth(*([key] if key else [])))
    await resp.read()
    return resp.status


async def until_refused(client: TestClient[Any, Any], key: str | None = None) -> float:
    """Seconds until the proxy refuses the tenant with store_data_lost (requests sent
    meanwhile may be admitted: the store has not been judged yet)."""
    started = time.monotonic()
    async with asyncio.timeout(WAIT_S):
        while True:
            headers = auth(*([key] if key else []))
            resp = await client.post(CHAT, json=chat(max_tokens=10), headers=headers)
            body = await resp.json()
            if resp.status == 503 and body["error"]["code"] == "store_data_lost":
                assert int(resp.headers["Retry-After"]) >= 1
                return time.monotonic() - started
            await asyncio.sleep(0.05)


def lost_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.__dict__["fields"]
        for r in caplog.records
        if isinstance(r.__dict__.get("fields"), dict)
        and r.__dict__["fields"].get("event") == "store_data_lost"
    ]


async def test_a_redis_restarted_empty_is_refused_by_every_replica_and_said_once(
    tmp_path: Path,
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_server: RedisServer,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    capsys: Any,
) -> None:
    caplog.set_level(logging.INFO)
    settings = caps(upstream.url, redis_server.url, alerts={"webhook_url": receiver.url})
    first = await make_client(settings)
    second = await make_client(settings)
    assert await status(first) == 200
    assert await status(second, OTHER_KEY) == 200
    redis_server.stop()
    redis_server.start()  # no persistence: every counter is gone
    # Both replicas ran through it: each refuses, within about a second, every tenant,
    # even one whose own counters it never touched since.
    took = await until_refused(first)
    assert await until_refused(second) < 2
    assert await until_refused(first, OTHER_KEY) < 2
    admitted = upstream.count
    assert admitted <= 3  # at most the one request that found the loss got through
    with capsys.disabled():
        print(f"\nloss noticed {took:.2f} s after the restart")

    # A replica started after the loss refuses too.
    late = await make_client(settings)
    assert await until_refused(late) < 2
    assert upstream.count == admitted

    # Said once: an ERROR line, a metric and an alert.
    lines = lost_lines(caplog)
    assert lines and all(line["tenant"] == "*" for line in lines)
    assert all(
        r.levelno == logging.ERROR
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == "store_data_lost"
    )
    metrics = first.app[METRICS].render()[0].decode()
    assert 'capproxy_store_data_loss_total{scope="store"}' in metrics
    await receiver.wait_for(1)
    assert receiver.kinds[0] == "store_data_lost"
    assert receiver.bodies[0]["tenant_id"] == "*"

    # An operator accepts the loss: requests go on from zero.
    path = write(settings, tmp_path)
    assert await asyncio.to_thread(main, ["restore", "--config", str(path), "--accept-loss"]) == 0
    async with asyncio.timeout(WAIT_S):
        while await status(first) != 200:
            await asyncio.sleep(0.05)


def write(settings: Settings, folder: Path) -> Path:
    """A caps file naming the same store (all the restore command needs)."""
    path = folder / "caps.yaml"
    store = settings.store.url.get_secret_value()
    path.write_text(
        f"upstreams: [{{name: up, base_url: 'http://127.0.0.1:9'}}]\nstore: {{url: '{store}'}}\n"
    )
    return path


async def test_with_continue_the_proxy_goes_on_from_zero_and_says_so(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = caps(upstream.url, redis_server.url, store={"on_data_loss": "continue"})
    client = await make_client(settings)
    assert await status(client) == 200
    redis_server.stop()
    redis_server.start()
    async with asyncio.timeout(WAIT_S):
        while not lost_lines(caplog):
            assert await status(client) == 200
            await asyncio.sleep(0.05)
    assert await status(client) == 200
    assert lost_lines(caplog)[0]["policy"] == "continue"


async def test_a_persistent_redis_restarted_keeps_every_budget(
    upstream: FakeUpstream, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = RedisServer(appendonly=True)
    server.start()
    try:
        store = RedisStore.from_url(server.url, timeout_s=0.5)
        client = await make_client(caps(upstream.url, server.url), store=store)
        for _ in range(3):
            assert await status(client) == 200
        server.stop()  # SIGKILL
        server.start()  # AOF: everything is back
        async with asyncio.timeout(WAIT_S):
            while await status(client) != 200:
                await asyncio.sleep(0.05)
        checks = store.watch_checks
        async with asyncio.timeout(WAIT_S):  # two more checks: nothing is declared lost
            while store.watch_checks < checks + 2:
                await asyncio.sleep(0.05)
        assert not lost_lines(caplog)
        assert (await spent(store))[0] == 4 * REQUEST
        await store.aclose()
    finally:
        server.close()


async def test_flushall_is_noticed_without_any_request(
    upstream: FakeUpstream, make_client: MakeClient, redis_server: RedisServer
) -> None:
    store = RedisStore.from_url(redis_server.url, timeout_s=0.5)
    client = await make_client(caps(upstream.url, redis_server.url), store=store)
    assert await status(client) == 200
    await store.client.flushall()
    async with asyncio.timeout(WAIT_S):
        while not store.lost[0]:
            await asyncio.sleep(0.05)
    assert await status(client) == 503
    await store.aclose()


async def test_a_cluster_shard_that_lost_its_data_refuses_only_its_tenants(
    upstream: FakeUpstream, make_client: MakeClient, cluster: RedisCluster, key_prefix: str
) -> None:
    tenants = [{"id": f"t{i}", "api_keys": [f"sk-t{i}"]} for i in range(9)]
    settings = settings_for(upstream.url, tenants=tenants)
    store = RedisStore.from_url(cluster.seed_url, prefix=key_prefix, timeout_s=1, mode="cluster")
    try:
        client = await make_client(settings, store=store)
        for i in range(9):
            assert await status(client, f"sk-t{i}") == 200
        store_node = cluster.master_for_key(store.store_key("id"))
        victim = next(
            port
            for port in cluster.masters()
            if port != store_node
            and any(cluster.master_for_key(f"{key_prefix}:{{t{i}}}:x") == port for i in range(9))
        )
        await asyncio.to_thread(cluster.flushall_node, victim)
        for i in range(9):
            on_victim = cluster.master_for_key(f"{key_prefix}:{{t{i}}}:x") == victim
            if on_victim:
                await until_refused(client, f"sk-t{i}")
            else:
                assert await status(client, f"sk-t{i}") == 200
        assert store.lost[0] is False
    finally:
        await store.aclose()


async def test_the_journal_restores_what_the_store_lost_once(
    tmp_path: Path,
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_server: RedisServer,
) -> None:
    journal = tmp_path / "spend.jsonl"
    settings = caps(upstream.url, redis_server.url, journal={"path": str(journal)})
    store = RedisStore.from_url(redis_server.url, timeout_s=0.5)
    client = await make_client(settings, store=store)
    for _ in range(3):
        assert await status(client) == 200
    assert await status(client, OTHER_KEY) == 200
    assert await journal_of(client).flush()
    entries = list(read_entries(journal_files(journal)))
    assert len(entries) == 4
    assert {e.tenant for e in entries} == {"acme", "globex"}
    assert all(e.cost_micros == 50 and e.epoch for e in entries)
    assert (await spent(store))[0] == 3 * REQUEST

    redis_server.stop()
    redis_server.start()
    await until_refused(client)
    path = write(settings, tmp_path)
    assert await asyncio.to_thread(main, ["restore", "--config", str(path), str(journal)]) == 0
    # Restored, and admitted again; a second replay changes nothing.
    assert await asyncio.to_thread(main, ["restore", "--config", str(path), str(journal)]) == 0
    async with asyncio.timeout(WAIT_S):
        while await status(client) != 200:
            await asyncio.sleep(0.05)
    assert (await spent(store))[0] == 4 * REQUEST
    assert (await spent(store, "globex"))[0] == REQUEST
    # Entries already present (recorded under the current epoch) are not added again.
    await journal_of(client).flush()
    assert await asyncio.to_thread(main, ["restore", "--config", str(path), str(journal)]) == 0
    assert (await spent(store))[0] == 4 * REQUEST
    await store.aclose()


async def test_an_evicting_maxmemory_policy_is_warned_about_at_start(
    upstream: FakeUpstream, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = RedisServer(extra=("--maxmemory-policy", "allkeys-lru"))
    server.start()
    try:
        store = RedisStore.from_url(server.url, timeout_s=0.5)
        await make_client(caps(upstream.url, server.url), store=store)
        warnings = [
            r.__dict__["fields"]["detail"]
            for r in caplog.records
            if isinstance(r.__dict__.get("fields"), dict)
            and r.__dict__["fields"].get("event") == "store_warning"
        ]
        assert any("allkeys-lru" in w and "noeviction" in w for w in warnings)
        await store.aclose()
    finally:
        server.close()


async def test_the_journal_restores_model_cap_and_end_user_budgets_and_only_budgets(
    tmp_path: Path,
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_server: RedisServer,
) -> None:
    journal = tmp_path / "spend.jsonl"
    cost_caps = {
        "default_rate_caps": [{"window": "daily", "max_tokens": 100_000, "max_requests": 50}],
        "model_caps": [
            {
                "name": "all",
                "models": ["*"],
                "budget_caps": [{"window": "daily", "hard_limit_usd": 5}],
            }
        ],
        "user_caps": {"budget_caps": [{"window": "daily", "hard_limit_usd": 1}]},
    }
    settings = caps(
        upstream.url, redis_server.url, journal={"path": str(journal)}, cost_caps=cost_caps
    )
    store = RedisStore.from_url(redis_server.url, timeout_s=0.5)
    client = await make_client(settings, store=store)
    for _ in range(2):
        resp = await client.post(CHAT, json=chat(max_tokens=10, user="u1"), headers=auth())
        assert resp.status == 200
    assert await journal_of(client).flush()
    entries = list(read_entries(journal_files(journal)))
    kinds = {
        (c[4] if len(c) == 5 else "agent" if c[0] else "tenant", c[1]) for c in entries[0].counters
    }
    # Budgets only: the rate caps' windows count tokens and requests, not money.
    assert kinds == {("agent", "hourly"), ("agent", "daily"), ("model", "daily"), ("user", "daily")}

    redis_server.stop()
    redis_server.start()
    await until_refused(client)
    path = write(settings, tmp_path)
    assert await asyncio.to_thread(main, ["restore", "--config", str(path), str(journal)]) == 0
    resp = await client.get("/api/v1/costs/current", headers=auth(), params={"user_id": "u1"})
    snapshot = json.loads(await resp.text(), parse_float=Decimal)
    (model,) = snapshot["model_cap_windows"]
    (user,) = snapshot["user_windows"]
    assert model["current_spend_usd"] == user["current_spend_usd"] == 2 * REQUEST
    daily = [w for w in snapshot["windows"] if w["window"] == "daily"]
    assert daily[0]["current_spend_usd"] == 2 * REQUEST  # restored once, not once per window
    await store.aclose()
