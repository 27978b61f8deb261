"""A prompt is held on its bound (its texts' UTF-8 length, never below its tokens) and
counted only where the count could change a decision: a token cap, an output limit sized
from the prompt, a price tier, a reservation refused on the bound, a charge the proxy
works out itself, shadow mode.

The real app, a fake upstream on loopback and a real Redis. test-model costs $1 / $2 per
1M input / output tokens, so a token is 1 or 2 micro-USD.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy import handlers, tokens
from proxy.endpoints import Endpoint
from proxy.redis_store import RedisStore
from proxy.state import LIFECYCLE
from proxy.tokens import Tokenizer
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import TEST_MODEL_PRICE, AccessLog, auth, chat, settings_for, spent
from tests.test_integrity import CHAT, MICRO, held_in_flight, log

__all__ = ["log"]  # a fixture, used by name
# 6,000 bytes in about 1,000 tokens: its bound is six times its count.
TEXT = "hello world " * 500
BODY = chat(TEXT, max_tokens=100)
USAGE_COST = (10 * 1 + 20 * 2) * MICRO  # the fake upstream's default usage


def count(body: dict[str, Any]) -> int:
    return Tokenizer().estimate(Endpoint.CHAT, body)


def bound(body: dict[str, Any]) -> int:
    return Tokenizer().bound_prompt(Endpoint.CHAT, body).tokens


def hourly(limit: Decimal, **caps: Any) -> dict[str, Any]:
    """Caps of one hourly budget of ``limit`` USD and no token cap."""
    return {
        "default_budget_caps": [{"window": "hourly", "hard_limit_usd": str(limit)}],
        "default_token_cap": None,
        **caps,
    }


@pytest.fixture
def no_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any encoding that loads fails the request (and so the test)."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"encoding {name} loaded")

    monkeypatch.setattr(tokens, "load_encoding", refuse)


async def refused(client: TestClient[Any, Any], upstream: FakeUpstream, code: str) -> str:
    """Send ``BODY``: it must be refused with ``code`` before the upstream; its message."""
    sent = upstream.count
    resp = await client.post(CHAT, json=BODY, headers=auth())
    assert resp.status == 429
    assert "Retry-After" in resp.headers
    error = (await resp.json())["error"]
    assert error["code"] == code
    assert upstream.count == sent
    message: str = error["message"]
    return message


BODY_COUNT = count(BODY)  # counted before any test makes the encodings fail
BOUND = bound(BODY)


def test_the_body_is_one_whose_bound_and_count_part_ways() -> None:
    assert bound(BODY) > 5 * count(BODY)


async def test_a_request_far_from_its_caps_is_held_on_the_bound_and_counts_nothing(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, no_encoding: None
) -> None:
    client = await make_client(
        settings_for(upstream.url, cost_caps=hourly(Decimal(1))), store=redis_store
    )
    held, resp = await held_in_flight(client, upstream, redis_store, CHAT, BODY)
    assert resp.status == 200
    assert held == (bound(BODY) * 1 + 100 * 2) * MICRO
    assert await spent(redis_store) == (USAGE_COST, Decimal(0))


async def test_a_hold_refused_on_the_bound_is_asked_again_on_the_count(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    # Room for the hold on the count, not for the one on the bound.
    limit = (count(BODY) + 100 * 2) * MICRO
    client = await make_client(
        settings_for(upstream.url, cost_caps=hourly(limit)), store=redis_store
    )
    held, resp = await held_in_flight(client, upstream, redis_store, CHAT, BODY)
    assert resp.status == 200
    assert held == limit  # the counted hold, and nothing left of the refused one
    assert upstream.count == 1
    assert await spent(redis_store) == (USAGE_COST, Decimal(0))


async def test_a_hold_the_count_cannot_fit_either_is_refused(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    limit = (count(BODY) + 100 * 2 - 1) * MICRO
    client = await make_client(
        settings_for(upstream.url, cost_caps=hourly(limit)), store=redis_store
    )
    await refused(client, upstream, "budget_exceeded")
    assert await spent(redis_store) == (Decimal(0), Decimal(0))


async def test_a_hold_no_count_could_fit_is_refused_without_counting(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, no_encoding: None
) -> None:
    # Not even the output limit fits: whatever the prompt's count, the answer is no.
    limit = (100 * 2 - 1) * MICRO
    client = await make_client(
        settings_for(upstream.url, cost_caps=hourly(limit)), store=redis_store
    )
    await refused(client, upstream, "budget_exceeded")


async def test_a_prompt_cap_between_the_count_and_the_bound_lets_the_request_through(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    cap = {"max_prompt_tokens": count(BODY)}
    caps = hourly(Decimal(1), default_token_cap=cap)
    client = await make_client(settings_for(upstream.url, cost_caps=caps))
    resp = await client.post(CHAT, json=BODY, headers=auth())
    assert resp.status == 200
    cap = {"max_prompt_tokens": count(BODY) - 1}
    client = await make_client(
        settings_for(upstream.url, cost_caps=hourly(Decimal(1), default_token_cap=cap))
    )
    assert str(count(BODY)) in await refused(client, upstream, "token_cap_exceeded")


async def test_an_output_limit_sized_from_the_prompt_is_sized_from_its_count(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    caps = hourly(Decimal(1), default_token_cap={"max_total_tokens": 3000})
    client = await make_client(settings_for(upstream.url, cost_caps=caps))
    body = chat(TEXT)  # no output limit: the proxy sets the one the total cap leaves
    resp = await client.post(CHAT, json=body, headers=auth())
    assert resp.status == 200
    assert upstream.received[0].body["max_completion_tokens"] == 3000 - count(body)


async def test_shadow_mode_decides_on_the_count(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    limit = (count(BODY) + 100 * 2) * MICRO
    caps = hourly(limit, enforce=False)
    client = await make_client(settings_for(upstream.url, cost_caps=caps), store=redis_store)
    held, resp = await held_in_flight(client, upstream, redis_store, CHAT, BODY)
    assert resp.status == 200
    assert "x-budget-would-reject" not in resp.headers
    assert held == limit


async def test_an_answer_without_usage_is_charged_the_hold_on_the_count(
    upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore, log: AccessLog
) -> None:
    upstream.usage = lambda _p, _b: None
    client = await make_client(
        settings_for(upstream.url, cost_caps=hourly(Decimal(1))), store=redis_store
    )
    resp = await client.post(CHAT, json=BODY, headers=auth())
    assert resp.status == 200
    line = await log.line("_default")
    assert line["prompt_tokens"] == count(BODY)
    assert line["usage_missing"] is True
    assert await spent(redis_store) == ((count(BODY) + 100 * 2) * MICRO, Decimal(0))


@pytest.mark.parametrize(
    ("room", "status", "held_after", "logged"),
    [
        # No usage comes back: the charge is the hold on the bound, more and never less
        # than the upstream billed; the answer goes out.
        (10**6, 200, (BOUND + 100 * 2) * MICRO, "charged on its bound"),
        # The count would fit, the bound does not: the refusal on the bound stands.
        ((BODY_COUNT + 100 * 2) * MICRO, 429, Decimal(0), "refused on its bound"),
    ],
    ids=["charge", "refusal"],
)
async def test_a_prompt_that_cannot_be_counted_is_charged_or_refused_on_its_bound(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    no_encoding: None,
    caplog: pytest.LogCaptureFixture,
    room: Decimal,
    status: int,
    held_after: Decimal,
    logged: str,
) -> None:
    upstream.usage = lambda _p, _b: None  # a charge would be worked out from the prompt
    client = await make_client(
        settings_for(upstream.url, cost_caps=hourly(Decimal(room))), store=redis_store
    )
    resp = await client.post(CHAT, json=BODY, headers=auth())
    assert resp.status == status
    assert upstream.count == (status == 200)
    assert await spent(redis_store) == (held_after, Decimal(0))
    assert f"could not be counted (AssertionError): {logged}" in caplog.text
    assert TEXT[:20] not in caplog.text


async def test_a_request_cancelled_while_its_prompt_is_counted_is_still_charged(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream.usage = lambda _p, _b: None
    counting, never = asyncio.Queue[None](), asyncio.Event()

    async def stuck(adm: handlers.Admission) -> None:
        counting.put_nowait(None)
        await never.wait()

    monkeypatch.setattr(handlers, "count_exactly", stuck)
    client = await make_client(
        settings_for(upstream.url, cost_caps=hourly(Decimal(1))), store=redis_store
    )
    request = asyncio.create_task(client.post(CHAT, json=BODY, headers=auth()))
    (task,) = await _counting_in(client, counting)
    task.cancel()  # as a shutdown past its grace: once, then again
    await asyncio.wait_for(counting.get(), 5)  # the settle's own count: cancelled too
    task.cancel()
    with pytest.raises(aiohttp.ClientError):
        await request
    never.set()
    assert upstream.count == 1
    for _ in range(200):  # the settle runs in a task of its own
        if (await spent(redis_store))[1] == 0:
            break
        await asyncio.sleep(0.01)
    assert await spent(redis_store) == ((bound(BODY) + 100 * 2) * MICRO, Decimal(0))


async def _counting_in(
    client: TestClient[Any, Any], counting: asyncio.Queue[None]
) -> set[asyncio.Task[object]]:
    """The request tasks in flight once one of them counts its prompt."""
    await asyncio.wait_for(counting.get(), 5)
    return set(client.app[LIFECYCLE].inflight)


async def test_a_request_the_upstream_refuses_costs_nothing_and_is_not_counted(
    upstream: FakeUpstream,
    make_client: MakeClient,
    redis_store: RedisStore,
    no_encoding: None,
    log: AccessLog,
) -> None:
    upstream.status = 400
    client = await make_client(
        settings_for(upstream.url, cost_caps=hourly(Decimal(1))), store=redis_store
    )
    resp = await client.post(CHAT, json=BODY, headers=auth())
    assert resp.status == 400
    line = await log.line("_default")
    assert line["prompt_tokens"] is None  # a bound is no count of tokens
    assert await spent(redis_store) == (Decimal(0), Decimal(0))


async def test_input_held_at_the_whole_context_is_not_counted(
    upstream: FakeUpstream, make_client: MakeClient, no_encoding: None
) -> None:
    # A file part cannot be sized: the prompt is held at the model's 5,000-token context,
    # whatever the text beside it counts, and the 4,096-token prompt cap refuses that.
    price = {**TEST_MODEL_PRICE, "max_input_tokens": 5000}
    caps = hourly(Decimal(1), default_token_cap={"max_prompt_tokens": 4096})
    settings = settings_for(upstream.url, cost_caps=caps, pricing={"models": {"test-model": price}})
    client = await make_client(settings)
    content = [{"type": "text", "text": "summarise"}, {"type": "file", "file": {"file_id": "f"}}]
    body = {**chat(max_tokens=100), "messages": [{"role": "user", "content": content}]}
    resp = await client.post(CHAT, json=body, headers=auth())
    assert resp.status == 429
    error = (await resp.json())["error"]
    assert error["code"] == "token_cap_exceeded"
    assert "Prompt tokens (5000) exceed cap (4096)" in error["message"]
