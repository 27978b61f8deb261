"""End to end: the real app, the fake upstream on loopback, a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from proxy.endpoints import Endpoint
from proxy.errors import StoreUnavailable
from proxy.memory_store import MemoryStore
from proxy.redis_store import RedisStore
from proxy.state import LEDGER
from proxy.tokens import Tokenizer
from proxy.windows import Window
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    OTHER_KEY,
    TENANT_KEY,
    UPSTREAM_KEY,
    auth,
    chat,
    settings_for,
    spent,
)
from tests.redis_server import RedisServer, free_port

UTC = ZoneInfo("UTC")
NOTHING = (Decimal(0), Decimal(0))


# --- forwarding -------------------------------------------------------------------------


async def test_chat_is_forwarded_metered_and_headed(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings_for(upstream.url), store=redis_store)
    resp = await client.post(
        "/v1/chat/completions", json=chat(max_completion_tokens=50), headers=auth(agent="bot")
    )
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert data["choices"][0]["message"]["content"] == "Hi!"
    assert resp.headers["x-request-id"] == "req_123"
    # 10 prompt x $1/M + 20 completion x $2/M = $0.00005, recorded exactly.
    assert await spent(redis_store, "acme", "bot") == (Decimal("0.00005"), Decimal(0))
    assert await spent(redis_store, "acme", "bot", Window.DAILY) == (
        Decimal("0.00005"),
        Decimal(0),
    )
    assert resp.headers["x-budget-window"] == "hourly"
    assert resp.headers["x-budget-limit-usd"] == "10.000000"
    assert resp.headers["x-budget-remaining-usd"] == "9.999950"
    assert "x-budget-warning" not in resp.headers


async def test_keys_mode_injects_upstream_key_and_never_forwards_client_key(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    upstream.extra_headers = {
        "Set-Cookie": "session=upstream",
        "openai-organization": "org-operator",
        "openai-processing-ms": "12",
    }
    client = await make_client(settings_for(upstream.url))
    headers = {
        **auth(agent="bot"),
        "x-api-key": TENANT_KEY,
        "api-key": TENANT_KEY,
        "Cookie": "c=1",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "drop me",
        "OpenAI-Organization": "org-chosen-by-client",
        "OpenAI-Project": "proj-chosen-by-client",
        "OpenAI-Beta": "assistants=v2",
    }
    body = chat(api_base="http://evil.invalid", base_url="http://evil.invalid")
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200
    (got,) = upstream.received
    assert got.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert TENANT_KEY not in json.dumps(got.headers)
    for name in ("X-Secret-Hop", "X-Agent-Id", "Cookie", "OpenAI-Organization", "OpenAI-Project"):
        assert name not in got.headers
    assert got.headers["OpenAI-Beta"] == "assistants=v2"
    assert got.path == "/v1/chat/completions"
    assert UPSTREAM_KEY not in json.dumps(dict(resp.headers))
    assert "Set-Cookie" not in resp.headers
    assert "openai-organization" not in resp.headers
    assert resp.headers["openai-processing-ms"] == "12"


async def test_passthrough_forwards_client_key_and_derives_tenant(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    settings = settings_for(upstream.url, auth={"mode": "passthrough"})
    client = await make_client(settings, store=redis_store)
    own = {**auth("sk-user-own"), "OpenAI-Organization": "org-user"}
    resp = await client.post("/v1/chat/completions", json=chat(), headers=own)
    assert resp.status == 200
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-user-own"
    # The user's own key: choosing its organization is the user's business.
    assert upstream.received[0].headers["OpenAI-Organization"] == "org-user"
    # A configured key still maps to its tenant in passthrough mode.
    resp = await client.post("/v1/chat/completions", json=chat(), headers=auth(TENANT_KEY))
    assert resp.status == 200
    assert (await spent(redis_store, "acme", "_default"))[0] > 0
    keys = [k async for k in redis_store.client.scan_iter(match=f"{redis_store.prefix}*")]
    assert keys and not any(b"sk-user-own" in k for k in keys)


@pytest.mark.parametrize(
    ("path", "body", "usage", "expected"),
    [
        (
            "/v1/embeddings",
            {"model": "test-model", "input": ["a", "b"]},
            {"prompt_tokens": 1000, "total_tokens": 1000},
            Decimal("0.001"),
        ),
        (
            "/v1/completions",
            {"model": "test-model", "prompt": "Say hi", "max_tokens": 5},
            {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200},
            Decimal("0.0003"),
        ),
        (
            "/v1/responses",
            {"model": "test-model", "input": "Say hi", "max_output_tokens": 50},
            {
                "input_tokens": 1000,
                "input_tokens_details": {"cached_tokens": 400},
                "output_tokens": 500,
                "output_tokens_details": {"reasoning_tokens": 300},
                "total_tokens": 1500,
            },
            # 600 x $1 + 400 cached x $0.5 + 500 (reasoning included) x $2 per 1M
            Decimal("0.0018"),
        ),
        (
            "/v1/chat/completions",
            chat(max_tokens=10),
            {
                "prompt_tokens": 2000,
                "completion_tokens": 10,
                "total_tokens": 2010,
                "prompt_tokens_details": {"cached_tokens": 2000},
            },
            Decimal("0.00102"),
        ),
    ],
)
async def test_cost_of_each_endpoint(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    path: str,
    body: dict[str, object],
    usage: dict[str, object],
    expected: Decimal,
) -> None:
    upstream.usage = lambda _p, _b: usage
    client = await make_client(settings_for(upstream.url), store=redis_store)
    resp = await client.post(path, json=body, headers=auth())
    assert resp.status == 200, await resp.text()
    assert await spent(redis_store, "acme", "_default") == (expected, Decimal(0))


@pytest.mark.parametrize(
    ("requested", "served", "expected"),
    [
        # (1000 x $1 + 1000 x $2) per 1M tokens, twice.
        ("priority", "priority", Decimal("0.006")),
        # Asked for priority, served at the standard tier: billed as served.
        ("priority", "default", Decimal("0.003")),
        # Asked for nothing, served at priority (a project default): billed as served.
        (None, "priority", Decimal("0.006")),
    ],
)
async def test_the_tier_the_response_reports_is_charged(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    requested: str | None,
    served: str,
    expected: Decimal,
) -> None:
    upstream.usage = lambda _p, _b: {"prompt_tokens": 1000, "completion_tokens": 1000}
    upstream.answer_extra = {"service_tier": served}
    client = await make_client(settings_for(upstream.url), store=redis_store)
    body = chat(max_tokens=1000, service_tier=requested)
    assert (await client.post("/v1/chat/completions", json=body, headers=auth())).status == 200
    assert await spent(redis_store, "acme", "_default") == (expected, Decimal(0))


async def test_models_is_forwarded_unmetered(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings_for(upstream.url))
    resp = await client.get("/v1/models", headers=auth())
    assert resp.status == 200
    assert (await resp.json())["data"][0]["id"] == "gpt-4o"
    assert (await client.get("/v1/models")).status == 401


async def test_missing_output_limit_is_set_from_the_cap(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings_for(upstream.url))
    assert (await client.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    assert upstream.received[0].body["max_completion_tokens"] == 4096
    body = {"model": "test-model", "input": "hi"}
    assert (await client.post("/v1/responses", json=body, headers=auth())).status == 200
    assert upstream.received[1].body["max_output_tokens"] == 4096
    # With n choices the cap is shared among them.
    resp = await client.post("/v1/chat/completions", json=chat(n=4), headers=auth())
    assert resp.status == 200
    assert upstream.received[2].body["max_completion_tokens"] == 1024
    upstream.received.pop()
    # A request that names its own limit is forwarded byte for byte.
    raw = b'{"model":"test-model","messages":[{"role":"user","content":"x"}],  "max_tokens":7}'
    headers = {**auth(), "Content-Type": "application/json"}
    assert (await client.post("/v1/chat/completions", data=raw, headers=headers)).status == 200
    assert upstream.received[2].body == json.loads(raw)
    assert "max_completion_tokens" not in upstream.received[2].body


async def test_upstream_gets_the_body_the_proxy_judged(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    # Duplicate keys: Python keeps the last; a first-key-wins upstream must not see the first.
    raw = (
        b'{"model": "gpt-4o", "model": "test-model", "max_tokens": 99999, "max_tokens": 5,'
        b' "messages": [{"role": "user", "content": "hi"}]}'
    )
    headers = {**auth(), "Content-Type": "application/json"}
    resp = await client_post(make_client, upstream, raw, headers)
    assert resp == 200
    sent = upstream.received[0]
    assert b"gpt-4o" not in sent.raw and b"99999" not in sent.raw
    assert sent.body == {
        "model": "test-model",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }


async def client_post(
    make_client: MakeClient, upstream: FakeUpstream, raw: bytes, headers: dict[str, str]
) -> int:
    client = await make_client(settings_for(upstream.url))
    resp = await client.post("/v1/chat/completions", data=raw, headers=headers)
    await resp.read()
    return resp.status


async def test_response_without_usage_is_charged_its_hold(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.usage = lambda _p, _b: None
    client = await make_client(settings_for(upstream.url), store=redis_store)
    resp = await client.post(
        "/v1/chat/completions", json=chat(max_completion_tokens=100), headers=auth()
    )
    assert resp.status == 200
    charged, held = await spent(redis_store, "acme", "_default")
    # The hold: prompt estimate x $1/M + 100 output x $2/M.
    assert Decimal("0.0002") < charged < Decimal("0.0003")
    assert held == 0


# --- budget caps ------------------------------------------------------------------------


async def test_fifty_concurrent_requests_against_a_budget_for_ten(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    # Each request holds prompt + 1000 output tokens at the test price; size the hourly cap
    # so exactly ten holds fit, and make the upstream bill exactly the hold.
    client0 = await make_client(settings_for(upstream.url), store=MemoryStore())
    probe = await client0.post(
        "/v1/chat/completions", json=chat(max_completion_tokens=1000), headers=auth()
    )
    assert probe.status == 200
    prompt = upstream.received[0].body  # the same body for all fifty

    # In flight, the prompt is held on its bound (its UTF-8 length).
    prompt_tokens = Tokenizer().bound_prompt(Endpoint.CHAT, prompt).tokens
    hold_micros = prompt_tokens * 1 + 1000 * 2
    limit = Decimal(hold_micros * 10) / 1_000_000
    upstream.received.clear()
    upstream.usage = lambda _p, _b: {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 1000,
        "total_tokens": prompt_tokens + 1000,
    }
    upstream.gate = asyncio.Event()
    settings = settings_for(
        upstream.url,
        cost_caps={"default_budget_caps": [{"window": "hourly", "hard_limit_usd": str(limit)}]},
    )
    client = await make_client(settings, store=redis_store)

    async def one() -> tuple[int, dict[str, str]]:
        resp = await client.post(
            "/v1/chat/completions", json=chat(max_completion_tokens=1000), headers=auth()
        )
        await resp.read()
        return resp.status, dict(resp.headers)

    tasks = [asyncio.create_task(one()) for _ in range(50)]
    # The forty rejections come back while the ten admitted ones wait at the upstream.
    while sum(t.done() for t in tasks) < 40:
        await asyncio.sleep(0.01)
    upstream.gate.set()
    results = await asyncio.gather(*tasks)
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40
    assert upstream.count == 10
    assert all(int(h["Retry-After"]) >= 1 for s, h in results if s == 429)
    total, held = await spent(redis_store, "acme", "_default")
    assert total == limit
    assert held == 0
    # The budget is now spent: the next request is refused until the hour turns over.
    resp = await client.post(
        "/v1/chat/completions", json=chat(max_completion_tokens=1000), headers=auth()
    )
    assert resp.status == 429
    body = await resp.json()
    assert body["error"]["code"] == "budget_exceeded"
    assert body["error"]["param"] is None
    assert "hourly budget cap exceeded" in body["error"]["message"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 3600
    assert upstream.count == 10


async def test_tenant_wide_cap_spans_agents_and_tenants_are_isolated(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.usage = lambda _p, _b: {"prompt_tokens": 30_000, "completion_tokens": 0}
    settings = settings_for(
        upstream.url,
        tenants=[
            {
                "id": "acme",
                "api_keys": [TENANT_KEY],
                "budget_caps": [{"window": "monthly", "hard_limit_usd": "0.05"}],
            },
            {"id": "globex", "api_keys": [OTHER_KEY]},
        ],
    )
    client = await make_client(settings, store=redis_store)
    for agent in ("a", "b"):
        resp = await client.post(
            "/v1/chat/completions", json=chat(max_tokens=10), headers=auth(agent=agent)
        )
        assert resp.status == 200
    # $0.06 of $0.05 monthly spent across a and b: agent c is refused by the tenant cap.
    resp = await client.post(
        "/v1/chat/completions", json=chat(max_tokens=10), headers=auth(agent="c")
    )
    assert resp.status == 429
    message = (await resp.json())["error"]["message"]
    assert "monthly budget cap exceeded for tenant 'acme'" in message
    assert "$0.0600 spent" in message and "$0.05 limit" in message
    # Another tenant is unaffected; agent counters are per agent.
    resp = await client.post(
        "/v1/chat/completions", json=chat(max_tokens=10), headers=auth(OTHER_KEY)
    )
    assert resp.status == 200
    assert (await spent(redis_store, "acme", "a"))[0] == Decimal("0.03")
    assert (await spent(redis_store, "acme", "b"))[0] == Decimal("0.03")
    assert (await spent(redis_store, "acme", "c"))[0] == 0
    assert (await spent(redis_store, "globex", "_default"))[0] == Decimal("0.03")
    assert (await spent(redis_store, "acme", None, Window.MONTHLY))[0] == Decimal("0.06")


async def test_new_agent_ids_cannot_escape_the_default_tenant_cap(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    # $1 per call; $10 hourly per agent, $3 hourly per tenant by default. Passthrough
    # tenants (derived from unknown keys) get the default tenant cap too.
    upstream.usage = lambda _p, _b: {"prompt_tokens": 1_000_000, "completion_tokens": 0}
    settings = settings_for(
        upstream.url,
        auth={"mode": "passthrough"},
        cost_caps={"default_tenant_budget_caps": [{"window": "hourly", "hard_limit_usd": 3}]},
    )
    client = await make_client(settings, store=redis_store)
    for key in ("sk-user-own", TENANT_KEY):
        statuses = []
        for i in range(5):
            resp = await client.post(
                "/v1/chat/completions", json=chat(max_tokens=1), headers=auth(key, f"agent-{i}")
            )
            statuses.append(resp.status)
        assert statuses == [200, 200, 200, 429, 429], key
    assert (await spent(redis_store, "acme", None))[0] == 3


async def test_agent_override_and_unknown_agent_defaults(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    # 5M prompt tokens billed per call = $5.
    upstream.usage = lambda _p, _b: {"prompt_tokens": 5_000_000, "completion_tokens": 0}
    client = await make_client(settings_for(upstream.url), store=redis_store)

    async def call(agent: str) -> int:
        resp = await client.post(
            "/v1/chat/completions", json=chat(max_tokens=10), headers=auth(agent=agent)
        )
        await resp.read()
        return resp.status

    # Unknown agent: default hourly $10 -> two calls, then refused.
    assert [await call("worker") for _ in range(3)] == [200, 200, 429]
    # premium-agent has its own daily $500 and no hourly cap.
    assert [await call("premium-agent") for _ in range(3)] == [200, 200, 200]
    assert (await spent(redis_store, "acme", "premium-agent", Window.DAILY))[0] == 15


async def test_soft_cap_and_80_percent_warnings(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.usage = lambda _p, _b: {"prompt_tokens": 4_250_000, "completion_tokens": 0}
    settings = settings_for(
        upstream.url,
        cost_caps={
            "default_budget_caps": [
                {"window": "hourly", "hard_limit_usd": 10, "soft_limit_usd": 8},
                {"window": "daily", "hard_limit_usd": 10},
            ]
        },
    )
    client = await make_client(settings, store=redis_store)
    first = await client.post("/v1/chat/completions", json=chat(max_tokens=10), headers=auth())
    assert first.status == 200
    assert "x-budget-warning" not in first.headers
    second = await client.post("/v1/chat/completions", json=chat(max_tokens=10), headers=auth())
    assert second.status == 200
    assert second.headers["x-budget-warning"] == (
        "hourly soft cap exceeded: $8.5000 / $8.00; daily budget at 85.0%: $8.5000 / $10.00"
    )
    assert second.headers["x-budget-remaining-usd"] == "1.500000"


async def test_zero_and_negative_costs_are_ignored(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings_for(upstream.url), store=redis_store)
    for usage in ({"prompt_tokens": 0, "completion_tokens": 0}, {"prompt_tokens": -5}):
        upstream.usage = lambda _p, _b, u=usage: u  # type: ignore[misc]
        resp = await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
        assert resp.status == 200
    charged, held = await spent(redis_store, "acme", "_default")
    assert held == 0
    # Zero usage costs nothing; invalid (negative) usage is charged the hold, never less.
    assert charged > 0
    assert charged < Decimal("0.0001")


async def test_retry_after_at_a_window_boundary(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    # 10:59:30 UTC: the hourly window resets in 30 s, the daily one much later.
    now = [float(1_767_265_170)]  # 2026-01-01T10:59:30Z
    assert time.gmtime(now[0]).tm_min == 59
    store = MemoryStore(clock=lambda: now[0])
    upstream.usage = lambda _p, _b: {"prompt_tokens": 10_000_000, "completion_tokens": 0}
    client = await make_client(settings_for(upstream.url), store=store)
    assert (
        await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    ).status == 200
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "30"
    assert resp.headers["x-should-retry"] == "true"
    # At the boundary the hourly spend is gone.
    now[0] += 30
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    assert resp.status == 200
    # Ten hours later the daily window ($100) still counts all three calls.
    assert (await spent(store, "acme", "_default", Window.DAILY))[0] == 20


async def test_retry_after_covers_every_exceeded_window_in_another_zone(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    # 23:59:00 in New York (EST, UTC-5): both the hour and the day end in 60 s.
    now = [float(1_767_329_940)]  # 2026-01-02T04:59:00Z
    store = MemoryStore(clock=lambda: now[0])
    upstream.usage = lambda _p, _b: {"prompt_tokens": 10_000_000, "completion_tokens": 0}
    settings = settings_for(
        upstream.url,
        time_zone="America/New_York",
        cost_caps={
            "default_budget_caps": [
                {"window": "hourly", "hard_limit_usd": 10},
                {"window": "daily", "hard_limit_usd": 10},
                {"window": "monthly", "hard_limit_usd": 1000},
            ]
        },
    )
    client = await make_client(settings, store=store)
    assert (
        await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    ).status == 200
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "60"
    message = (await resp.json())["error"]["message"]
    assert "hourly budget cap exceeded" in message and "daily budget cap exceeded" in message


async def test_hopeless_request_says_do_not_retry(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    settings = settings_for(
        upstream.url,
        cost_caps={"default_budget_caps": [{"window": "daily", "hard_limit_usd": "0.0001"}]},
    )
    client = await make_client(settings)
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=1000), headers=auth())
    assert resp.status == 429
    assert resp.headers["x-should-retry"] == "false"
    assert "> $0.0001 limit" in (await resp.json())["error"]["message"]
    assert upstream.count == 0


# --- token caps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "agent", "fragment"),
    [
        (chat("word " * 5000), None, "Prompt tokens"),
        (chat(max_tokens=5000), None, "Completion tokens (5000) exceed cap (4096)"),
        (chat(max_tokens=100, n=50), None, "Completion tokens (5000) exceed cap (4096)"),
        (chat("word " * 3000, max_completion_tokens=2500), "tight", "Total tokens"),
        (chat("word " * 20000), "premium-agent", "exceed cap (16384)"),
    ],
)
async def test_token_caps_reject_before_the_upstream(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    body: dict[str, object],
    agent: str | None,
    fragment: str,
) -> None:
    tight = {"agent_id": "tight", "token_cap": {"max_total_tokens": 5000}}
    settings = settings_for(upstream.url)
    agents = [a.model_dump(mode="json") for a in settings.cost_caps.agents]
    settings = settings_for(upstream.url, cost_caps={"agents": [*agents, tight]})
    client = await make_client(settings, store=redis_store)
    resp = await client.post("/v1/chat/completions", json=body, headers=auth(agent=agent))
    assert resp.status == 429
    error = (await resp.json())["error"]
    assert error["code"] == "token_cap_exceeded"
    assert fragment in error["message"]
    assert resp.headers["x-should-retry"] == "false"
    assert int(resp.headers["Retry-After"]) >= 1
    assert upstream.count == 0
    assert await spent(redis_store, "acme", agent or "_default") == NOTHING


async def test_premium_agent_prompt_cap_override(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings_for(upstream.url))
    resp = await client.post(
        "/v1/chat/completions",
        json=chat("word " * 10000, max_tokens=100),
        headers=auth(agent="premium-agent"),
    )
    assert resp.status == 200


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("POST", "/v1/chat/completions", {"data": b"{nope"}, 400, "invalid_json"),
        ("POST", "/v1/chat/completions", {"data": b"[1,2]"}, 400, "invalid_json"),
        ("POST", "/v1/chat/completions", {"data": b'{"x": NaN}'}, 400, "invalid_json"),
        ("POST", "/v1/chat/completions", {"data": b"\xff\xfe"}, 400, "invalid_json"),
        (
            "POST",
            "/v1/chat/completions",
            {"data": b'{"model": "test-model", "messages": [], "temperature": 1e999}'},
            400,
            "invalid_json",
        ),
        ("POST", "/v1/chat/completions", {"json": {"messages": []}}, 400, "missing_model"),
        ("POST", "/v1/chat/completions", {"json": {"model": 5}}, 400, "missing_model"),
        ("POST", "/v1/chat/completions", {"json": chat(model="m" * 300)}, 400, "invalid_request"),
        ("POST", "/v1/chat/completions", {"json": {"model": "nope-9"}}, 400, "model_not_priced"),
        (
            "POST",
            "/v1/embeddings",
            {"json": {"model": "test-model", "input": "x", "stream": True}},
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"json": chat(stream=True, stream_options=[1])},
            400,
            "invalid_request",
        ),
        ("POST", "/v1/chat/completions", {"json": chat(max_tokens="x")}, 400, "invalid_request"),
        ("POST", "/v1/chat/completions", {"json": chat(n=0)}, 400, "invalid_request"),
        ("POST", "/v1/chat/completions", {"data": b"x" * 2048}, 413, "request_too_large"),
        (
            "POST",
            "/v1/chat/completions",
            {"data": b"{}", "headers": {"Content-Encoding": "gzip"}},
            415,
            "unsupported_content_encoding",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"json": chat(), "headers": {"X-Agent-Id": "bad agent {id}"}},
            400,
            "invalid_request",
        ),
        ("POST", "/v1/images/generations", {"json": chat()}, 404, "unknown_url"),
        ("POST", "/chat/completions", {"json": chat()}, 404, "unknown_url"),
        ("GET", "/v1/chat/completions", {}, 405, "method_not_allowed"),
        ("GET", "/v1/files", {}, 404, "unknown_url"),
    ],
)
async def test_bad_input_gets_its_status_and_code(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    code: str,
) -> None:
    client = await make_client(
        settings_for(upstream.url, server={"max_body_bytes": 1024}), store=redis_store
    )
    extra = kwargs.pop("headers", {})
    assert isinstance(extra, dict)
    resp = await client.request(method, path, headers={**auth(), **extra}, **kwargs)  # type: ignore[arg-type]
    assert resp.status == status, await resp.text()
    error = (await resp.json())["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "code", "param"}
    if status == 405:
        assert resp.headers["Allow"] == "POST"
    assert upstream.count == 0
    assert await spent(redis_store, "acme", "_default") == NOTHING


async def test_every_route_and_unknown_path_answers_in_openai_errors_not_aiohttps(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings_for(upstream.url))
    for method, path, status, code in (
        ("DELETE", "/healthz", 405, "method_not_allowed"),
        ("POST", "/api/v1/caps", 405, "method_not_allowed"),
        ("PUT", "/nowhere", 404, "unknown_url"),
        ("GET", "/dashboard/no-such-file.js", 404, "unknown_url"),
    ):
        resp = await client.request(method, path)
        assert resp.status == status, (method, path)
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"]["code"] == code
    assert (await client.get("/healthz")).status == 200
    assert (await client.head("/healthz")).status == 200
    assert (await client.get("/dashboard/", allow_redirects=False)).status == 308


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": "Basic abc"},
        {"x-api-key": "nope"},
    ],
)
async def test_unauthorized_touches_nothing(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    headers: dict[str, str],
) -> None:
    client = await make_client(settings_for(upstream.url), store=redis_store)
    resp = await client.post("/v1/chat/completions", json=chat(), headers=headers)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert "sk-wrong" not in json.dumps(body)
    assert upstream.count == 0
    # Nothing but the store's own identity, which every replica writes at start.
    keys = [k async for k in redis_store.client.scan_iter(match=f"{redis_store.prefix}*")]
    assert [k for k in keys if b":{store}:" not in k] == []


async def test_x_api_key_authenticates(upstream: FakeUpstream, make_client: MakeClient) -> None:
    client = await make_client(settings_for(upstream.url))
    resp = await client.post("/v1/chat/completions", json=chat(), headers={"x-api-key": TENANT_KEY})
    assert resp.status == 200


# --- upstream failures ------------------------------------------------------------------


async def test_upstream_error_is_relayed_and_the_hold_released(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.status = 500
    client = await make_client(settings_for(upstream.url), store=redis_store)
    resp = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 500
    assert (await resp.json())["error"]["message"] == "boom"
    assert "x-budget-limit-usd" not in resp.headers
    assert await spent(redis_store, "acme", "_default") == NOTHING


async def test_unreachable_upstream_is_502_and_the_hold_released(
    make_client: MakeClient, redis_store: RedisStore
) -> None:

    settings = settings_for(f"http://127.0.0.1:{free_port()}/v1")
    client = await make_client(settings, store=redis_store)
    resp = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unreachable"
    assert await spent(redis_store, "acme", "_default") == NOTHING


async def test_upstream_timeout_after_sending_is_504_and_the_hold_charged(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    # The upstream got the request and may be generating (and billing) when the proxy gives
    # up: the hold is charged, not released, and nothing stays held.
    upstream.delay_s = 2
    settings = settings_for(upstream.url)
    route = settings.upstreams[0].model_copy(update={"timeout_s": 0.3})
    client = await make_client(
        settings.model_copy(update={"upstreams": (route,)}), store=redis_store
    )
    body = chat(max_tokens=100)
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 504
    assert time.monotonic() - started < 1.5
    assert (await resp.json())["error"]["code"] == "upstream_timeout"
    hold = Tokenizer().estimate(Endpoint.CHAT, body) + 100 * 2
    assert await spent(redis_store, "acme", "_default") == (
        Decimal(hold) / 1_000_000,
        Decimal(0),
    )


# --- store failures ---------------------------------------------------------------------


async def test_redis_down_fail_closed_then_a_restart_that_lost_the_spend_is_refused(
    redis_server: RedisServer, upstream: FakeUpstream, make_client: MakeClient
) -> None:
    store = RedisStore.from_url(redis_server.url, timeout_s=0.25)
    client = await make_client(settings_for(upstream.url), store=store)
    assert (await client.post("/v1/chat/completions", json=chat(), headers=auth())).status == 200
    redis_server.stop()
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    elapsed = time.monotonic() - started
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "store_unavailable"
    assert int(resp.headers["Retry-After"]) >= 1
    assert elapsed < 1.0
    assert upstream.count == 1
    redis_server.start()
    # The restarted Redis kept nothing (no persistence): that is a loss of spend, not a
    # fresh budget. Refused until an operator restores or accepts it.
    resp = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "store_data_lost"
    assert upstream.count == 1


async def test_redis_down_fail_open_forwards_and_records_later(
    redis_server: RedisServer, upstream: FakeUpstream, make_client: MakeClient
) -> None:
    store = RedisStore.from_url(redis_server.url, timeout_s=0.25)
    settings = settings_for(upstream.url, store={"on_error": "fail_open"})
    client = await make_client(settings, store=store)
    redis_server.stop()
    resp = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 200
    assert upstream.count == 1
    ledger = client.app[LEDGER]
    assert ledger.stats.fail_open_admitted == 1
    assert ledger.pending == 1
    redis_server.start()
    await ledger.flush()  # waits for the background retry if that got there first
    assert ledger.pending == 0
    assert (await spent(store, "acme", "_default"))[0] == Decimal("0.00005")
    assert await ledger.flush() == 0
    assert (await spent(store, "acme", "_default"))[0] == Decimal("0.00005")


async def test_reserve_lost_to_a_timeout_leaves_no_hold_behind(
    redis_server: RedisServer, upstream: FakeUpstream, make_client: MakeClient
) -> None:
    store = RedisStore.from_url(redis_server.url, timeout_s=0.1)
    client = await make_client(settings_for(upstream.url), store=store)
    warm = await client.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth())
    assert warm.status == 200  # connection open, scripts loaded
    spent_before = await spent(store, "acme", "_default")
    # Block Redis for a second: the reserve times out (503), then runs once Redis wakes.
    _, sleeper = await asyncio.open_connection("127.0.0.1", redis_server.port)
    sleeper.write(b"DEBUG SLEEP 1\r\n")
    await sleeper.drain()
    probe_reader, probe = await asyncio.open_connection("127.0.0.1", redis_server.port)
    for _ in range(200):  # until Redis is asleep
        probe.write(b"PING\r\n")
        try:
            await asyncio.wait_for(probe_reader.readline(), 0.05)
        except TimeoutError:
            break
    else:
        raise AssertionError("DEBUG SLEEP did not stall the test Redis")
    resp = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert resp.status == 503
    assert upstream.count == 1
    # The ledger releases that reservation id once Redis answers again.
    ledger = client.app[LEDGER]
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        await ledger.flush()
        with contextlib.suppress(StoreUnavailable):
            if not ledger.pending and await spent(store, "acme", "_default") == spent_before:
                break
        assert asyncio.get_running_loop().time() < deadline, "the lost hold was never cleared"
        await asyncio.sleep(0.05)
    sleeper.close()
    probe.close()
