"""Rate caps (requests and tokens per window), model caps and end-user caps, through the real
app: each held in the one reservation with the budgets, across replicas."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.counters import Store
from proxy.memory_store import MemoryStore
from proxy.redis_store import RedisStore
from proxy.state import METRICS as METRICS_KEY
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import TENANT_KEY, auth, chat, cluster_store, settings_for
from tests.redis_topology import RedisCluster
from tests.test_app import samples

CHAT = "/v1/chat/completions"
COSTS = "/api/v1/costs/current"
CAPS = "/api/v1/caps"
FRONTIER = {
    "name": "frontier",
    "models": ["gpt-4o*", "o3*"],
    "rate_caps": [{"window": "daily", "max_requests": 2}],
    "budget_caps": [{"window": "daily", "hard_limit_usd": 20}],
}

Client = TestClient[Any, Any]


def caps(upstream: FakeUpstream, **cost_caps: Any) -> Any:
    """The harness's two tenants and default caps, with ``cost_caps`` merged in."""
    tenants = cost_caps.pop("tenants", None)
    over: dict[str, Any] = {"cost_caps": cost_caps}
    if tenants is not None:
        over["tenants"] = tenants
    return settings_for(upstream.url, **over)


async def send(client: Client, body: dict[str, Any] | None = None, **headers: str) -> Any:
    resp = await client.post(CHAT, json=body or chat(max_tokens=100), headers=auth(**headers))
    return resp.status, resp.headers, await resp.json()


def seconds_of(duration: str) -> float:
    """OpenAI's reset format (``1h2m3s``, ``6m0s``, ``1s``, ``120ms``) in seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?", duration)
    assert match is not None and duration, duration
    h, m, s, ms = (int(part or 0) for part in match.groups())
    return h * 3600 + m * 60 + s + ms / 1000


async def clear_of_the_minute_edge() -> None:
    """Start a minute-window test with the current minute far from its end, so that its
    requests all fall in one period (the window is calendar-aligned to :00)."""
    left = 60 - time.time() % 60
    if left < 10:
        await asyncio.sleep(left + 0.05)


# --- requests per window --------------------------------------------------------------------


async def test_a_request_cap_admits_its_count_then_refuses_with_rate_limit_exceeded(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    await clear_of_the_minute_edge()
    tenants = [
        {
            "id": "acme",
            "api_keys": [TENANT_KEY],
            "rate_caps": [{"window": "minute", "max_requests": 3}],
        }
    ]
    client = await make_client(caps(upstream, tenants=tenants), store=redis_store)
    seen = [await send(client) for _ in range(3)]
    assert [status for status, _, _ in seen] == [200, 200, 200]
    assert [h["x-ratelimit-remaining-requests"] for _, h, _ in seen] == ["2", "1", "0"]
    assert all(h["x-ratelimit-limit-requests"] == "3" for _, h, _ in seen)
    status, headers, body = await send(client)
    assert status == 429, {k: v for k, v in headers.items() if "ratelimit" in k}
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    message = body["error"]["message"]
    assert "minute rate limit on requests exceeded for tenant 'acme'" in message
    assert "3 requests used" in message
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-should-retry"] == "true"
    assert upstream.count == 3


async def test_a_daily_request_cap_tells_the_client_not_to_retry_soon(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(
        caps(upstream, default_rate_caps=[{"window": "daily", "max_requests": 1}])
    )
    assert (await send(client, agent="a1"))[0] == 200
    status, headers, body = await send(client, agent="a1")
    assert status == 429
    assert (
        "daily rate limit on requests exceeded for agent 'a1' of tenant 'acme'"
        in (body["error"]["message"])
    )
    assert int(headers["Retry-After"]) > 60 and headers["x-should-retry"] == "false"
    # The default applies per agent: another agent has its own count.
    assert (await send(client, agent="a2"))[0] == 200


async def test_a_request_the_upstream_refused_still_counts_one_that_never_left_does_not(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    settings = caps(upstream, default_rate_caps=[{"window": "daily", "max_requests": 2}])
    client = await make_client(settings)
    upstream.status = 500
    assert (await send(client))[0] == 500
    upstream.status = 200
    status, headers, _ = await send(client)
    assert (status, headers["x-ratelimit-remaining-requests"]) == (200, "0")


# --- tokens per window ----------------------------------------------------------------------


async def test_a_token_cap_holds_the_worst_case_and_settles_to_the_usage(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    settings = caps(upstream, default_rate_caps=[{"window": "daily", "max_tokens": 1000}])
    client = await make_client(settings, store=redis_store)
    status, headers, _ = await send(client)  # usage: 10 prompt + 20 completion
    assert status == 200
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "970"
    assert "x-ratelimit-limit-requests" not in headers  # no request cap applies
    # The hold is the prompt estimate + the output limit: 990 output tokens do not fit.
    status, headers, body = await send(client, chat(max_tokens=990))
    assert status == 429
    assert (body["error"]["code"], body["error"]["type"]) == ("rate_limit_exceeded", "tokens")
    assert "daily rate limit on tokens exceeded for agent '_default'" in body["error"]["message"]
    assert upstream.count == 1
    status, headers, _ = await send(client, chat(max_tokens=900))
    assert (status, headers["x-ratelimit-remaining-tokens"]) == (200, "940")


async def test_a_stream_reports_its_hold_then_settles_to_its_usage(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    settings = caps(upstream, default_rate_caps=[{"window": "daily", "max_tokens": 5000}])
    client = await make_client(settings, store=redis_store)
    resp = await client.post(CHAT, json=chat(max_tokens=500, stream=True), headers=auth())
    assert resp.status == 200
    held = 5000 - int(resp.headers["x-ratelimit-remaining-tokens"])
    assert held > 500  # the prompt estimate and the whole output limit
    await resp.read()
    _, body = await read(client, COSTS)
    (tokens,) = body["rate_windows"]
    assert (tokens["unit"], tokens["used"], tokens["held"]) == ("tokens", 30, 0)


# --- the headers ----------------------------------------------------------------------------


async def test_rate_limit_headers_describe_the_tightest_cap_and_replace_the_upstreams(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    await clear_of_the_minute_edge()
    upstream.extra_headers = {
        "x-ratelimit-limit-requests": "10000",
        "x-ratelimit-remaining-requests": "9999",
        "x-ratelimit-reset-requests": "6ms",
    }
    tenants = [
        {
            "id": "acme",
            "api_keys": [TENANT_KEY],
            "rate_caps": [{"window": "minute", "max_requests": 600, "max_tokens": 200_000}],
        }
    ]
    settings = caps(
        upstream, tenants=tenants, default_rate_caps=[{"window": "daily", "max_requests": 5}]
    )
    client = await make_client(settings)
    status, headers, _ = await send(client)
    assert status == 200
    # Requests: the agent's daily 5 is tighter than the tenant's 600 a minute.
    assert headers.getall("x-ratelimit-limit-requests") == ["5"]
    assert headers["x-ratelimit-remaining-requests"] == "4"
    assert 60 < seconds_of(headers["x-ratelimit-reset-requests"]) <= 25 * 3600
    # Tokens: only the tenant's minute cap counts them.
    assert headers["x-ratelimit-limit-tokens"] == "200000"
    assert headers["x-ratelimit-remaining-tokens"] == str(200_000 - 30)
    assert 0 < seconds_of(headers["x-ratelimit-reset-tokens"]) <= 60


async def test_without_rate_caps_the_operators_rate_headers_stay_private(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    upstream.extra_headers = {"x-ratelimit-remaining-tokens": "123456"}
    client = await make_client(caps(upstream))
    status, headers, _ = await send(client)
    assert status == 200
    assert not [name for name in headers if name.lower().startswith("x-ratelimit-")]


# --- model caps -----------------------------------------------------------------------------


async def test_a_model_cap_counts_only_its_models_for_the_whole_tenant(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(caps(upstream, model_caps=[FRONTIER]), store=redis_store)
    frontier = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert (await send(client, {**frontier, "max_tokens": 10}, agent="a1"))[0] == 200
    assert (await send(client, {**frontier, "max_tokens": 10}, agent="a2"))[0] == 200
    status, _, body = await send(client, {**frontier, "max_tokens": 10}, agent="a3")
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "for model cap 'frontier' of tenant 'acme'" in body["error"]["message"]
    # Other models are not counted; the other tenant has its own count.
    assert (await send(client))[0] == 200
    assert (
        await client.post(
            CHAT, json={**frontier, "max_tokens": 10}, headers=auth(key="sk-globex-test-key")
        )
    ).status == 200
    _, body = await read(client, COSTS)
    (spend,) = body["model_cap_windows"]
    assert spend["model_cap"] == "frontier" and spend["current_spend_usd"] > 0
    requests = [w for w in body["rate_windows"] if w["scope"] == "model"]
    assert [(w["scope_id"], w["used"], w["limit"]) for w in requests] == [("frontier", 2, 2)]
    _, explained = await read(client, CAPS, model="o3-mini")
    (cap,) = explained["model_caps"]
    assert (cap["name"], cap["applies"]) == ("frontier", True)
    _, explained = await read(client, CAPS, model="test-model")
    assert explained["model_caps"][0]["applies"] is False


async def test_a_model_cap_budget_refuses_with_budget_exceeded(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    tiny = {
        "name": "pricey",
        "models": ["test-model"],
        "budget_caps": [{"window": "daily", "hard_limit_usd": "0.001"}],
    }
    client = await make_client(caps(upstream, model_caps=[tiny]))
    status, _, body = await send(client, chat(max_tokens=1000))  # holds about $0.002
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    assert "model cap 'pricey'" in body["error"]["message"]


# --- end users ------------------------------------------------------------------------------


async def test_user_caps_count_each_end_user_named_in_the_body(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    users = {"rate_caps": [{"window": "daily", "max_requests": 2}]}
    client = await make_client(caps(upstream, user_caps=users), store=redis_store)
    for _ in range(2):
        assert (await send(client, chat(max_tokens=10, user="u-1@example.com")))[0] == 200
    status, _, body = await send(client, chat(max_tokens=10, user="u-1@example.com"))
    assert status == 429
    assert "for user 'u-1@example.com' of tenant 'acme'" in body["error"]["message"]
    assert (await send(client, chat(max_tokens=10, user="u-2")))[0] == 200
    assert (await send(client, chat(max_tokens=10)))[0] == 200  # no user: tenant and agent caps
    assert upstream.received[0].body["user"] == "u-1@example.com"  # forwarded as sent
    _, body = await read(client, COSTS, user_id="u-1@example.com")
    assert body["user_id"] == "u-1@example.com"
    (used,) = [w for w in body["rate_windows"] if w["scope"] == "user"]
    assert (used["scope_id"], used["used"], used["limit"]) == ("u-1@example.com", 2, 2)


async def test_user_caps_can_read_the_user_from_a_header(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    users = {"source": "header:X-End-User", "rate_caps": [{"window": "daily", "max_requests": 1}]}
    client = await make_client(caps(upstream, user_caps=users))
    headers = {**auth(), "X-End-User": "alice"}
    assert (await client.post(CHAT, json=chat(max_tokens=10), headers=headers)).status == 200
    resp = await client.post(CHAT, json=chat(max_tokens=10, user="bob"), headers=headers)
    assert resp.status == 429  # the header names the user, not the body


@pytest.mark.parametrize(
    ("source", "user", "header", "named"),
    [
        ("body.user", "bad user!", None, "'user'"),
        ("body.user", "x" * 129, None, "'user'"),
        ("body.user", 42, None, "'user'"),
        ("header:X-End-User", None, "bad user!", "header 'X-End-User'"),
    ],
)
async def test_a_bad_end_user_id_is_a_400_naming_its_source(
    upstream: FakeUpstream,
    make_client: MakeClient,
    source: str,
    user: Any,
    header: str | None,
    named: str,
) -> None:
    users = {"source": source, "rate_caps": [{"window": "daily", "max_requests": 5}]}
    client = await make_client(caps(upstream, user_caps=users))
    body = chat(max_tokens=10) if user is None else chat(max_tokens=10, user=user)
    headers = auth() if header is None else {**auth(), "X-End-User": header}
    resp = await client.post(CHAT, json=body, headers=headers)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert named in error["message"] and error["type"] == "invalid_request_error"
    assert upstream.count == 0


async def test_a_tenant_has_at_most_max_users_per_tenant_a_day(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    users = {"rate_caps": [{"window": "daily", "max_requests": 100}]}
    settings = caps(upstream, user_caps=users, max_users_per_tenant=2)
    client = await make_client(settings, store=redis_store)
    for user in ("u1", "u2"):
        assert (await send(client, chat(max_tokens=10, user=user)))[0] == 200
    status, headers, body = await send(client, chat(max_tokens=10, user="u3"))
    assert (status, body["error"]["code"]) == (429, "too_many_users")
    assert headers["x-should-retry"] == "false"
    assert (await send(client, chat(max_tokens=10, user="u1")))[0] == 200


# --- shadow mode, metrics ---------------------------------------------------------------------


async def test_shadow_mode_lets_a_rate_breach_through_and_reports_it(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    settings = caps(
        upstream,
        enforce=False,
        default_rate_caps=[{"window": "daily", "max_requests": 1}],
        default_max_concurrent_requests=1,
    )
    client = await make_client(settings)
    assert (await send(client))[0] == 200
    status, headers, _ = await send(client)
    assert status == 200 and headers["x-budget-would-reject"] == "rate_limit_exceeded"
    text, _ = client.app[METRICS_KEY].render()
    shadow = samples(text.decode(), "capproxy_shadow_rejections_total")
    assert shadow[(("reason", "rate_limit_exceeded"),)] == 1


async def test_rejections_are_counted_by_code(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(
        caps(upstream, default_rate_caps=[{"window": "daily", "max_requests": 1}])
    )
    await send(client)
    await send(client)
    await send(client)
    text, _ = client.app[METRICS_KEY].render()
    counted = samples(text.decode(), "capproxy_cap_rejections_total")
    assert counted[(("code", "rate_limit_exceeded"),)] == 2
    assert counted[(("code", "budget_exceeded"),)] == 0
    outcomes = samples(text.decode(), "capproxy_requests_total")
    assert outcomes[(("outcome", "rate_rejected"), ("route", "chat/completions"))] == 2


# --- two replicas, one store ----------------------------------------------------------------

KINDS: dict[str, dict[str, Any]] = {
    "tenant requests": {
        "tenants": [
            {
                "id": "acme",
                "api_keys": [TENANT_KEY],
                "rate_caps": [{"window": "daily", "max_requests": 7}],
            }
        ]
    },
    "agent tokens": {"default_rate_caps": [{"window": "daily", "max_tokens": 1000}]},
    "model cap requests": {
        "model_caps": [
            {"name": "all", "models": ["*"], "rate_caps": [{"window": "daily", "max_requests": 5}]}
        ]
    },
    "user tokens": {"user_caps": {"rate_caps": [{"window": "daily", "max_tokens": 700}]}},
}


@pytest.fixture(params=["redis", "cluster"])
async def shared_store(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Store]:
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("cluster")
        store: RedisStore = cluster_store(cluster, key_prefix, timeout_s=2.0)
    else:
        url: str = request.getfixturevalue("redis_url")
        store = RedisStore.from_url(url, prefix=key_prefix, timeout_s=2.0)
    yield store
    await store.aclose()


@pytest.mark.parametrize("kind", list(KINDS))
async def test_two_replicas_hold_every_kind_of_limit_exactly(
    upstream: FakeUpstream, make_client: MakeClient, shared_store: Store, kind: str
) -> None:
    settings = caps(upstream, **KINDS[kind])
    replicas = [await make_client(settings, store=shared_store) for _ in range(2)]
    upstream.gate = asyncio.Event()  # every admitted request holds until all are judged

    async def one(i: int) -> int:
        resp = await replicas[i % 2].post(
            CHAT, json=chat(max_tokens=100, user="u-1"), headers=auth(agent="bot")
        )
        return resp.status

    tasks = [asyncio.create_task(one(i)) for i in range(24)]
    refused: list[int] = []
    async with asyncio.timeout(20):
        while len(refused) + upstream.count < 24:
            done, _ = await asyncio.wait(tasks, timeout=0.05)
            refused = [t.result() for t in done]
    assert set(refused) <= {429}
    admitted = upstream.count
    _, body = await read(replicas[0], COSTS, agent_id="bot", user_id="u-1")
    (window,) = [w for w in body["rate_windows"] if w["limit"] in (7, 1000, 5, 700)]
    if window["unit"] == "requests":
        assert admitted == window["limit"] == window["held"]
    else:
        # Every admitted request holds the same worst case: exactly as many as fit.
        hold = window["held"] // admitted
        assert window["held"] == hold * admitted <= window["limit"] < hold * (admitted + 1)
    upstream.gate.set()
    assert sorted(await asyncio.gather(*tasks)).count(200) == admitted


# --- the SDK ----------------------------------------------------------------------------------


async def test_the_openai_sdk_reads_the_rate_limit_headers_and_the_429(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    settings = caps(upstream, default_rate_caps=[{"window": "daily", "max_requests": 2}])
    client = await make_client(settings, store=MemoryStore())
    sdk = openai.AsyncOpenAI(api_key=TENANT_KEY, base_url=str(client.make_url("/v1")))
    try:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=10
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert raw.parse().usage is not None
        await sdk.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=10
        )
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "hi"}], max_tokens=10
            )
        error = caught.value
        assert error.status_code == 429 and error.code == "rate_limit_exceeded"
        assert error.type == "requests"
        # x-should-retry: false (a daily window) keeps the SDK from retrying on its own.
        assert error.response.headers["x-should-retry"] == "false"
        assert upstream.count == 2
        text, _ = client.app[METRICS_KEY].render()
        counted = samples(text.decode(), "capproxy_cap_rejections_total")
        assert counted[(("code", "rate_limit_exceeded"),)] == 1  # asked once, not retried
    finally:
        await sdk.close()


async def read(client: Client, path: str, **params: str) -> tuple[int, dict[str, Any]]:
    resp = await client.get(path, headers=auth(), params=params)
    return resp.status, await resp.json()
