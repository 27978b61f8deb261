"""Operating the app: metrics, readiness, shadow mode, alerts, reload under load."""

from __future__ import annotations

import asyncio
import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.app import create_app
from proxy.config import load_settings
from proxy.redis_store import RedisStore
from proxy.state import METRICS as METRICS_KEY
from proxy.state import RUNTIME
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import OTHER_KEY, auth, chat, settings_for, spent
from tests.redis_server import RedisServer

UTC = ZoneInfo("UTC")


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_metrics_count_each_outcome_exactly(
    redis_server: RedisServer, upstream: FakeUpstream, make_client: MakeClient
) -> None:
    store = RedisStore.from_url(redis_server.url, timeout_s=0.25)
    settings = settings_for(
        upstream.url,
        auth={"admin_token": "adm-test-token"},
        cost_caps={"default_budget_caps": [{"window": "hourly", "hard_limit_usd": "0.0005"}]},
    )
    client = await make_client(settings, store=store)
    post = client.post
    ok = [
        await post("/v1/chat/completions", json=chat(max_tokens=10), headers=auth())
        for _ in range(3)
    ]
    assert [r.status for r in ok] == [200, 200, 200]
    # A stream, also allowed.
    stream = await post(
        "/v1/chat/completions", json=chat(stream=True, max_tokens=10), headers=auth()
    )
    await stream.read()
    assert (
        await post("/v1/chat/completions", json=chat(max_tokens=9999), headers=auth())
    ).status == 429
    assert (
        await post("/v1/chat/completions", json=chat(max_tokens=200), headers=auth())
    ).status == 429
    assert (await post("/v1/chat/completions", json=chat(), headers=auth("sk-nope"))).status == 401
    assert (await post("/v1/chat/completions", data=b"{", headers=auth())).status == 400
    upstream.status = 500
    assert (
        await post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    ).status == 500
    upstream.status = 200
    redis_server.stop()
    assert (
        await post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    ).status == 503
    redis_server.start()

    assert (await client.get("/metrics")).status == 401
    resp = await client.get("/metrics", headers={"Authorization": "Bearer adm-test-token"})
    assert resp.status == 200
    text = await resp.text()
    requests = {
        dict(k)["outcome"]: v
        for k, v in samples(text, "capproxy_requests_total").items()
        if dict(k)["route"] == "chat/completions" and v
    }
    assert requests == {
        "allowed": 4,
        "token_rejected": 1,
        "budget_rejected": 1,
        "client_error": 2,
        "upstream_error": 1,
        "store_error": 1,
    }
    spend = samples(text, "capproxy_spend_usd_total")
    assert spend[(("model", "test-model"), ("tenant", "acme"))] == float(Decimal("0.0002"))
    assert samples(text, "capproxy_reservations_held") == {(): 0.0}
    assert "sk-" not in text and "adm-test-token" not in text


async def test_readyz_follows_the_store(
    redis_server: RedisServer, upstream: FakeUpstream, make_client: MakeClient
) -> None:
    store = RedisStore.from_url(redis_server.url, timeout_s=0.25)
    client = await make_client(settings_for(upstream.url), store=store)
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    redis_server.stop()
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "store_unavailable"
    assert (await client.get("/healthz")).status == 200
    redis_server.start()
    assert (await client.get("/readyz")).status == 200


async def test_shadow_mode_admits_everything_and_reports_would_be_rejections(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.usage = lambda _p, _b: {"prompt_tokens": 10_000_000, "completion_tokens": 0}
    settings = settings_for(upstream.url, cost_caps={"enforce": False})
    client = await make_client(settings, store=redis_store)
    # $10 per call against the $10 hourly cap: the second would be rejected.
    first = await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    assert first.status == 200
    assert "x-budget-would-reject" not in first.headers
    second = await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    assert second.status == 200
    assert second.headers["x-budget-would-reject"] == "budget_exceeded"
    # A token cap breach goes through untouched, and is reported.
    third = await client.post("/v1/chat/completions", json=chat(max_tokens=99_999), headers=auth())
    assert third.status == 200
    assert third.headers["x-budget-would-reject"] == "token_cap_exceeded"
    assert upstream.received[-1].body["max_tokens"] == 99_999
    # No limit is injected in shadow mode either.
    assert "max_completion_tokens" not in upstream.received[0].body
    # Spend is still recorded for all three.
    assert (await spent(redis_store))[0] == 30
    text, _ = client.app[METRICS_KEY].render()
    shadow = samples(text.decode(), "capproxy_shadow_rejections_total")
    assert shadow[(("reason", "budget_exceeded"),)] == 1
    assert shadow[(("reason", "token_cap_exceeded"),)] == 1


async def test_alert_reaches_the_webhook_once_and_a_hanging_one_delays_nothing(
    upstream: FakeUpstream, make_client: MakeClient, aiohttp_server: AiohttpServer
) -> None:
    received: list[dict[str, Any]] = []
    got = asyncio.Event()
    hang = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        got.set()
        if request.query.get("hang"):
            await hang.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    upstream.usage = lambda _p, _b: {"prompt_tokens": 4_500_000, "completion_tokens": 0}
    settings = settings_for(
        upstream.url,
        alerts={"webhook_url": str(server.make_url("/hook")), "timeout_s": 5},
        cost_caps={"default_budget_caps": [{"window": "daily", "hard_limit_usd": 10}]},
    )
    client = await make_client(settings)
    for _ in range(3):  # $4.50, $9.00 (90 %: one alert), then refused
        await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    await asyncio.wait_for(got.wait(), 5)
    assert [a["kind"] for a in received] == ["budget_80_percent"]
    assert received[0]["tenant_id"] == "acme" and received[0]["window"] == "daily"

    # A webhook that never answers: requests are not slowed.
    received.clear()
    got.clear()
    hanging = settings_for(
        upstream.url,
        alerts={"webhook_url": str(server.make_url("/hook?hang=1")), "timeout_s": 30},
        cost_caps={"default_budget_caps": [{"window": "daily", "hard_limit_usd": 10}]},
    )
    client2 = await make_client(hanging)
    loop = asyncio.get_running_loop()
    for _ in range(2):
        await client2.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth(OTHER_KEY))
    await asyncio.wait_for(got.wait(), 5)  # the alert is out and hanging
    started = loop.time()
    resp = await client2.post(
        "/v1/chat/completions", json=chat(max_tokens=1), headers=auth(OTHER_KEY, agent="x")
    )
    assert resp.status == 200
    assert loop.time() - started < 2
    hang.set()


async def test_reload_under_load_judges_the_next_requests_by_the_new_cap(
    upstream: FakeUpstream, aiohttp_client: AiohttpClient, tmp_path: Path, redis_store: RedisStore
) -> None:
    upstream.usage = lambda _p, _b: {"prompt_tokens": 1_000_000, "completion_tokens": 0}
    settings = settings_for(upstream.url)
    data = settings.model_dump(mode="json", exclude_none=True)
    data["store"]["url"] = "memory://"  # the test passes its Redis store in directly
    for upstream_cfg in data["upstreams"]:
        upstream_cfg["api_key"] = "sk-upstream-secret"
    data["tenants"] = [
        {"id": "acme", "api_keys": ["sk-acme-test-key"]},
        {"id": "globex", "api_keys": ["sk-globex-test-key"]},
    ]
    path = tmp_path / "caps.yaml"
    path.write_text(yaml.safe_dump(data))
    app = create_app(load_settings(path), store=redis_store, config_path=path)
    client = await aiohttp_client(app)
    upstream.pause_after = 3
    upstream.event_delay_s = 0
    # A stream in flight across the reload.
    stream = await client.post("/v1/chat/completions", json=chat(stream=True), headers=auth())
    await stream.content.readany()

    statuses: list[int] = []

    async def load() -> None:
        for _ in range(20):
            resp = await client.post(
                "/v1/chat/completions", json=chat(max_tokens=1), headers=auth(agent="load")
            )
            statuses.append(resp.status)
            await resp.read()

    loader = asyncio.create_task(load())
    # Lower the hourly cap to $3 (atomic rename, as editors save).
    data["cost_caps"]["default_budget_caps"] = [{"window": "hourly", "hard_limit_usd": 3}]
    tmp = tmp_path / "caps.yaml.tmp"
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, path)
    deadline = asyncio.get_running_loop().time() + 5
    while app[RUNTIME].current.settings.cost_caps.default_budget_caps[0].hard_limit_usd != 3:
        assert asyncio.get_running_loop().time() < deadline, "reload not picked up"
        await asyncio.sleep(0.02)
    await loader
    assert all(s in (200, 429) for s in statuses)
    # Under the new cap an agent gets at most three $1 calls this hour.
    fresh = [
        (
            await client.post(
                "/v1/chat/completions", json=chat(max_tokens=1), headers=auth(agent="fresh")
            )
        ).status
        for _ in range(4)
    ]
    assert fresh == [200, 200, 200, 429]
    upstream.resume.set()
    body = await stream.read()
    assert body.endswith(b"data: [DONE]\n\n")
    # Spend recorded before the reload is kept.
    assert (await spent(redis_store, agent="load"))[0] >= 3
    assert json.loads(body.split(b"\n\n")[1].removeprefix(b"data: "))["object"]


async def test_two_replicas_send_a_crossing_once(
    upstream: FakeUpstream,
    make_client: MakeClient,
    aiohttp_server: AiohttpServer,
    redis_url: str,
    key_prefix: str,
) -> None:
    received: list[dict[str, Any]] = []
    got = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        got.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    upstream.usage = lambda _p, _b: {"prompt_tokens": 9_000_000, "completion_tokens": 0}
    settings = settings_for(
        upstream.url,
        alerts={"webhook_url": str(server.make_url("/hook"))},
        cost_caps={"default_budget_caps": [{"window": "daily", "hard_limit_usd": 100}]},
    )
    replicas = [
        await make_client(
            settings, store=RedisStore.from_url(redis_url, prefix=key_prefix, timeout_s=1)
        )
        for _ in range(2)
    ]
    # $9 per call: the ninth call crosses 80 % of $100 on one replica, the tenth on the other.
    for i in range(10):
        resp = await replicas[i % 2].post(
            "/v1/chat/completions", json=chat(max_tokens=1), headers=auth()
        )
        assert resp.status == 200
    await asyncio.wait_for(got.wait(), 5)
    for client in replicas:  # shutting down drains both alert queues
        await client.close()
    assert [a["kind"] for a in received] == ["budget_80_percent"]
