"""Streaming end to end: the real app, a streaming fake upstream, a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import openai
import pytest

from proxy.endpoints import Endpoint
from proxy.redis_store import RedisStore
from proxy.tokens import Tokenizer
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import TENANT_KEY, auth, chat, settings_for, spent

UTC = ZoneInfo("UTC")
USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 500,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 200},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
# 800 x $1 + 200 x $0.5 + 500 x $2 per 1M tokens
USAGE_COST = Decimal("0.0019")


def frames(data: bytes) -> list[bytes]:
    return [f + b"\n\n" for f in data.split(b"\n\n") if f]


@pytest.fixture
def usage_upstream(upstream: FakeUpstream) -> FakeUpstream:
    upstream.usage = lambda _p, _b: USAGE
    return upstream


async def test_stream_without_include_usage_is_the_upstream_stream_minus_its_usage_chunk(
    usage_upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings_for(usage_upstream.url), store=redis_store)
    resp = await client.post(
        "/v1/chat/completions", json=chat(stream=True, max_tokens=600), headers=auth()
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["x-request-id"] == "req_stream"
    assert resp.headers["x-budget-window"] == "hourly"
    got = await resp.read()
    # The proxy asked for usage upstream on the client's behalf...
    sent = usage_upstream.received[0].body
    assert sent["stream_options"] == {"include_usage": True}
    upstream_bytes = bytes(usage_upstream.streamed[0])
    usage_frames = [f for f in frames(upstream_bytes) if b'"choices": []' in f]
    assert len(usage_frames) == 1
    # ...and removed exactly that chunk: every other byte is the upstream's.
    assert got == upstream_bytes.replace(usage_frames[0], b"")
    assert got.endswith(b"data: [DONE]\n\n")
    assert await spent(redis_store) == (USAGE_COST, Decimal(0))


async def test_stream_with_include_usage_gets_the_usage_chunk(
    usage_upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings_for(usage_upstream.url), store=redis_store)
    body = chat(stream=True, stream_options={"include_usage": True}, max_tokens=600)
    resp = await client.post("/v1/chat/completions", json=body, headers=auth())
    got = await resp.read()
    assert got == usage_upstream.streamed[0]
    last = json.loads(frames(got)[-2].removeprefix(b"data: "))
    assert last["usage"]["completion_tokens"] == 500
    assert await spent(redis_store) == (USAGE_COST, Decimal(0))


@pytest.mark.parametrize("mode", ["vllm", "every"])
async def test_other_servers_usage_shapes(
    usage_upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, mode: str
) -> None:
    usage_upstream.stream_usage = mode
    client = await make_client(settings_for(usage_upstream.url), store=redis_store)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True), headers=auth())
    got = await resp.read()
    if mode == "vllm":
        assert b'"choices": null' not in got
    else:
        assert got == usage_upstream.streamed[0]
    assert await spent(redis_store) == (USAGE_COST, Decimal(0))


async def test_completions_stream_is_metered(
    usage_upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings_for(usage_upstream.url), store=redis_store)
    body = {"model": "test-model", "prompt": "Say hi", "stream": True, "max_tokens": 600}
    resp = await client.post("/v1/completions", json=body, headers=auth())
    got = await resp.read()
    assert b'"text": "Hel"' in got and b'"choices": []' not in got
    assert await spent(redis_store) == (USAGE_COST, Decimal(0))


async def test_responses_stream_is_metered_from_response_completed(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.usage = lambda _p, _b: {
        "input_tokens": 1000,
        "input_tokens_details": {"cached_tokens": 200},
        "output_tokens": 500,
        "output_tokens_details": {"reasoning_tokens": 100},
        "total_tokens": 1500,
    }
    client = await make_client(settings_for(upstream.url), store=redis_store)
    body = {"model": "test-model", "input": "hi", "stream": True, "max_output_tokens": 600}
    resp = await client.post("/v1/responses", json=body, headers=auth())
    got = await resp.read()
    assert got == upstream.streamed[0]
    assert "stream_options" not in upstream.received[0].body
    assert await spent(redis_store) == (USAGE_COST, Decimal(0))


async def test_stream_without_usage_charges_prompt_plus_counted_output(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.usage = lambda _p, _b: None
    client = await make_client(settings_for(upstream.url), store=redis_store)
    body = chat(stream=True, max_tokens=600)
    resp = await client.post("/v1/chat/completions", json=body, headers=auth())
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    prompt = Tokenizer().estimate(Endpoint.CHAT, body)
    output = Tokenizer().count("test-model", "Hello world!")
    assert await spent(redis_store) == (Decimal(prompt * 1 + output * 2) / 1_000_000, Decimal(0))


async def test_upstream_cut_mid_stream_ends_the_client_stream_abnormally_and_charges_the_hold(
    usage_upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    usage_upstream.cut_after = 4  # keep-alive, role chunk, "Hel", "lo"
    client = await make_client(settings_for(usage_upstream.url), store=redis_store)
    body = chat(stream=True, max_tokens=600)
    resp = await client.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            received += chunk
    assert b"[DONE]" not in received
    assert bytes(received) == usage_upstream.streamed[0]
    # No usage: the upstream may have billed anything up to the hold (prompt + 600 out).
    prompt = Tokenizer().estimate(Endpoint.CHAT, body)
    assert await spent(redis_store) == (Decimal(prompt + 600 * 2) / 1_000_000, Decimal(0))


@pytest.mark.parametrize("mode", ["drain", "close"])
async def test_client_disconnect_settles_once_and_never_below_the_bill(
    usage_upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, mode: str
) -> None:
    usage_upstream.pause_after = 4
    settings = settings_for(usage_upstream.url, streaming={"on_client_disconnect": mode})
    client = await make_client(settings, store=redis_store)
    body = chat(stream=True, max_tokens=600)
    resp = await client.post("/v1/chat/completions", json=body, headers=auth())
    seen = b""
    while b'"lo"' not in seen:
        seen += await resp.content.readany()
    assert (await spent(redis_store))[1] > 0  # the hold is in place mid-stream
    resp.close()  # the client goes away
    if mode == "close":
        # One event per read, so the proxy meets the gone client before the usage chunk.
        usage_upstream.event_delay_s = 0.02
    usage_upstream.resume.set()
    await asyncio.wait_for(usage_upstream.stream_closed.wait(), 5)
    if mode == "drain":
        # The proxy read the upstream to its end: the usage it reported is charged.
        assert usage_upstream.finished == 1
        expected = USAGE_COST
    else:
        # The proxy stopped the upstream: it may have billed up to the whole hold.
        assert usage_upstream.finished == 0
        prompt = Tokenizer().estimate(Endpoint.CHAT, body)
        expected = Decimal(prompt + 600 * 2) / 1_000_000
    for _ in range(200):
        if (await spent(redis_store))[1] == 0:
            break
        await asyncio.sleep(0.01)
    assert await spent(redis_store) == (expected, Decimal(0))


async def test_twenty_concurrent_streams_against_a_budget_for_five(
    usage_upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    body = chat(stream=True, max_tokens=1000)
    # In flight, the prompt is held on its bound (its UTF-8 length).
    hold = Tokenizer().bound_prompt(Endpoint.CHAT, body).tokens + 1000 * 2
    limit = Decimal(hold * 5) / 1_000_000
    usage_upstream.pause_after = 1
    settings = settings_for(
        usage_upstream.url,
        cost_caps={"default_budget_caps": [{"window": "hourly", "hard_limit_usd": str(limit)}]},
    )
    client = await make_client(settings, store=redis_store)

    async def one() -> tuple[int, bytes]:
        resp = await client.post("/v1/chat/completions", json=body, headers=auth())
        return resp.status, await resp.read()

    tasks = [asyncio.create_task(one()) for _ in range(20)]
    while sum(t.done() for t in tasks) < 15:
        await asyncio.sleep(0.01)
    usage_upstream.resume.set()
    results = await asyncio.gather(*tasks)
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 5
    assert statuses.count(429) == 15
    assert usage_upstream.count == 5
    for status, data in results:
        if status == 429:
            assert json.loads(data)["error"]["code"] == "budget_exceeded"
        else:
            assert data.endswith(b"data: [DONE]\n\n")
    assert await spent(redis_store) == (USAGE_COST * 5, Decimal(0))


async def test_stream_rejected_before_the_first_byte_is_plain_json(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(settings_for(upstream.url))
    resp = await client.post(
        "/v1/chat/completions", json=chat(stream=True, max_tokens=99999), headers=auth()
    )
    assert resp.status == 429
    assert resp.headers["Content-Type"].startswith("application/json")
    assert (await resp.json())["error"]["code"] == "token_cap_exceeded"
    assert upstream.count == 0


async def test_upstream_error_on_a_stream_is_relayed_and_released(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    upstream.status = 503
    client = await make_client(settings_for(upstream.url), store=redis_store)
    resp = await client.post("/v1/chat/completions", json=chat(stream=True), headers=auth())
    assert resp.status == 503
    assert (await resp.json())["error"]["message"] == "boom"
    assert await spent(redis_store) == (Decimal(0), Decimal(0))


async def test_slow_client_backpressure_reaches_the_upstream(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    # 12,000 events of ~8 KB (about 100 MB) against a client that stops reading: the
    # upstream's writes must block long before the end (kernel socket buffers take some).
    upstream.deltas = tuple("x" * 8192 for _ in range(12_000))
    settings = settings_for(upstream.url)
    route = settings.upstreams[0].model_copy(update={"timeout_s": 60})
    client = await make_client(settings.model_copy(update={"upstreams": (route,)}))
    resp = await client.post("/v1/chat/completions", json=chat(stream=True), headers=auth())
    first = await resp.content.readany()
    total = len(b"".join(upstream.stream_events("/v1/chat/completions", {"stream": True})))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        since = upstream.blocked_since
        if since is not None and time.monotonic() - since > 0.5:
            break
        await asyncio.sleep(0.05)
    assert upstream.blocked_since is not None, "the upstream was never held back"
    assert len(upstream.streamed[0]) < total // 2
    # Once the client reads again, the rest flows through intact.
    got = first + await resp.read()
    (usage_frame,) = [f for f in frames(bytes(upstream.streamed[0])) if b'"choices": []' in f]
    assert got == upstream.streamed[0].replace(usage_frame, b"")


async def test_openai_sdk_streams_chat_and_responses_through_the_proxy(
    usage_upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    client = await make_client(settings_for(usage_upstream.url), store=redis_store)
    sdk = openai.AsyncOpenAI(
        api_key=TENANT_KEY, base_url=str(client.make_url("/v1")), max_retries=0
    )
    try:
        deltas: list[str] = []
        stream = await sdk.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=600,
        )
        final_usage: Any = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                final_usage = chunk.usage
        assert "".join(deltas) == "Hello world!"
        assert final_usage is not None and final_usage.completion_tokens == 500

        usage_upstream.usage = lambda _p, _b: {
            "input_tokens": 1000,
            "input_tokens_details": {"cached_tokens": 200},
            "output_tokens": 500,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 1500,
        }
        texts: list[str] = []
        completed: Any = None
        rstream = await sdk.responses.create(
            model="test-model", input="hi", stream=True, max_output_tokens=600
        )
        async for event in rstream:
            if event.type == "response.output_text.delta":
                texts.append(event.delta)
            elif event.type == "response.completed":
                completed = event.response
        assert "".join(texts) == "Hello world!"
        assert completed is not None and completed.usage.output_tokens == 500

        # A rejection reaches the SDK as RateLimitError, and it does not retry it.
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(
                model="test-model",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                max_tokens=99999,
            )
        assert caught.value.code == "token_cap_exceeded"
    finally:
        await sdk.close()
    assert await spent(redis_store) == (USAGE_COST * 2, Decimal(0))
