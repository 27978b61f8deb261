"""Junk cannot grow the store: requests that cost nothing leave no keys, and a tenant
names a bounded number of agents a day."""

from __future__ import annotations

import asyncio

from proxy.redis_store import RedisStore
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import TENANT_KEY, auth, chat, settings_for

CHAT = "/v1/chat/completions"


async def keys_of(store: RedisStore) -> list[bytes]:
    """The store's keys but its own identity (written once, at start)."""
    keys = store.client.scan_iter(match=f"{store.prefix}:*", count=1000)
    return sorted([key async for key in keys if b":{store}:" not in key])


async def test_invented_keys_and_agents_the_upstream_refuses_leave_no_key(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.status = 401  # the upstream refuses them all: nothing billed
    upstream.error_body = {"error": {"message": "bad key", "code": "invalid_api_key"}}
    passthrough = settings_for(upstream.url, auth={"mode": "passthrough"})
    client = await make_client(passthrough, store=redis_store)
    before = await keys_of(redis_store)

    async def junk(i: int) -> int:
        headers = auth(f"sk-invented-{i}", agent=f"agent-{i}")
        resp = await client.post(CHAT, json=chat(max_tokens=10), headers=headers)
        return resp.status

    statuses: list[int] = []
    for first in range(0, 400, 20):  # 20 at a time: within the store's 250 ms timeout
        statuses += await asyncio.gather(*(junk(i) for i in range(first, first + 20)))
    assert set(statuses) == {401}
    assert upstream.count == 400
    assert await keys_of(redis_store) == before


async def test_a_tenant_naming_too_many_agents_in_a_day_is_refused(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    settings = settings_for(upstream.url, cost_caps={"max_agents_per_tenant": 3})
    client = await make_client(settings, store=redis_store)
    for i in range(3):
        headers = auth(agent=f"agent-{i}")
        assert (await client.post(CHAT, json=chat(max_tokens=10), headers=headers)).status == 200
    resp = await client.post(CHAT, json=chat(max_tokens=10), headers=auth(agent="agent-3"))
    assert resp.status == 429
    error = (await resp.json())["error"]
    assert error["code"] == "too_many_agents"
    assert "max_agents_per_tenant" in error["message"]
    assert resp.headers["x-should-retry"] == "false"
    assert 0 < int(resp.headers["Retry-After"]) <= 86_400
    assert upstream.count == 3
    # The agents already seen today go on.
    resp = await client.post(CHAT, json=chat(max_tokens=10), headers=auth(agent="agent-1"))
    assert resp.status == 200


async def until_forwarded(upstream: FakeUpstream, count: int) -> None:
    async with asyncio.timeout(10):
        while upstream.count < count:
            upstream.arrived.clear()
            if upstream.count < count:
                await upstream.arrived.wait()


async def test_two_replicas_hold_a_limit_of_requests_in_flight_exactly(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    settings = settings_for(
        upstream.url,
        tenants=[{"id": "acme", "api_keys": [TENANT_KEY], "max_concurrent_requests": 3}],
        cost_caps={"default_max_concurrent_requests": 2},
    )
    replicas = [await make_client(settings, store=redis_store) for _ in range(2)]
    upstream.gate = asyncio.Event()

    async def send(i: int, agent: str) -> tuple[int, dict[str, str], str]:
        resp = await replicas[i % 2].post(CHAT, json=chat(max_tokens=10), headers=auth(agent=agent))
        return resp.status, dict(resp.headers), await resp.text()

    # Ten at once from one agent, through both replicas: two get through.
    tasks = [asyncio.create_task(send(i, "a1")) for i in range(10)]
    done, pending = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    async with asyncio.timeout(10):
        while len(done) < 8:
            more, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            done |= more
    refused = [t.result() for t in done]
    await until_forwarded(upstream, 2)
    assert upstream.count == 2 and len(pending) == 2
    for status, headers, text in refused:
        assert status == 429
        assert '"concurrency_limit_exceeded"' in text and "agent 'a1'" in text
        assert headers["Retry-After"] == "1" and headers["x-should-retry"] == "true"
    # Another agent fits one more under the tenant's three; then the tenant is full.
    third = asyncio.create_task(send(0, "a2"))
    await until_forwarded(upstream, 3)
    status, _, text = await send(1, "a3")
    assert status == 429 and "tenant 'acme'" in text
    upstream.gate.set()
    assert [(await t)[0] for t in pending] == [200, 200]
    assert (await third)[0] == 200
    # All settled: the flight is empty again, and leaves no key behind.
    assert (await send(0, "a1"))[0] == 200
    assert not [k for k in await keys_of(redis_store) if b":inflight" in k]
