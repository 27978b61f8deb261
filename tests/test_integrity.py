"""One regression test per way a hard cap used to leak: request shapes and client
behaviours that held less than the upstream could bill, or recorded less than it billed.

The real app, a fake upstream on loopback and a real Redis; amounts are exact micro-USD.
test-model costs $1 / $2 per 1M input / output tokens, so a token is 1 or 2 micro-USD.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import zlib
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy import handlers
from proxy.config import Settings
from proxy.endpoints import Endpoint
from proxy.redis_store import RedisStore
from proxy.tokens import Tokenizer
from proxy.windows import Window
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import (
    TENANT_KEY,
    AccessLog,
    access_log,
    auth,
    chat,
    settings_for,
    spent,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MICRO = Decimal("0.000001")
# What o3 bills (USD per 1M): $2 input, $8 output. The upstream generated 2,000 tokens,
# 1,990 of them hidden reasoning that no chat delta ever shows.
O3_USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 2000,
    "completion_tokens_details": {"reasoning_tokens": 1990},
}
O3_BILL = (20 * 2 + 2000 * 8) * MICRO


def usd(micros: int) -> Decimal:
    return micros * MICRO


def estimate(endpoint: Endpoint, body: dict[str, Any]) -> int:
    return Tokenizer().estimate(endpoint, body)


def held_prompt(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """The prompt tokens a request holds while in flight: its texts' UTF-8 length."""
    return Tokenizer().bound_prompt(endpoint, body).tokens


def uncapped(upstream_url: str, **over: Any) -> Settings:
    """The harness settings without a token cap, so only the hold's size is at stake."""
    caps = {"default_token_cap": None, **over.pop("cost_caps", {})}
    return settings_for(upstream_url, cost_caps=caps, **over)


async def held_in_flight(
    client: TestClient[Any, Any],
    upstream: FakeUpstream,
    store: RedisStore,
    path: str,
    body: dict[str, Any],
    agent: str = "_default",
) -> tuple[Decimal, aiohttp.ClientResponse]:
    """What the request holds while the upstream has it, and its response."""
    upstream.gate = asyncio.Event()
    upstream.arrived.clear()
    headers = auth(agent=None if agent == "_default" else agent)
    task = asyncio.create_task(client.post(path, json=body, headers=headers))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    held = (await spent(store, agent=agent))[1]
    upstream.gate.set()
    return held, await task


@pytest.fixture
def log() -> Iterator[AccessLog]:
    with access_log() as handler:
        yield handler


async def settled(log: AccessLog, agent: str = "_default") -> dict[str, Any]:
    """The access line of the agent's request: written once it is settled."""
    return await asyncio.wait_for(log.line(agent), 10)


# --- 1. streams that end without usage ------------------------------------------------


def o3_stream(**extra: Any) -> dict[str, Any]:
    return {"model": "o3", "messages": [{"role": "user", "content": "go"}], "stream": True, **extra}


def o3_hold(body: dict[str, Any]) -> tuple[Decimal, Decimal]:
    """(spent, held) once ``body``'s whole hold was charged: prompt at $2, output at $8."""
    return usd(estimate(Endpoint.CHAT, body) * 2 + body["max_completion_tokens"] * 8), Decimal(0)


async def leave_after_the_first_event(resp: aiohttp.ClientResponse) -> None:
    seen = b""
    while b'"role"' not in seen:
        seen += await resp.content.readany()
    resp.close()


async def test_a_reasoning_stream_the_client_leaves_is_drained_and_billed_its_usage(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: O3_USAGE
    upstream.pause_after = 2  # keep-alive, role chunk
    client = await make_client(settings_for(upstream.url), store=redis_store)
    resp = await client.post(CHAT, json=o3_stream(), headers=auth())
    await leave_after_the_first_event(resp)
    upstream.resume.set()
    line = await settled(log)
    # The proxy read the upstream to its end (discarding it) for the usage.
    assert upstream.finished == 1
    assert line["usage_missing"] is False
    assert await spent(redis_store) == (O3_BILL, Decimal(0))


async def test_on_client_disconnect_close_stops_the_upstream_and_charges_the_hold(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: O3_USAGE
    upstream.pause_after = 2
    settings = settings_for(upstream.url, streaming={"on_client_disconnect": "close"})
    client = await make_client(settings, store=redis_store)
    body = o3_stream(max_completion_tokens=3000)
    resp = await client.post(CHAT, json=body, headers=auth())
    await leave_after_the_first_event(resp)
    upstream.event_delay_s = 0.02  # one event per read: the usage chunk is never reached
    upstream.resume.set()
    await settled(log)
    await asyncio.wait_for(upstream.stream_closed.wait(), 5)
    assert upstream.finished == 0
    assert await spent(redis_store) == o3_hold(body)


async def test_a_reasoning_stream_that_ends_without_usage_is_charged_its_hold(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: None  # [DONE], and no usage at all
    client = await make_client(settings_for(upstream.url), store=redis_store)
    body = o3_stream(max_completion_tokens=3000)
    resp = await client.post(CHAT, json=body, headers=auth())
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    await settled(log)
    # Its visible text is a few tokens; its hidden reasoning may be the rest of the limit.
    assert await spent(redis_store) == o3_hold(body)


async def test_a_stream_cut_at_an_oversized_event_is_charged_its_hold(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: {"prompt_tokens": 10, "completion_tokens": 20}
    upstream.deltas = ("Hel", "x" * (5 * 1024 * 1024))  # one event over the 4 MiB limit
    client = await make_client(settings_for(upstream.url), store=redis_store)
    body = chat(stream=True, max_tokens=600)
    resp = await client.post(CHAT, json=body, headers=auth())
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await settled(log)
    # The usage chunk behind it was never read: the whole hold, not "Hel".
    assert await spent(redis_store) == (usd(estimate(Endpoint.CHAT, body) + 600 * 2), Decimal(0))


# --- 2. legacy completions with several prompts ---------------------------------------


@pytest.mark.parametrize(
    "prompt", [["a"] * 100, [[1, 2, 3], [4, 5]]], ids=["strings", "token-arrays"]
)
async def test_a_prompt_list_counts_one_completion_per_prompt_against_the_token_cap(
    upstream: FakeUpstream, make_client: MakeClient, prompt: list[Any]
) -> None:
    client = await make_client(settings_for(upstream.url))
    body = {"model": "test-model", "prompt": prompt, "max_tokens": 4000}
    resp = await client.post(COMPLETIONS, json=body, headers=auth())
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "token_cap_exceeded"
    assert upstream.count == 0


async def test_prompts_times_best_of_are_held(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings_for(upstream.url), store=redis_store)
    body = {"model": "test-model", "prompt": ["a", "b"], "n": 2, "best_of": 3, "max_tokens": 10}
    held, resp = await held_in_flight(client, upstream, redis_store, COMPLETIONS, body)
    assert resp.status == 200
    # 2 prompts x max(n, best_of) = 6 completions of up to 10 tokens each.
    assert held == usd(held_prompt(Endpoint.COMPLETIONS, body) + 6 * 10 * 2)


# --- 3. output-limit fields -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_completion_tokens": 0, "max_tokens": 30000}, "max_completion_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_completion_tokens": "100"}, "max_completion_tokens"),
        ({"max_tokens": True}, "max_tokens"),
    ],
)
async def test_a_non_positive_or_non_integer_output_limit_is_refused_naming_the_field(
    upstream: FakeUpstream, make_client: MakeClient, fields: dict[str, Any], param: str
) -> None:
    client = await make_client(settings_for(upstream.url))
    resp = await client.post(CHAT, json=chat(**fields), headers=auth())
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert upstream.count == 0


async def test_the_largest_output_limit_field_is_the_one_capped(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings_for(upstream.url))
    body = chat(max_completion_tokens=100, max_tokens=30000)
    resp = await client.post(CHAT, json=body, headers=auth())
    assert resp.status == 429
    assert "Completion tokens (30000)" in (await resp.json())["error"]["message"]
    assert upstream.count == 0


async def test_the_largest_output_limit_field_is_the_one_held(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings_for(upstream.url), store=redis_store)
    body = chat(max_completion_tokens=10, max_tokens=500)
    held, resp = await held_in_flight(client, upstream, redis_store, CHAT, body)
    assert resp.status == 200
    assert held == usd(held_prompt(Endpoint.CHAT, body) + 500 * 2)


async def test_an_injected_limit_lowers_every_field_the_upstream_could_read(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings_for(upstream.url))
    body = chat(max_tokens=None)
    assert (await client.post(CHAT, json=body, headers=auth())).status == 200
    sent = upstream.received[0].body
    assert sent is not None
    # The completion cap (4096) and total cap (8192 - prompt) allow 4096.
    assert sent["max_completion_tokens"] == 4096
    assert sent["max_tokens"] in (None, 4096)


# --- 4. input the proxy cannot size, images, hosted tools -----------------------------


def png(width: int, height: int) -> str:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = b"\x89PNG\r\n\x1a\n" + ihdr
    return "data:image/png;base64," + base64.b64encode(data).decode()


TEXT = {"type": "text", "text": "what is this?"}


def with_image(model: str, url: str, detail: str = "high") -> dict[str, Any]:
    part = {"type": "image_url", "image_url": {"url": url, "detail": detail}}
    content = [TEXT, part]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 10}


# gpt-4o-mini priced at test-model's round figures: a token is a micro-USD.
MINI = {"pricing": {"models": {"gpt-4o-mini": {"input_per_mtok": 1, "output_per_mtok": 2}}}}


@pytest.mark.parametrize(
    ("url", "detail", "image_tokens"),
    [
        # gpt-4o-mini: 2,833 base + 5,667 per 512-px tile.
        (png(512, 512), "high", 2833 + 5667),
        (png(512, 512), "low", 2833),
        (png(1024, 1024), "auto", 2833 + 4 * 5667),
        # A URL the proxy does not fetch: the model's largest image, 2 x 4 tiles.
        ("https://example.com/cat.png", "high", 2833 + 8 * 5667),
    ],
    ids=["512-high", "512-low", "1024-auto", "url"],
)
async def test_images_are_held_by_the_models_documented_rules(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    url: str,
    detail: str,
    image_tokens: int,
) -> None:
    client = await make_client(uncapped(upstream.url, **MINI), store=redis_store)
    body = with_image("gpt-4o-mini", url, detail)
    held, resp = await held_in_flight(client, upstream, redis_store, CHAT, body)
    assert resp.status == 200
    text_only = {**body, "messages": [{"role": "user", "content": [TEXT]}]}
    assert held == usd(held_prompt(Endpoint.CHAT, text_only) + image_tokens + 10 * 2)


async def test_an_image_url_for_a_model_without_image_rules_holds_its_whole_context(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    price = {"input_per_mtok": 1, "output_per_mtok": 2, "max_input_tokens": 50_000}
    settings = uncapped(upstream.url, pricing={"models": {"my-model": price}})
    client = await make_client(settings, store=redis_store)
    body = with_image("my-model", "https://example.com/cat.png")
    held, resp = await held_in_flight(client, upstream, redis_store, CHAT, body)
    assert resp.status == 200
    assert held == usd(50_000 + 10 * 2)


async def test_unsized_input_on_a_model_without_a_context_size_is_refused(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(uncapped(upstream.url))
    body = with_image("test-model", "https://example.com/cat.png")
    resp = await client.post(CHAT, json=body, headers=auth())
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "unsized_input"
    assert "max_input_tokens" in error["message"]
    assert upstream.count == 0


@pytest.mark.parametrize(
    "extra",
    [
        {"previous_response_id": "resp_123"},
        {"conversation": "conv_123"},
        {"prompt": {"id": "pmpt_123"}},
        {"input": [{"type": "item_reference", "id": "msg_123"}]},
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
    ],
    ids=["previous_response_id", "conversation", "stored-prompt", "item_reference", "file"],
)
async def test_server_side_state_and_files_hold_the_models_whole_context(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, extra: Any
) -> None:
    client = await make_client(uncapped(upstream.url), store=redis_store)
    body = {"model": "o3", "input": "and then?", "max_output_tokens": 1000, **extra}
    held, resp = await held_in_flight(client, upstream, redis_store, RESPONSES, body)
    assert resp.status == 200
    # o3: a 200,000-token context at $2, 1,000 output tokens at $8.
    assert held == usd(200_000 * 2 + 1000 * 8)


async def test_unsized_input_reject_refuses_it(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    settings = uncapped(upstream.url, cost_caps={"unsized_input": "reject"})
    client = await make_client(settings)
    body = {"model": "o3", "input": "and then?", "previous_response_id": "resp_123"}
    resp = await client.post(RESPONSES, json=body, headers=auth())
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "unsized_input"
    assert "previous_response_id" in error["message"]
    assert upstream.count == 0


async def test_unsized_input_counts_against_the_prompt_token_cap(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings_for(upstream.url))
    body = {"model": "o3", "input": "and then?", "previous_response_id": "resp_123"}
    resp = await client.post(RESPONSES, json=body, headers=auth())
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "token_cap_exceeded"
    assert upstream.count == 0


async def test_background_responses_are_refused(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings_for(upstream.url))
    body = {"model": "test-model", "input": "hi", "background": True, "max_output_tokens": 10}
    resp = await client.post(RESPONSES, json=body, headers=auth())
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", "background")
    assert upstream.count == 0


# A model whose context is small enough to hold, priced at round figures, and web
# searches at a cent each.
TOOLS = {
    "pricing": {
        "models": {
            "tool-model": {"input_per_mtok": 1, "output_per_mtok": 2, "max_input_tokens": 1000}
        },
        "tools": {"web_search": {"per_call_usd": "0.01"}},
    }
}
SEARCH = {"type": "web_search_call", "id": "ws_1", "status": "completed"}


async def test_hosted_tools_are_held_at_their_call_limit_and_charged_per_call(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: {"input_tokens": 50, "output_tokens": 10}
    upstream.output_items = [SEARCH, {**SEARCH, "id": "ws_2"}]
    client = await make_client(uncapped(upstream.url, **TOOLS), store=redis_store)
    body = {
        "model": "tool-model",
        "input": "news?",
        "tools": [{"type": "web_search"}],
        "max_output_tokens": 100,
    }
    held, resp = await held_in_flight(client, upstream, redis_store, RESPONSES, body)
    assert resp.status == 200
    # No max_tool_calls: the default 4 is sent, and held: the context re-read per call,
    # the output, and 4 searches.
    sent = upstream.received[0].body
    assert sent is not None and sent["max_tool_calls"] == 4
    assert held == usd(1000 * (1 + 4) + 100 * 2 + 4 * 10_000)
    await settled(log)
    # Charged the usage and the two searches the response lists.
    assert await spent(redis_store) == (usd(50 + 10 * 2 + 2 * 10_000), Decimal(0))


async def test_code_interpreter_is_held_and_charged_at_its_containers_size(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: {"input_tokens": 50, "output_tokens": 10}
    client = await make_client(uncapped(upstream.url, **TOOLS), store=redis_store)
    container = {"type": "auto", "memory_limit": "4g"}
    body = {
        "model": "tool-model",
        "input": "plot it",
        "tools": [{"type": "code_interpreter", "container": container}],
        "max_tool_calls": 1,
        "max_output_tokens": 100,
    }
    held, resp = await held_in_flight(client, upstream, redis_store, RESPONSES, body)
    assert resp.status == 200
    # A 4 GB container session is $0.12, not the 1 GB $0.03.
    assert held == usd(1000 * 2 + 100 * 2 + 120_000)
    await settled(log)
    # The container is billed even though the response lists no call.
    assert await spent(redis_store) == (usd(50 + 10 * 2 + 120_000), Decimal(0))


async def test_chat_web_search_is_charged_one_search(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: {"prompt_tokens": 50, "completion_tokens": 10}
    client = await make_client(uncapped(upstream.url, **TOOLS), store=redis_store)
    body = {
        "model": "tool-model",
        "messages": [{"role": "user", "content": "news?"}],
        "web_search_options": {},
        "max_tokens": 100,
    }
    assert (await client.post(CHAT, json=body, headers=auth())).status == 200
    await settled(log)
    # Chat answers never list their search; it is billed all the same.
    assert await spent(redis_store) == (usd(50 + 10 * 2 + 10_000), Decimal(0))


# --- 5. holds that outlive or outlast their request -----------------------------------


async def test_a_client_that_stops_reading_is_cut_and_the_stream_settled(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: {"prompt_tokens": 10, "completion_tokens": 300}
    upstream.deltas = ("x" * 65536,) * 160  # ~10 MB: more than the sockets buffer
    settings = settings_for(upstream.url, server={"client_write_timeout_s": 0.5})
    client = await make_client(settings, store=redis_store)
    resp = await client.post(CHAT, json=chat(stream=True, max_tokens=600), headers=auth())
    assert resp.status == 200
    # The client reads nothing more. The proxy gives up on it, drains the upstream for
    # its usage, and settles, while the client's connection is still open.
    line = await settled(log)
    assert not resp.closed
    assert line["usage_missing"] is False
    assert await spent(redis_store) == (usd(10 + 300 * 2), Decimal(0))
    resp.close()


async def test_a_429_caused_by_holds_says_when_the_holds_end(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    # $0.01 an hour; each request holds $0.008.
    settings = settings_for(
        upstream.url,
        cost_caps={"default_budget_caps": [{"window": "hourly", "hard_limit_usd": "0.01"}]},
        store={"hold_lease_s": 5},
    )
    client = await make_client(settings, store=redis_store)
    body = chat(max_tokens=4000)
    upstream.gate = asyncio.Event()
    first = asyncio.create_task(client.post(CHAT, json=body, headers=auth()))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    second = await client.post(CHAT, json=body, headers=auth())
    assert second.status == 429
    # Not the end of the hour: the first request's lease, renewed while it runs.
    assert 1 <= int(second.headers["Retry-After"]) <= 5
    upstream.gate.set()
    assert (await first).status == 200


# --- 6. an error of the proxy's own after the upstream answered -----------------------


@pytest.mark.parametrize("where", ["_usage_of", "_shadow_header"])
async def test_an_unexpected_error_after_a_2xx_is_charged_never_released(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    log: AccessLog,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    def broken(*_args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(handlers, where, broken)
    upstream.usage = lambda _p, _b: {"prompt_tokens": 10, "completion_tokens": 20}
    client = await make_client(settings_for(upstream.url), store=redis_store)
    body = chat(max_tokens=600)
    resp = await client.post(CHAT, json=body, headers=auth())
    assert resp.status == 500
    assert "a bug" not in await resp.text()
    await settled(log)
    # Before its usage was read, the upstream may have billed up to the hold; after, it
    # reported what it billed.
    hold, usage = estimate(Endpoint.CHAT, body) + 600 * 2, 10 + 20 * 2
    charged = hold if where == "_usage_of" else usage
    assert await spent(redis_store) == (usd(charged), Decimal(0))


# --- 7. service tiers -----------------------------------------------------------------


async def test_a_priority_request_is_held_at_the_priority_price(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings_for(upstream.url), store=redis_store)
    body = chat(max_tokens=600, service_tier="priority")
    held, resp = await held_in_flight(client, upstream, redis_store, CHAT, body)
    assert resp.status == 200
    # test-model states no priority price: twice the standard one.
    assert held == usd(2 * (held_prompt(Endpoint.CHAT, body) + 600 * 2))


async def test_a_stream_is_charged_at_the_tier_its_chunks_report(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: {"prompt_tokens": 100, "completion_tokens": 100}
    upstream.answer_extra = {"service_tier": "priority"}
    client = await make_client(settings_for(upstream.url), store=redis_store)
    resp = await client.post(CHAT, json=chat(stream=True, max_tokens=600), headers=auth())
    await resp.read()
    await settled(log)
    assert await spent(redis_store) == (usd(2 * (100 + 100 * 2)), Decimal(0))


# --- 8. bad bytes in Authorization ----------------------------------------------------


@pytest.mark.parametrize(
    "value", [b"Bearer \xff", b"Bearer sk-\xc3\xa9t\xc3\xa9", b"Bearer a b", b"\xff\xfe"]
)
async def test_any_bytes_in_authorization_are_a_401(
    upstream: FakeUpstream, make_client: MakeClient, value: bytes
) -> None:
    client = await make_client(settings_for(upstream.url))
    server = client.server
    payload = json.dumps(chat(max_tokens=10)).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: "
        + value
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + payload
    )
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert upstream.count == 0


# --- 9. agents a key is bound to -------------------------------------------------------

PREMIUM_KEY = "sk-acme-premium-key"


def bound(upstream_url: str) -> Settings:
    keys = [
        TENANT_KEY,
        {
            "key": "sha256:" + hashlib.sha256(PREMIUM_KEY.encode()).hexdigest(),
            "agent": "premium-agent",
        },
    ]
    return settings_for(
        upstream_url,
        tenants=[{"id": "acme", "api_keys": keys}],
        cost_caps={
            "agents": [
                {
                    "agent_id": "premium-agent",
                    "bound_keys_only": True,
                    "budget_caps": [{"window": "daily", "hard_limit_usd": 500}],
                }
            ]
        },
    )


async def test_a_bound_key_is_its_agent_whatever_the_header_says(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    client = await make_client(bound(upstream.url), store=redis_store)
    headers = auth(PREMIUM_KEY, agent="cheap-agent")
    assert (await client.post(CHAT, json=chat(max_tokens=10), headers=headers)).status == 200
    line = await settled(log, "premium-agent")
    assert line["agent"] == "premium-agent"
    assert (await spent(redis_store, agent="premium-agent", window=Window.DAILY))[0] > 0
    assert await spent(redis_store, agent="cheap-agent") == (Decimal(0), Decimal(0))


async def test_a_bound_only_agent_claimed_by_another_key_is_forbidden(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(bound(upstream.url))
    headers = auth(TENANT_KEY, agent="premium-agent")
    resp = await client.post(CHAT, json=chat(max_tokens=10), headers=headers)
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "forbidden"
    assert TENANT_KEY not in json.dumps(error)
    assert upstream.count == 0


# --- 10. unbounded upstream answers ---------------------------------------------------


async def test_an_upstream_answer_over_the_limit_is_a_502_charged_its_hold(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.raw_body = json.dumps({"choices": [], "pad": "x" * 5000}).encode()
    settings = settings_for(upstream.url, server={"max_upstream_body_bytes": 4096})
    client = await make_client(settings, store=redis_store)
    body = chat(max_tokens=600)
    resp = await client.post(CHAT, json=body, headers=auth())
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_response_too_large"
    await settled(log)
    assert await spent(redis_store) == (usd(estimate(Endpoint.CHAT, body) + 600 * 2), Decimal(0))
