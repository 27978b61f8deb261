"""The spend API end to end: the real app, the fake upstream on loopback, a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.config import Settings
from proxy.counters import Counter, Store
from proxy.memory_store import MemoryStore
from proxy.pricing import micros_to_usd
from proxy.redis_store import RedisStore
from proxy.state import LEDGER
from proxy.windows import Window, period_of
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import OTHER_KEY, TENANT_KEY, auth, chat, settings_for
from tests.redis_server import free_port

UTC = ZoneInfo("UTC")
ADMIN = "adm-token"
COSTS = "/api/v1/costs/current"
CAPS = "/api/v1/caps"
TENANTS = "/api/v1/tenants"
OPENAPI = "/api/v1/openapi.json"
SCOPES = "/api/v1/scopes"
SNAPSHOT_KEYS = {
    "tenant_id",
    "agent_id",
    "windows",
    "held_usd",
    "tenant_windows",
    "model_cap_windows",
    "user_id",
    "user_windows",
    "rate_windows",
    "concurrency",
}
NO_CONCURRENCY = {
    "tenant": {"limit": None, "in_flight": 0},
    "agent": {"limit": None, "in_flight": 0},
}
WINDOW_KEYS = {
    "window",
    "current_spend_usd",
    "hard_limit_usd",
    "soft_limit_usd",
    "utilization_pct",
    "resets_in_secs",
    "held_usd",
}
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def dead() -> AsyncIterator[RedisStore]:
    """A store on a port nothing listens on: every call fails fast (0.25 s at most)."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.25)
    yield store
    await store.aclose()


def settings(upstream: FakeUpstream, **over: Any) -> Settings:
    """The harness settings with an admin token and a monthly tenant-wide cap for acme."""
    base: dict[str, Any] = {
        "auth": {"admin_token": ADMIN},
        "tenants": [
            {
                "id": "acme",
                "api_keys": [TENANT_KEY],
                "budget_caps": [{"window": "monthly", "hard_limit_usd": 50}],
            },
            {"id": "globex", "api_keys": [OTHER_KEY]},
        ],
    }
    return settings_for(upstream.url, **{**base, **over})


def admin(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get(
    client: Client, path: str, headers: dict[str, str] | None = None, **params: str
) -> tuple[int, Any]:
    """Status and body, with every JSON number that has a fraction read as a Decimal."""
    resp = await client.get(path, headers=headers or {}, params=params)
    return resp.status, json.loads(await resp.text(), parse_float=Decimal)


def by_window(windows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {w["window"]: w for w in windows}


async def recorded(
    store: Store, tenant: str, agent: str | None, window: Window
) -> tuple[Decimal, Decimal]:
    """(spent, held) in USD of one counter, read straight from the store."""
    (state,) = await store.snapshot([Counter(tenant, agent, window, 1)], tz=UTC)
    return micros_to_usd(state.spent), micros_to_usd(state.held)


async def post(client: Client, agent: str | None = None, key: str = TENANT_KEY) -> None:
    resp = await client.post(
        "/v1/chat/completions", json=chat(max_completion_tokens=50), headers=auth(key, agent)
    )
    assert resp.status == 200, await resp.text()


# --- costs/current -------------------------------------------------------------------------


async def test_costs_match_the_spend_recorded(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=redis_store)
    for agent in ("bot", "bot", None):
        await post(client, agent)  # $0.00005 each

    status, body = await get(client, COSTS, auth(), agent_id="bot")
    assert status == 200, body
    assert set(body) == SNAPSHOT_KEYS
    assert (body["tenant_id"], body["agent_id"]) == ("acme", "bot")
    assert all(set(w) == WINDOW_KEYS for w in body["windows"] + body["tenant_windows"])
    windows = by_window(body["windows"])
    assert list(windows) == ["hourly", "daily"]
    hourly, daily = windows["hourly"], windows["daily"]
    assert hourly["current_spend_usd"] == Decimal("0.0001")
    assert (hourly["current_spend_usd"], hourly["held_usd"]) == await recorded(
        redis_store, "acme", "bot", Window.HOURLY
    )
    assert (hourly["hard_limit_usd"], hourly["soft_limit_usd"]) == (10, 8)
    assert hourly["utilization_pct"] == Decimal("0.001")
    assert 1 <= hourly["resets_in_secs"] <= 3600
    assert daily["current_spend_usd"] == Decimal("0.0001")
    assert (daily["hard_limit_usd"], daily["soft_limit_usd"]) == (100, None)
    assert daily["utilization_pct"] == Decimal("0.0001")
    assert 1 <= daily["resets_in_secs"] <= 25 * 3600
    assert body["held_usd"] == 0
    # The tenant-wide window counts every agent of the tenant.
    (monthly,) = body["tenant_windows"]
    assert monthly["window"] == "monthly"
    assert monthly["current_spend_usd"] == Decimal("0.00015")
    assert (monthly["current_spend_usd"], monthly["held_usd"]) == await recorded(
        redis_store, "acme", None, Window.MONTHLY
    )
    assert (monthly["hard_limit_usd"], monthly["soft_limit_usd"]) == (50, None)
    assert monthly["utilization_pct"] == Decimal("0.0003")

    # Money is an exact JSON number with six decimals.
    text = await (await client.get(COSTS, headers=auth(), params={"agent_id": "bot"})).text()
    assert '"current_spend_usd":0.000100' in text
    assert '"hard_limit_usd":10.000000' in text


async def test_agent_defaults_to_default_agent(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=redis_store)
    await post(client, "bot")
    await post(client)
    status, body = await get(client, COSTS, auth())
    assert status == 200
    assert body["agent_id"] == "_default"
    assert by_window(body["windows"])["hourly"]["current_spend_usd"] == Decimal("0.00005")
    # An agent override changes the windows reported.
    status, body = await get(client, COSTS, auth(), agent_id="premium-agent")
    assert status == 200
    (daily,) = body["windows"]
    assert (daily["window"], daily["hard_limit_usd"], daily["soft_limit_usd"]) == (
        "daily",
        500,
        400,
    )
    assert daily["current_spend_usd"] == 0


async def test_held_usd_shows_a_request_in_flight(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.gate = asyncio.Event()
    client = await make_client(settings(upstream), store=redis_store)
    task = asyncio.create_task(post(client, "bot"))
    async with asyncio.timeout(5):
        while upstream.count < 1:
            await asyncio.sleep(0.01)

    status, body = await get(client, COSTS, auth(), agent_id="bot")
    assert status == 200
    _, held = await recorded(redis_store, "acme", "bot", Window.HOURLY)
    assert held > 0
    assert body["held_usd"] == held
    for window in body["windows"] + body["tenant_windows"]:
        assert window["held_usd"] == held
        assert window["current_spend_usd"] == 0

    upstream.gate.set()
    await task
    status, body = await get(client, COSTS, auth(), agent_id="bot")
    assert body["held_usd"] == 0
    for window in body["windows"] + body["tenant_windows"]:
        assert (window["current_spend_usd"], window["held_usd"]) == (Decimal("0.00005"), 0)


async def test_no_windows_means_no_store_read_and_null_held(
    upstream: FakeUpstream, make_client: MakeClient, dead: RedisStore
) -> None:
    client = await make_client(settings(upstream, cost_caps={"enabled": False}), store=dead)
    status, body = await get(client, COSTS, auth(OTHER_KEY))
    assert status == 200, body
    assert body == {
        "tenant_id": "globex",
        "agent_id": "_default",
        "windows": [],
        "held_usd": None,
        "tenant_windows": [],
        "model_cap_windows": [],
        "user_id": None,
        "user_windows": [],
        "rate_windows": [],
        "concurrency": NO_CONCURRENCY,
    }


async def test_store_unavailable_is_503(
    upstream: FakeUpstream, make_client: MakeClient, dead: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=dead)
    for path, headers in ((COSTS, auth()), (TENANTS, admin())):
        status, body = await get(client, path, headers)
        assert status == 503
        assert body["error"]["code"] == "store_unavailable"


# --- access --------------------------------------------------------------------------------


async def test_a_tenant_reads_only_itself(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=redis_store)
    await post(client)
    for path in (COSTS, CAPS):
        status, body = await get(client, path, auth(), tenant_id="globex")
        assert status == 403
        assert (body["error"]["code"], body["error"]["param"]) == ("forbidden", "tenant_id")
        status, body = await get(client, path, auth(), tenant_id="acme")
        assert (status, body["tenant_id"]) == (200, "acme")
    # x-api-key works as for proxied calls; globex sees its own (empty) spend.
    status, body = await get(client, COSTS, {"x-api-key": OTHER_KEY})
    assert (status, body["tenant_id"]) == (200, "globex")
    assert by_window(body["windows"])["hourly"]["current_spend_usd"] == 0
    assert body["tenant_windows"] == []
    status, body = await get(client, TENANTS, auth())
    assert (status, body["error"]["code"]) == (403, "forbidden")


async def test_admin_reads_any_tenant(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=redis_store)
    await post(client)
    _, own = await get(client, COSTS, auth())
    status, body = await get(client, COSTS, admin(), tenant_id="acme")
    assert status == 200
    for a, b in zip(own["windows"], body["windows"], strict=True):
        assert a["current_spend_usd"] == b["current_spend_usd"] == Decimal("0.00005")
    status, body = await get(client, COSTS, admin(), tenant_id="globex", agent_id="bot")
    assert (status, body["tenant_id"], body["agent_id"]) == (200, "globex", "bot")
    # Tenants derived in passthrough mode are not configured, but readable.
    status, body = await get(client, COSTS, admin(), tenant_id="key-0123abcd")
    assert (status, body["tenant_windows"]) == (200, [])
    assert [w["window"] for w in body["windows"]] == ["hourly", "daily"]
    # The admin must name a valid tenant.
    for params in ({}, {"tenant_id": "no spaces"}, {"tenant_id": "x" * 65}):
        status, body = await get(client, COSTS, admin(), **params)
        assert (status, body["error"]["param"]) == (400, "tenant_id")


async def test_wrong_or_missing_token_is_401(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings(upstream))
    for path in (COSTS, CAPS, TENANTS):
        for headers in ({}, admin("adm-token-wrong"), admin(""), {"Authorization": ADMIN}):
            status, body = await get(client, path, headers, tenant_id="acme")
            assert status == 401, (path, headers)
            assert body["error"]["code"] == "invalid_api_key"


async def test_without_admin_token_there_is_no_admin(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings(upstream, auth={"admin_token": ""}))
    for path in (COSTS, CAPS, TENANTS):
        status, _ = await get(client, path, admin(), tenant_id="acme")
        assert status == 401


async def test_passthrough_keys_read_their_derived_tenant(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    conf = settings(upstream, auth={"admin_token": ADMIN, "mode": "passthrough"})
    client = await make_client(conf, store=redis_store)
    await post(client, key="sk-user-own")
    status, body = await get(client, COSTS, auth("sk-user-own"))
    assert status == 200
    tenant = body["tenant_id"]
    assert tenant.startswith("key-") and "sk-user-own" not in json.dumps(body, default=str)
    assert by_window(body["windows"])["hourly"]["current_spend_usd"] == Decimal("0.00005")
    # The admin token is still the admin's, never a derived tenant.
    status, body = await get(client, COSTS, admin(), tenant_id=tenant)
    assert by_window(body["windows"])["hourly"]["current_spend_usd"] == Decimal("0.00005")
    assert (await get(client, TENANTS, auth("sk-user-own")))[0] == 403


async def test_invalid_agent_id_is_400(upstream: FakeUpstream, make_client: MakeClient) -> None:
    client = await make_client(settings(upstream))
    for path in (COSTS, CAPS):
        for agent in ("has space", "x" * 129, ""):
            status, body = await get(client, path, auth(), agent_id=agent)
            assert (status, body["error"]["param"]) == (400, "agent_id")


# --- tenants -------------------------------------------------------------------------------


async def test_tenants_lists_every_configured_tenant(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=redis_store)
    await post(client)
    await post(client, "bot", key=OTHER_KEY)
    status, body = await get(client, TENANTS, admin())
    assert status == 200
    acme, globex = body["tenants"]
    assert all(set(t) == SNAPSHOT_KEYS for t in body["tenants"])
    assert (acme["tenant_id"], acme["agent_id"]) == ("acme", "_default")
    assert acme["tenant_windows"][0]["current_spend_usd"] == Decimal("0.00005")
    assert by_window(acme["windows"])["daily"]["current_spend_usd"] == Decimal("0.00005")
    assert (globex["tenant_id"], globex["tenant_windows"]) == ("globex", [])
    # globex's spend was by agent "bot": its _default agent has spent nothing.
    assert by_window(globex["windows"])["hourly"]["current_spend_usd"] == 0
    assert body["agents"] == ["premium-agent"]  # listed with caps of its own


# --- caps ----------------------------------------------------------------------------------


async def test_caps_resolve_overrides_and_defaults(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    agents = [
        {
            "agent_id": "premium-agent",
            "budget_caps": [{"window": "daily", "hard_limit_usd": 500, "soft_limit_usd": 400}],
            "token_cap": {"max_prompt_tokens": 16384},
        },
        {"agent_id": "tokens-only", "token_cap": {"max_total_tokens": 100}},
    ]
    client = await make_client(settings(upstream, cost_caps={"agents": agents}))
    default_budget = [
        {"window": "hourly", "hard_limit_usd": 10, "soft_limit_usd": 8},
        {"window": "daily", "hard_limit_usd": 100, "soft_limit_usd": None},
    ]
    default_tokens = {
        "max_prompt_tokens": 4096,
        "max_completion_tokens": 4096,
        "max_total_tokens": 8192,
    }

    status, body = await get(client, CAPS, auth())
    assert status == 200
    assert body == {
        "tenant_id": "acme",
        "agent_id": "_default",
        "tenant_configured": True,
        "cost_caps_enabled": True,
        "enforce": True,
        "tenant_budget_caps": [{"window": "monthly", "hard_limit_usd": 50, "soft_limit_usd": None}],
        "agent_budget_caps": default_budget,
        "agent_budget_caps_source": "default",
        "token_cap": default_tokens,
        "token_cap_source": "default",
        "tenant_rate_caps": [],
        "agent_rate_caps": [],
        "agent_rate_caps_source": "default",
        "max_concurrent_requests": {"tenant": None, "agent": None},
        "model": None,
        "model_caps": [],
        "user_caps": None,
    }

    _, body = await get(client, CAPS, auth(), agent_id="premium-agent")
    assert body["agent_budget_caps"] == [
        {"window": "daily", "hard_limit_usd": 500, "soft_limit_usd": 400}
    ]
    assert body["agent_budget_caps_source"] == "override"
    assert body["token_cap"] == {
        "max_prompt_tokens": 16384,
        "max_completion_tokens": None,
        "max_total_tokens": None,
    }
    assert body["token_cap_source"] == "override"

    _, body = await get(client, CAPS, auth(), agent_id="tokens-only")
    assert (body["agent_budget_caps"], body["agent_budget_caps_source"]) == (
        default_budget,
        "default",
    )
    assert body["token_cap"]["max_total_tokens"] == 100
    assert body["token_cap_source"] == "override"

    _, body = await get(client, CAPS, admin(), tenant_id="unknown-tenant")
    assert (body["tenant_configured"], body["tenant_budget_caps"]) == (False, [])

    text = await (await client.get(CAPS, headers=auth())).text()
    assert '"hard_limit_usd":10.000000,"soft_limit_usd":8.000000' in text


async def test_caps_report_disabled_and_shadow_mode(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings(upstream, cost_caps={"enforce": False}))
    _, body = await get(client, CAPS, auth())
    assert (body["cost_caps_enabled"], body["enforce"]) == (True, False)

    client = await make_client(settings(upstream, cost_caps={"enabled": False}))
    _, body = await get(client, CAPS, auth(), agent_id="premium-agent")
    assert body["cost_caps_enabled"] is False
    assert (body["agent_budget_caps"], body["agent_budget_caps_source"]) == ([], "disabled")
    assert (body["token_cap"], body["token_cap_source"]) == (None, "disabled")
    # Tenant-wide caps apply whether or not per-agent cost caps are enabled.
    assert [c["window"] for c in body["tenant_budget_caps"]] == ["monthly"]


# --- the document and the routes -----------------------------------------------------------


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return resolve(doc, node)


async def test_openapi_documents_every_route_and_every_documented_path_answers(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=redis_store)
    resp = await client.get(OPENAPI)
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")

    routes = {
        (route.resource.canonical, route.method.lower())
        for route in client.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/v1/")
        and route.method != "HEAD"
    }
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented

    for path, method in sorted(documented):
        resp = await client.request(
            method, path, headers=admin(), params={"tenant_id": "acme", "agent_id": "bot"}
        )
        assert resp.status == 200, (path, await resp.text())
        content = doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]
        if "schema" not in content:
            continue
        schema = resolve(doc, content["schema"])
        body = await resp.json()
        assert set(body) == set(schema["properties"]) == set(schema["required"]), path
        for code in doc["paths"][path][method]["responses"]:
            assert code in {"200", "400", "401", "403", "503"}


async def test_api_is_never_proxied(upstream: FakeUpstream, make_client: MakeClient) -> None:
    client = await make_client(settings(upstream))
    for path in ("/api/v1/nope", "/api/v1/costs", "/api/v1/costs/current/x"):
        status, body = await get(client, path, admin())
        assert (status, body["error"]["code"]) == (404, "unknown_url")
    resp = await client.post(COSTS, headers=auth(), json={})
    assert resp.status == 405
    assert upstream.received == []


# --- costs/history and rejections ----------------------------------------------------------

HISTORY = "/api/v1/costs/history"
REJECTIONS = "/api/v1/rejections"


@pytest.fixture(params=["memory", "redis"])
async def any_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """The embedded store, or a real Redis."""
    if request.param == "memory":
        yield MemoryStore()
        return
    url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("key_prefix")
    store = RedisStore.from_url(url, prefix=prefix, timeout_s=0.25)
    try:
        yield store
    finally:
        await store.aclose()


async def test_history_shows_the_spend_settled_this_hour_day_and_month(
    upstream: FakeUpstream, make_client: MakeClient, any_store: Store
) -> None:
    client = await make_client(settings(upstream), store=any_store)
    for agent, key in (("bot", TENANT_KEY), (None, TENANT_KEY), (None, OTHER_KEY)):
        await post(client, agent, key)  # $0.00005 each
    hour = period_of(Window.HOURLY, time.time(), UTC).start

    status, body = await get(client, HISTORY, auth(), granularity="hour")
    assert status == 200, body
    assert (body["granularity"], body["time_zone"]) == ("hour", "UTC")
    starts = body["bucket_starts"]
    assert len(starts) == 48 and starts[-1] in (hour, hour + 3600)  # an hour may turn
    assert starts == [starts[-1] - 3600 * i for i in reversed(range(48))]
    (acme,) = body["series"]
    assert acme["tenant_id"] == "acme"
    assert len(acme["spend_usd"]) == 48
    assert sum(acme["spend_usd"]) == acme["total_usd"] == Decimal("0.0001")
    assert acme["today_usd"] == acme["month_usd"] == Decimal("0.0001")

    status, body = await get(client, HISTORY, admin(), granularity="day")
    assert status == 200, body
    assert len(body["bucket_starts"]) == 90
    totals = {s["tenant_id"]: s["total_usd"] for s in body["series"]}
    assert totals == {"acme": Decimal("0.0001"), "globex": Decimal("0.00005")}
    status, body = await get(client, HISTORY, admin(), tenant_id="globex")
    assert [s["tenant_id"] for s in body["series"]] == ["globex"]
    text = await (await client.get(HISTORY, headers=auth())).text()
    assert '"total_usd":0.000100' in text  # exact, six decimals


async def test_history_granularity_is_hour_or_day(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings(upstream))
    status, body = await get(client, HISTORY, auth(), granularity="week")
    assert (status, body["error"]["param"]) == (400, "granularity")


async def test_rejections_list_what_the_caps_refused_newest_first(
    upstream: FakeUpstream, make_client: MakeClient, any_store: Store
) -> None:
    tiny = {"window": "hourly", "hard_limit_usd": "0.00001"}
    conf = settings(
        upstream,
        tenants=[
            {"id": "acme", "api_keys": [TENANT_KEY], "budget_caps": [tiny]},
            {"id": "globex", "api_keys": [OTHER_KEY]},
        ],
    )
    client = await make_client(conf, store=any_store)
    too_long = chat(max_completion_tokens=5000)  # over the token cap
    resp = await client.post("/v1/chat/completions", json=too_long, headers=auth(agent="bot"))
    assert resp.status == 429
    resp = await client.post("/v1/chat/completions", json=chat(), headers=auth(agent="bot"))
    assert resp.status == 429
    assert upstream.received == []

    status, body = await get(client, REJECTIONS, auth())
    assert status == 200, body
    budget, token = body["rejections"]
    assert budget["time"] >= token["time"]
    assert {k: v for k, v in budget.items() if k != "time"} == {
        "tenant_id": "acme",
        "agent_id": "bot",
        "model": "test-model",
        "code": "budget_exceeded",
        "windows": ["hourly"],
    }
    assert (token["code"], token["windows"]) == ("token_cap_exceeded", [])
    status, every = await get(client, REJECTIONS, admin())
    assert every == body
    status, other = await get(client, REJECTIONS, admin(), tenant_id="globex")
    assert (status, other) == (200, {"rejections": []})


async def test_a_tenant_key_reads_only_its_own_history_and_rejections(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings(upstream))
    for path in (HISTORY, REJECTIONS):
        status, body = await get(client, path, auth(), tenant_id="globex")
        assert (status, body["error"]["code"]) == (403, "forbidden")
        status, body = await get(client, path, admin("wrong"))
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")


async def test_history_and_rejections_are_503_when_the_store_is_down(
    upstream: FakeUpstream, make_client: MakeClient, dead: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=dead)
    for path in (HISTORY, REJECTIONS):
        status, body = await get(client, path, admin())
        assert (status, body["error"]["code"]) == (503, "store_unavailable")


async def test_a_rejection_the_store_cannot_keep_is_still_a_429(
    upstream: FakeUpstream, make_client: MakeClient, dead: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=dead)
    too_long = chat(max_completion_tokens=5000)
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=too_long, headers=auth())
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "token_cap_exceeded"
    assert client.app[LEDGER].stats.rejections_unrecorded == 2


# --- scopes --------------------------------------------------------------------------------


async def test_scopes_list_the_agents_and_end_users_a_tenant_named_today(
    upstream: FakeUpstream, make_client: MakeClient, any_store: Store
) -> None:
    user_caps = {"budget_caps": [{"window": "daily", "hard_limit_usd": 1}]}
    client = await make_client(
        settings(upstream, cost_caps={"user_caps": user_caps}), store=any_store
    )
    for agent, user in (("planner", "bob"), ("bot", "alice"), ("bot", None)):
        body = chat(max_completion_tokens=50, **({"user": user} if user else {}))
        resp = await client.post("/v1/chat/completions", json=body, headers=auth(agent=agent))
        assert resp.status == 200, await resp.text()

    status, body = await get(client, SCOPES, auth())
    assert status == 200, body
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert body == {
        "tenant_id": "acme",
        "utc_day": body["utc_day"],
        "agents": ["bot", "planner"],
        "agents_total": 2,
        "users": ["alice", "bob"],
        "users_total": 2,
    }
    assert body["utc_day"] <= today  # a day may turn
    status, first = await get(client, SCOPES, admin(), tenant_id="acme", limit="1")
    assert (status, first["agents"], first["agents_total"]) == (200, ["bot"], 2)
    assert (first["users"], first["users_total"]) == (["alice"], 2)
    status, other = await get(client, SCOPES, admin(), tenant_id="globex")
    assert (status, other["agents"], other["users"]) == (200, [], [])
    # A key reads its own tenant only; the admin names one.
    status, body = await get(client, SCOPES, auth(), tenant_id="globex")
    assert (status, body["error"]["code"]) == (403, "forbidden")
    status, body = await get(client, SCOPES, admin())
    assert (status, body["error"]["param"]) == (400, "tenant_id")
    for limit in ("0", "101", "ten", "٣", "-1"):
        status, body = await get(client, SCOPES, auth(), limit=limit)
        assert (status, body["error"]["param"]) == (400, "limit"), limit


async def test_scopes_are_503_when_the_store_is_down(
    upstream: FakeUpstream, make_client: MakeClient, dead: RedisStore
) -> None:
    client = await make_client(settings(upstream), store=dead)
    status, body = await get(client, SCOPES, admin(), tenant_id="acme")
    assert (status, body["error"]["code"]) == (503, "store_unavailable")
