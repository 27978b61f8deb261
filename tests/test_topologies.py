"""The proxy on Redis Cluster and Sentinel: replicas share one cap exactly, and a failover
costs 503s for its own duration, then traffic resumes with no restart and nothing is
forwarded without a hold."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from aiohttp.test_utils import TestClient

from proxy.config import Settings
from proxy.redis_store import RedisStore
from proxy.state import LEDGER
from proxy.windows import Window
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import chat, cluster_store, sentinel_store, settings_for, spent
from tests.redis_topology import RedisCluster, SentinelSet

CHAT = "/v1/chat/completions"
REQUEST_MICROS = 10 * 1 + 20 * 2  # the fake upstream's usage at test-model's price
TENANTS = 12
# Each request holds, and is charged, its prompt estimate + 100 output tokens of
# test-model ($1 / $2 per 1M): a few hundred micro-USD.
BODY = chat(max_tokens=100)


def key(i: int) -> str:
    return f"sk-tenant-{i}"


def many_tenants(upstream_url: str, *, usd: str, window: str = "hourly", **over: Any) -> Settings:
    tenants = [{"id": f"t{i}", "api_keys": [key(i)]} for i in range(TENANTS)]
    caps = {"default_budget_caps": [{"window": window, "hard_limit_usd": usd}]}
    return settings_for(upstream_url, tenants=tenants, cost_caps=caps, **over)


async def post(client: TestClient[Any, Any], tenant: int) -> int:
    headers = {"Authorization": f"Bearer {key(tenant)}"}
    resp = await client.post(CHAT, json=BODY, headers=headers)
    await resp.read()
    return resp.status


async def test_two_replicas_on_a_cluster_hold_every_tenants_cap_exactly(
    upstream: FakeUpstream, make_client: MakeClient, cluster: RedisCluster, key_prefix: str
) -> None:
    # One request costs its whole hold here (no usage comes back): 5 fit in each cap.
    upstream.usage = lambda _p, _b: None
    upstream.stream_usage = "none"
    one = 8 + 100 * 2  # prompt estimate + output, in micro-USD
    settings = many_tenants(upstream.url, usd=str(Decimal(5 * one + one - 1) / 10**6))
    # 240 requests at once on one event loop: a timeout that measures the store, not the
    # loop's queue.
    stores = [cluster_store(cluster, key_prefix, timeout_s=5) for _ in range(2)]
    try:
        replicas = [await make_client(settings, store=store) for store in stores]
        # 12 tenants spread over the 3 shards, 20 concurrent requests each, half through
        # each replica.
        statuses = await asyncio.gather(
            *(post(replicas[n % 2], tenant) for tenant in range(TENANTS) for n in range(20))
        )
        assert Tally(statuses) == {200: 5 * TENANTS, 429: 15 * TENANTS}
        assert upstream.count == 5 * TENANTS
        masters = {cluster.master_for_key(f"{key_prefix}:{{t{i}}}:x") for i in range(TENANTS)}
        assert len(masters) == 3
        for tenant in range(TENANTS):
            used, held = await spent(stores[0], f"t{tenant}", "_default")
            assert (used, held) == (Decimal(5 * one) / 10**6, Decimal(0))
    finally:
        for store in stores:
            await store.aclose()


async def load_through(
    client: TestClient[Any, Any], failover: Callable[[], Awaitable[float]]
) -> list[tuple[float, int, int]]:
    """Requests from every tenant, one after another per tenant, before, during and
    after ``failover`` (which kills a node and returns when the topology has healed),
    until every tenant got through again. Returns (time, tenant, status) per request."""
    results: list[tuple[float, int, int]] = []
    stop = asyncio.Event()
    healed_at: list[float] = []
    back: set[int] = set()
    all_back = asyncio.Event()

    async def tenant_loop(tenant: int) -> None:
        while not stop.is_set():
            status = await post(client, tenant)
            now = time.monotonic()
            results.append((now, tenant, status))
            if healed_at and status == 200 and now > healed_at[0]:
                back.add(tenant)
                if len(back) == TENANTS:
                    all_back.set()

    loops = [asyncio.create_task(tenant_loop(i)) for i in range(TENANTS)]
    try:
        while len(results) < 50:  # traffic flows before the failover
            await asyncio.sleep(0.01)
        await failover()
        healed_at.append(time.monotonic())
        # Every tenant gets through again, with the proxy left as it was.
        await asyncio.wait_for(all_back.wait(), 30)
    finally:
        stop.set()
        await asyncio.gather(*loops)
    return results


async def lost_requests(
    client: TestClient[Any, Any], store: RedisStore, results: list[tuple[float, int, int]]
) -> int:
    """Answered requests whose spend the store does not have (writes a failover lost:
    replication is asynchronous), once every deferred settle has landed. Never negative:
    nothing is recorded twice."""
    await client.app[LEDGER].drain(timeout_s=10)
    assert client.app[LEDGER].pending == 0
    lost = 0
    for tenant in range(TENANTS):
        answered = sum(1 for _, t, status in results if t == tenant and status == 200)
        used, held = await spent(store, f"t{tenant}", "_default", Window.MONTHLY)
        assert held == 0
        recorded = int(used * 10**6)
        assert recorded <= answered * REQUEST_MICROS
        lost += answered - recorded // REQUEST_MICROS
    return lost


def gap_s(results: list[tuple[float, int, int]]) -> float:
    failed = [t for t, _, status in results if status != 200]
    return (max(failed) - min(failed)) if failed else 0.0


def events(caplog: Any, name: str) -> list[dict[str, Any]]:
    return [
        r.__dict__["fields"]
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == name
    ]


async def test_a_cluster_master_killed_under_load_costs_its_failover_and_no_restart(
    upstream: FakeUpstream,
    make_client: MakeClient,
    cluster: RedisCluster,
    key_prefix: str,
    capsys: Any,
    caplog: Any,
) -> None:
    caplog.set_level(logging.INFO)
    settings = many_tenants(upstream.url, usd="100", window="monthly")
    store = cluster_store(cluster, key_prefix)
    try:
        client = await make_client(settings, store=store)
        victim = cluster.master_for_key(f"{key_prefix}:{{t0}}:x")

        async def failover() -> float:
            await asyncio.to_thread(cluster.wait_replicated)
            cluster.kill(victim)
            return await asyncio.to_thread(cluster.wait_failover, victim)

        results = await load_through(client, failover)
        statuses = Tally(status for _, _, status in results)
        # Only 503 (fail_closed) while the shard failed over: never 500, never uncapped.
        assert set(statuses) <= {200, 503}, statuses
        assert upstream.count == statuses[200]
        lost = await lost_requests(client, store, results)
        # Said once each: down, the new topology, back (after a second without failures).
        async with asyncio.timeout(10):
            while not events(caplog, "store_back"):
                assert await post(client, 0) == 200
                await asyncio.sleep(0.05)
        assert len(events(caplog, "store_down")) == 1
        # Mid-outage the nodes disagree until the cluster converges: the change is said
        # once the store is back (twice at most, if the slots were read before the first
        # call failed). The victim leaves, and does not come back.
        changes = events(caplog, "store_topology_changed")
        assert 1 <= len(changes) <= 2, changes
        assert f"127.0.0.1:{victim}" in changes[0]["before"]
        assert all(f"127.0.0.1:{victim}" not in change["after"] for change in changes)
        assert len(events(caplog, "store_back")) == 1
        with capsys.disabled():
            print(
                f"\ncluster failover: {statuses[503]} x 503 over {gap_s(results):.2f} s, "
                f"{statuses[200]} x 200, {lost} lost"
            )
    finally:
        await store.aclose()


async def test_a_sentinel_failover_under_load_costs_its_duration_and_no_restart(
    upstream: FakeUpstream,
    make_client: MakeClient,
    sentinels: SentinelSet,
    key_prefix: str,
    capsys: Any,
) -> None:
    settings = many_tenants(upstream.url, usd="100", window="monthly")
    store = sentinel_store(sentinels, key_prefix)
    try:
        client = await make_client(settings, store=store)

        async def failover() -> float:
            sentinels.kill_primary()
            return await asyncio.to_thread(sentinels.wait_failover)

        results = await load_through(client, failover)
        statuses = Tally(status for _, _, status in results)
        assert set(statuses) <= {200, 503}, statuses
        assert upstream.count == statuses[200]
        lost = await lost_requests(client, store, results)
        with capsys.disabled():
            print(
                f"\nsentinel failover: {statuses[503]} x 503 over {gap_s(results):.2f} s, "
                f"{statuses[200]} x 200, {lost} lost"
            )
    finally:
        await store.aclose()


async def test_a_standalone_store_pointed_at_a_cluster_node_says_why_once_and_is_not_ready(
    upstream: FakeUpstream,
    make_client: MakeClient,
    cluster: RedisCluster,
    key_prefix: str,
    caplog: Any,
) -> None:
    caplog.set_level(logging.INFO)
    # Releases it could not write are retried until shutdown: keep that short.
    settings = many_tenants(upstream.url, usd="100", server={"shutdown_grace_s": 1})
    # A node that serves neither the store's own keys nor every tenant.
    store_slot_node = cluster.master_for_key(f"{key_prefix}:{{store}}:id")
    node = next(port for port in cluster.masters() if port != store_slot_node)
    store = RedisStore.from_url(f"redis://127.0.0.1:{node}/0", prefix=key_prefix, timeout_s=0.5)
    try:
        client = await make_client(settings, store=store)
        elsewhere = [
            i for i in range(TENANTS) if cluster.master_for_key(f"{key_prefix}:{{t{i}}}:x") != node
        ]
        statuses = [await post(client, tenant) for tenant in elsewhere for _ in range(3)]
        # Refused (nothing forwarded uncapped), never a 500.
        assert set(statuses) == {503}
        assert upstream.count == 0
        downs = events(caplog, "store_down")
        assert len(downs) == 1  # once per outage, not per request
        assert downs[0]["reason"].startswith("MovedError")
        assert "store.mode: cluster" in downs[0]["hint"]
        # Not ready: the store cannot run the scripts.
        assert (await client.get("/readyz")).status == 503
    finally:
        await store.aclose()
