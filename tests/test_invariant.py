"""The product promise, tested against an upstream that bills like OpenAI.

For every admitted request, the hold reserved before forwarding is at least what the
upstream can bill for it, and the recorded charge is at least what it billed (equal when
usage came back). No client behaviour lowers what is recorded, and across a concurrent run
recorded spend never passes the hard cap.

Measured per request (correlated by a marker sent as both the agent id and the body's
``user``):

* billed: ``BillingUpstream``'s invoice (its own prices, its own arithmetic);
* hold: the micro-USD amount the ledger passed to ``Store.reserve`` (a recording store);
* recorded: the actual micro-USD of ``Store.settle`` / ``Store.record`` for that rid,
  cross-checked with ``cost_usd`` on the ``capproxy.access`` log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import random
import struct
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import Any, cast
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.app import create_app
from proxy.config import Settings
from proxy.counters import Amounts, Counter, ReserveResult, SeenToday, Store, as_amounts
from proxy.endpoints import endpoint_for
from proxy.history import Rejection, SpendHistory
from proxy.memory_store import MemoryStore
from proxy.pricing import micros_to_usd, usd_to_micros
from proxy.redis_store import RedisStore
from proxy.tokens import Tokenizer
from proxy.windows import Window
from tests.billing_upstream import (
    OUTPUT_FIELDS,
    BillingUpstream,
    Charge,
    ModelTerms,
    Plan,
    PromptCounter,
)
from tests.conftest import ServedLikeProduction
from tests.harness import OTHER_KEY, TENANT_KEY, UPSTREAM_KEY, AccessLog, access_log, auth

UTC = ZoneInfo("UTC")
# Only a guard against a hang (a request that never settles); nothing here waits on time.
HANG_GUARD_S = 60

MODELS = {
    # Easy prices: micro-USD per token = USD per 1M tokens.
    "test-chat": ModelTerms(
        input_per_mtok=Decimal(1),
        cached_input_per_mtok=Decimal("0.5"),
        output_per_mtok=Decimal(2),
        max_output_tokens=1000,
        max_input_tokens=4000,
    ),
    "test-reasoner": ModelTerms(
        input_per_mtok=Decimal(2),
        cached_input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(8),
        max_output_tokens=4000,
        max_input_tokens=8000,
        reasoning=True,
    ),
    "test-embed": ModelTerms(
        input_per_mtok=Decimal(1),
        cached_input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(0),
        max_output_tokens=None,
        max_input_tokens=2000,
    ),
    # No max_input_tokens: input the proxy cannot size must be refused for it.
    "test-nomax": ModelTerms(
        input_per_mtok=Decimal(1),
        cached_input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(2),
        max_output_tokens=500,
        max_input_tokens=None,
    ),
}
GENERATIVE = ("test-chat", "test-reasoner", "test-nomax")
# Micro-USD per hosted tool call.
TOOL_PRICES = {
    "web_search": 10_000,
    "file_search": 2_500,
    "code_interpreter": 30_000,  # a 1 GB container
    "code_interpreter_4g": 120_000,
}
COMPLETION_CAP = 3000  # cost_caps.default_token_cap.max_completion_tokens
GLOBEX_CAP = Counter("globex", None, Window.MONTHLY, 1)
PROXY_CODES = frozenset(
    {
        "invalid_request",
        "unsized_input",
        "unsupported_parameter",
        "budget_exceeded",
        "token_cap_exceeded",
    }
)


def pricing() -> dict[str, Any]:
    """The proxy's ``pricing`` section: the same prices the upstream bills by."""
    return {
        "models": {name: terms.config() for name, terms in MODELS.items()},
        "tools": {
            name: {"per_call_usd": str(micros_to_usd(micros))}
            for name, micros in {
                **TOOL_PRICES,
                "web_search_preview": TOOL_PRICES["web_search"],  # billed as web_search
            }.items()
        },
    }


def invariant_settings(
    upstream_url: str, *, tenant_caps: Sequence[Mapping[str, Any]] = ()
) -> Settings:
    return Settings.model_validate(
        {
            "store": {"url": "memory://", "timeout_ms": 2000},
            "upstreams": [
                {
                    "name": "billing",
                    "base_url": upstream_url,
                    "api_key": UPSTREAM_KEY,
                    "models": ["*"],
                    "timeout_s": 30,
                    "connect_timeout_s": 5,
                }
            ],
            "tenants": [
                {"id": "acme", "api_keys": [TENANT_KEY], "budget_caps": list(tenant_caps)},
                # Broke: every request is over its budget.
                {
                    "id": "globex",
                    "api_keys": [OTHER_KEY],
                    "budget_caps": [{"window": "monthly", "hard_limit_usd": "0.000001"}],
                },
            ],
            "cost_caps": {
                "enabled": True,
                # Per agent (each request is its own agent): large, so that every request
                # has an agent counter to be found by in the store.
                "default_budget_caps": [{"window": "monthly", "hard_limit_usd": 100_000}],
                "default_token_cap": {"max_completion_tokens": COMPLETION_CAP},
            },
            "pricing": pricing(),
        }
    )


def prompt_counter(tokenizer: Tokenizer) -> PromptCounter:
    """The upstream's text count: the proxy's own tokenizer estimate (text only)."""

    def count(path: str, body: Mapping[str, Any]) -> int:
        endpoint = endpoint_for(path)
        assert endpoint is not None
        estimate_prompt = getattr(tokenizer, "estimate_prompt", None)
        if estimate_prompt is not None:
            return int(estimate_prompt(endpoint, body).tokens)
        return tokenizer.estimate(endpoint, body)

    return count


# --- what the proxy did: a recording store and the access log --------------------------


@dataclass
class Book:
    """Holds and charges per agent (= per request marker), from the store calls."""

    holds: dict[str, int] = field(default_factory=dict)
    recorded: dict[str, int] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    _agents: dict[str, str] = field(default_factory=dict)  # rid -> agent

    @staticmethod
    def _agent(counters: Sequence[Counter]) -> str | None:
        return next((c.agent_id for c in counters if c.agent_id is not None), None)

    def on_reserve(
        self, rid: str, counters: Sequence[Counter], amount: int, result: ReserveResult
    ) -> None:
        agent = self._agent(counters)
        if agent is None:
            return
        self._agents[rid] = agent
        if result.ok:
            self.holds[agent] = max(amount, self.holds.get(agent, 0))
        else:
            self.refused.add(agent)

    def on_settle(self, rid: str, counters: Sequence[Counter], actual: int) -> None:
        agent = self._agents.get(rid) or self._agent(counters)
        if agent is not None and agent not in self.recorded:  # settles are once per rid
            self.recorded[agent] = max(0, actual)


class RecordingStore:
    """A store that tells ``book`` every hold and settle of the store it wraps."""

    def __init__(self, inner: Store, book: Book) -> None:
        self.inner = inner
        self.book = book

    async def reserve(
        self, rid: str, counters: Sequence[Counter], amount: Amounts | int, **kw: Any
    ) -> ReserveResult:
        result = await self.inner.reserve(rid, counters, amount, **kw)
        self.book.on_reserve(rid, counters, as_amounts(amount).micros, result)
        return result

    async def settle(
        self, rid: str, states: Sequence[Any], actual: Amounts | int, **kw: Any
    ) -> None:
        await self.inner.settle(rid, states, actual, **kw)
        self.book.on_settle(rid, [s.counter for s in states], as_amounts(actual).micros)

    async def record(
        self, rid: str, counters: Sequence[Counter], actual: Amounts | int, **kw: Any
    ) -> None:
        await self.inner.record(rid, counters, actual, **kw)
        self.book.on_settle(rid, counters, as_amounts(actual).micros)

    async def renew(self, rid: str, states: Sequence[Any], *, hold_ttl_s: float) -> bool:
        return await self.inner.renew(rid, states, hold_ttl_s=hold_ttl_s)

    async def snapshot(self, counters: Sequence[Counter], *, tz: ZoneInfo) -> tuple[Any, ...]:
        return await self.inner.snapshot(counters, tz=tz)

    async def in_flight(self, tenant_id: str, agent_id: str | None) -> tuple[int, int]:
        return await self.inner.in_flight(tenant_id, agent_id)

    async def now(self) -> float:
        return await self.inner.now()

    async def claim(self, name: str, ttl_s: int) -> bool:
        return await self.inner.claim(name, ttl_s)

    def epoch_of(self, tenant_id: str) -> str:
        return self.inner.epoch_of(tenant_id)

    async def ping(self) -> None:
        await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def history(self, tenant_id: str) -> SpendHistory:
        return await self.inner.history(tenant_id)

    async def note_rejection(self, tenant_id: str, rejection: Rejection) -> None:
        await self.inner.note_rejection(tenant_id, rejection)

    async def rejections(self, tenant_id: str) -> tuple[Rejection, ...]:
        return await self.inner.rejections(tenant_id)

    async def seen_today(self, tenant_id: str, *, limit: int) -> SeenToday:
        return await self.inner.seen_today(tenant_id, limit=limit)


async def spend_all_of_globex(store: Store) -> None:
    """Globex has spent its whole (1 micro-USD) budget: none of its requests fits."""
    await store.record("globex-spent", [GLOBEX_CAP], 1, tz=UTC, hold_ttl_s=60)


class Rig:
    """The proxy under test, its billing upstream, and what the proxy recorded."""

    def __init__(
        self,
        client: TestClient[Any, Any],
        upstream: BillingUpstream,
        book: Book,
        log: AccessLog,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.book = book
        self.log = log

    def __repr__(self) -> str:
        return "Rig(...)"  # failing examples print their arguments: keep them short


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture
async def billing_upstream(aiohttp_server: AiohttpServer, tokenizer: Tokenizer) -> BillingUpstream:
    upstream = BillingUpstream(
        models=MODELS, tool_prices=TOOL_PRICES, prompt_tokens_for=prompt_counter(tokenizer)
    )
    server = await aiohttp_server(upstream.app())
    upstream.url = str(server.make_url("/v1"))
    return upstream


@pytest.fixture
async def rig(
    aiohttp_client: AiohttpClient, billing_upstream: BillingUpstream
) -> AsyncIterator[Rig]:
    book = Book()
    store = RecordingStore(MemoryStore(), book)
    await spend_all_of_globex(store)
    with access_log() as log:
        app = create_app(invariant_settings(billing_upstream.url), store=store)
        client: TestClient[Any, Any] = await aiohttp_client(ServedLikeProduction(app))
        yield Rig(client, billing_upstream, book, log)


# --- request shapes --------------------------------------------------------------------


@lru_cache(maxsize=64)
def png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of the given size (no image library)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def data_url(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(width, height)).decode()


def materialize(value: Any) -> Any:
    """``value`` with each ``"png:WxH"`` placeholder replaced by a data URL of such a PNG
    (placeholders keep the examples hypothesis prints short)."""
    if isinstance(value, str) and value.startswith("png:"):
        width, _, height = value.removeprefix("png:").partition("x")
        return data_url(int(width), int(height))
    if isinstance(value, list):
        return [materialize(v) for v in value]
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    return value


texts = st.text(alphabet="abcdefghij klmnop,.!?XYZ0123", max_size=40)
image_urls = st.one_of(
    st.builds("png:{}x{}".format, st.integers(1, 4096), st.integers(1, 4096)),
    st.just("https://example.com/cat.png"),
)
details = st.sampled_from([None, "low", "high", "auto"])
PDF = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4 tiny").decode()


def _with_detail(
    part: dict[str, Any], detail: str | None, key: str | None = None
) -> dict[str, Any]:
    if detail is None:
        return part
    if key is None:
        return {**part, "detail": detail}
    return {**part, key: {**part[key], "detail": detail}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part(url: str, detail: str | None) -> dict[str, Any]:
    return _with_detail({"type": "image_url", "image_url": {"url": url}}, detail, "image_url")


def input_text(text: str) -> dict[str, Any]:
    return {"type": "input_text", "text": text}


def input_image(url: str, detail: str | None) -> dict[str, Any]:
    return _with_detail({"type": "input_image", "image_url": url}, detail)


chat_parts = st.one_of(
    st.builds(text_part, texts),
    st.builds(image_part, image_urls, details),
    st.sampled_from(
        [
            {"type": "file", "file": {"file_id": "file-abc123"}},
            {"type": "file", "file": {"filename": "a.pdf", "file_data": PDF}},
        ]
    ),
)
response_parts = st.one_of(
    st.builds(input_text, texts),
    st.builds(input_image, image_urls, details),
    st.sampled_from(
        [
            {"type": "input_image", "file_id": "file-img123"},
            {"type": "input_file", "file_id": "file-abc123"},
            {"type": "input_file", "file_url": "https://example.com/a.pdf"},
            {"type": "input_file", "filename": "a.pdf", "file_data": PDF},
        ]
    ),
)
chat_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "assistant"]),
            "content": st.one_of(texts, st.lists(chat_parts, min_size=1, max_size=3)),
        }
    ),
    min_size=1,
    max_size=3,
)
function_tool: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
response_function_tool: dict[str, Any] = {"type": "function", **function_tool["function"]}
hosted_tools = st.sampled_from(
    [
        {"type": "web_search"},
        {"type": "web_search_preview"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "4g"}},
    ]
)
limits = st.one_of(st.integers(1, 64), st.integers(1, 4500), st.sampled_from([1000, 3000, 4000]))
output_fields = st.dictionaries(st.sampled_from(OUTPUT_FIELDS), limits, max_size=3)
tiers = st.sampled_from([None, "auto", "default", "flex", "priority"])
token_ids = st.lists(st.integers(0, 50_000), min_size=1, max_size=12)


def rarely(one_in: int) -> st.SearchStrategy[bool]:
    """True about once in ``one_in`` draws (shrinking towards False)."""
    return st.sampled_from([False] * (one_in - 1) + [True])


def _optional(**values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with each key either absent or drawn from its strategy."""
    return st.fixed_dictionaries({}, optional=values)


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(GENERATIVE)),
        "messages": draw(chat_messages),
    }
    body |= draw(output_fields)
    body |= draw(
        _optional(
            n=st.integers(1, 4),
            tools=st.just([function_tool]),
            web_search_options=st.sampled_from([{}, {"search_context_size": "low"}]),
            service_tier=tiers,
            stream=st.booleans(),
            stream_options=st.just({"include_usage": True}),
        )
    )
    return body


@st.composite
def completion_bodies(draw: st.DrawFn) -> dict[str, Any]:
    prompt = draw(
        st.one_of(
            texts,
            st.lists(texts, min_size=1, max_size=3),
            token_ids,
            st.lists(token_ids, min_size=1, max_size=3),
        )
    )
    body: dict[str, Any] = {"model": draw(st.sampled_from(GENERATIVE)), "prompt": prompt}
    body |= draw(output_fields)
    body |= draw(
        _optional(
            n=st.integers(1, 3),
            best_of=st.integers(1, 4),
            service_tier=tiers,
            stream=st.booleans(),
            stream_options=st.just({"include_usage": True}),
        )
    )
    return body


@st.composite
def embedding_bodies(draw: st.DrawFn) -> dict[str, Any]:
    inputs = draw(
        st.one_of(
            texts.filter(bool),
            st.lists(texts.filter(bool), min_size=1, max_size=4),
            token_ids,
            st.lists(token_ids, min_size=1, max_size=3),
        )
    )
    return {"model": draw(st.sampled_from(["test-embed", "test-chat"])), "input": inputs}


response_items = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "developer", "assistant"]),
            "content": st.one_of(texts, st.lists(response_parts, min_size=1, max_size=3)),
        }
    ),
    st.just({"type": "item_reference", "id": "msg_abc123"}),
)


@st.composite
def response_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(GENERATIVE)),
        "input": draw(st.one_of(texts, st.lists(response_items, min_size=1, max_size=3))),
    }
    body |= draw(output_fields)
    tools = draw(st.lists(st.one_of(hosted_tools, st.just(response_function_tool)), max_size=3))
    if tools:
        body["tools"] = tools
    body |= draw(
        _optional(
            instructions=texts,
            max_tool_calls=st.integers(1, 6),
            previous_response_id=st.just("resp_abc123"),
            conversation=st.just("conv_abc123"),
            prompt=st.just({"id": "pmpt_abc123", "version": "2"}),
            service_tier=tiers,
            stream=st.booleans(),
        )
    )
    if draw(rarely(20)):
        body["background"] = True
    return body


PATHS = ("chat/completions", "completions", "embeddings", "responses")


@dataclass(frozen=True, kw_only=True)
class Case:
    path: str
    body: dict[str, Any]
    broke: bool  # sent with the key of a tenant over its budget
    client: str  # "read" | "cancel" (before the answer) | "cut" (after `frames` frames)
    frames: int
    seed: int
    upstream_cut: int | None
    omit_usage: bool


@st.composite
def cases(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from(PATHS))
    body = draw(
        {
            "chat/completions": chat_bodies(),
            "completions": completion_bodies(),
            "embeddings": embedding_bodies(),
            "responses": response_bodies(),
        }[path]
    )
    return Case(
        path=path,
        body=body,
        broke=draw(rarely(12)),
        client=draw(st.sampled_from(["read", "read", "cancel", "cut"])),
        frames=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**32 - 1)),
        upstream_cut=draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 12))),
        omit_usage=draw(rarely(4)),
    )


# --- driving one request ---------------------------------------------------------------

_markers = itertools.count()


@dataclass
class Sent:
    marker: str
    status: int | None  # None: the client went away before the answer
    error: dict[str, Any] | None = None


async def _read_error(resp: Any) -> dict[str, Any] | None:
    """The OpenAI error of a non-200 answer; reads a 200 answer to its end (or its cut)."""
    if resp.status == 200:
        with contextlib.suppress(aiohttp.ClientError):
            await resp.read()  # a stream the upstream broke is cut for the client too
        return None
    with contextlib.suppress(ValueError, aiohttp.ClientError):
        data = json.loads(await resp.read())
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return cast(dict[str, Any], data["error"])
    return {}


async def read_frames(resp: Any, frames: int, paused: asyncio.Event) -> None:
    """Read until ``frames`` SSE frames came, the stream ended, or the upstream paused (it
    sends nothing more until the client has gone, so waiting for more could not end)."""
    seen = b""
    pause = asyncio.ensure_future(paused.wait())
    try:
        while seen.count(b"\n\n") < frames:
            read = asyncio.ensure_future(resp.content.readany())
            done, _ = await asyncio.wait({read, pause}, return_when=asyncio.FIRST_COMPLETED)
            if read not in done:
                read.cancel()
                return
            chunk = read.result()
            if not chunk:
                return
            seen += chunk
    finally:
        pause.cancel()


async def send(rig: Rig, case: Case, marker: str) -> Sent:
    """Send ``case`` as the client it describes; return when the client is done."""
    plan = Plan(seed=case.seed, cut_after=case.upstream_cut, omit_usage=case.omit_usage)
    stream = case.body.get("stream") is True
    if case.client == "cancel":
        plan.pause_after = 0
    elif case.client == "cut" and stream:
        plan.pause_after = case.frames
    rig.upstream.plan(marker, plan)
    headers = auth(OTHER_KEY if case.broke else TENANT_KEY, agent=marker)
    body = materialize({**case.body, "user": marker})
    url = f"/v1/{case.path}"

    if case.client == "cancel":

        async def whole() -> Sent:
            async with rig.client.post(url, json=body, headers=headers) as resp:
                return Sent(marker, resp.status, await _read_error(resp))

        task = asyncio.create_task(whole())
        paused = asyncio.create_task(plan.paused.wait())
        done, _ = await asyncio.wait({task, paused}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            paused.cancel()
            return task.result()
        task.cancel()  # the client goes away while the upstream works
        with contextlib.suppress(asyncio.CancelledError):
            await task
        plan.resume.set()
        return Sent(marker, None)

    resp = await rig.client.post(url, json=body, headers=headers)
    try:
        if case.client == "cut" and resp.status == 200:
            if stream:
                with contextlib.suppress(aiohttp.ClientError):
                    await read_frames(resp, case.frames, plan.paused)
            resp.close()  # the client goes away mid-answer
            return Sent(marker, resp.status)
        return Sent(marker, resp.status, await _read_error(resp))
    finally:
        resp.close()
        plan.resume.set()


async def exchange(rig: Rig, case: Case, marker: str) -> tuple[Sent, dict[str, Any]]:
    """Send ``case``; return what the client saw and the request's access line, once the
    proxy is done with it (the line is written after the settle) and the upstream too."""
    async with asyncio.timeout(HANG_GUARD_S):
        sent = await send(rig, case, marker)
        line = await rig.log.line(marker)
        if rig.upstream.saw(marker):
            await rig.upstream.finished(marker)
    return sent, line


def unsized(case: Case) -> bool:
    """Whether the request brings input the proxy cannot size, or enables hosted tools."""
    body = case.body
    if case.path == "chat/completions" and body.get("web_search_options") is not None:
        return True
    if case.path == "responses":
        if any(body.get(k) is not None for k in ("previous_response_id", "conversation", "prompt")):
            return True
        if any(t.get("type") != "function" for t in body.get("tools", [])):
            return True
    blob = json.dumps(body.get("messages", body.get("input")))
    return any(
        f'"type": "{kind}"' in blob
        for kind in ("image_url", "input_image", "file", "input_file", "item_reference")
    )


def check(rig: Rig, case: Case, sent: Sent, line: Mapping[str, Any]) -> None:
    """The promise, for one request."""
    marker = sent.marker
    hold = rig.book.holds.get(marker)
    charge: Charge | None = rig.upstream.charge(marker)
    billed = charge.micros if charge is not None else 0
    reached = rig.upstream.saw(marker)

    if hold is None:
        # Refused by the proxy: never forwarded, never billed.
        assert not reached, f"forwarded without a hold: {line}"
        assert line["status"] in (400, 429), line
        if sent.error is not None:
            assert sent.error.get("code") in PROXY_CODES, sent.error
        return

    assert not case.broke, "a tenant over its budget was admitted"
    assert not case.body.get("background"), "a background response was admitted"
    if case.body["model"] == "test-nomax":
        assert not unsized(case), "unsized input admitted for a model without max_input_tokens"
    recorded = rig.book.recorded.get(marker)
    assert recorded is not None, f"admitted but never settled: {line}"
    assert billed <= hold, (
        f"the upstream billed {billed} micro-USD, more than the {hold} held: {charge}"
    )
    assert recorded >= billed, (
        f"recorded {recorded} micro-USD, less than the {billed} billed: {charge}"
    )
    if charge is not None and charge.usage_delivered:
        assert recorded == billed, (
            f"usage came back, yet recorded {recorded} != billed {billed}: {charge}, {line}"
        )
        assert line["usage_missing"] is False, (
            f"the upstream delivered usage, yet the proxy settled without it: {charge}, {line}"
        )
    if reached and charge is None:
        assert recorded == 0, f"the upstream refused it (unbilled), yet {recorded} recorded"
    assert line["cost_usd"] == str(micros_to_usd(recorded)), (
        f"the access line says {line['cost_usd']}, the store got {recorded} micro-USD: {line}"
    )


# --- the properties --------------------------------------------------------------------


@settings(
    max_examples=500,
    deadline=None,
    database=None,  # nothing written into the work tree; a failure prints its reproduction
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(case=cases())
async def test_every_admitted_request_holds_and_records_at_least_what_the_upstream_billed(
    rig: Rig, case: Case
) -> None:
    marker = f"inv-{next(_markers)}"
    sent, line = await exchange(rig, case, marker)
    charge = rig.upstream.charge(marker)
    admitted = marker in rig.book.holds
    code = (sent.error or {}).get("code")
    event(f"{case.path}: " + ("admitted" if admitted else f"refused {line['status']} {code}"))
    if charge is not None:
        event("usage delivered" if charge.usage_delivered else "usage not delivered")
    check(rig, case, sent, line)


async def test_a_plain_chat_is_admitted_and_recorded_exactly(rig: Rig) -> None:
    case = Case(
        path="chat/completions",
        body={"model": "test-chat", "messages": [{"role": "user", "content": "hi"}]},
        broke=False,
        client="read",
        frames=1,
        seed=1,
        upstream_cut=None,
        omit_usage=False,
    )
    sent, line = await exchange(rig, case, "plain-chat")
    assert sent.status == 200
    check(rig, case, sent, line)
    charge = rig.upstream.charge("plain-chat")
    assert charge is not None and charge.micros > 0


# --- the concurrent run against Redis --------------------------------------------------


def _concurrent_cases(count: int) -> list[Case]:
    """Mixed requests, some disconnecting, some cut or without usage upstream; holds from
    a few hundredths of a cent (embeddings) to tenths of a dollar (hosted tools)."""
    rng = random.Random(20_240_601)
    out = []
    for _ in range(count):
        path = rng.choice(["chat/completions", "completions", "responses", "embeddings"])
        model = rng.choice(["test-chat", "test-reasoner"])
        stream = path != "embeddings" and rng.random() < 0.5
        body: dict[str, Any]
        if path == "chat/completions":
            content: Any = "hello " * rng.randint(1, 20)
            if rng.random() < 0.2:
                content = [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "png:512x512"}},
                ]
            body = {"model": model, "messages": [{"role": "user", "content": content}]}
            body["max_completion_tokens"] = rng.choice([200, 1000, 2000])
            body["n"] = rng.randint(1, 2)
        elif path == "completions":
            body = {"model": model, "prompt": ["say hi", "say bye"][: rng.randint(1, 2)]}
            body["max_tokens"] = rng.choice([100, 500, 1000])
        elif path == "responses":
            body = {"model": model, "input": "hello " * rng.randint(1, 20)}
            body["max_output_tokens"] = rng.choice([200, 1000, 3000])
            if rng.random() < 0.3:
                body["tools"] = [{"type": "web_search"}]
                body["max_tool_calls"] = rng.randint(1, 3)
            if rng.random() < 0.2:
                body["previous_response_id"] = "resp_abc123"
        else:
            body = {"model": "test-embed", "input": ["hello"] * rng.randint(1, 5)}
        if stream:
            body["stream"] = True
        if rng.random() < 0.2:
            body["service_tier"] = "priority"
        out.append(
            Case(
                path=path,
                body=body,
                broke=False,
                client=rng.choice(["read", "read", "read", "cancel", "cut"]),
                frames=rng.randint(1, 3),
                seed=rng.randrange(2**32),
                upstream_cut=rng.choice([None] * 9 + [rng.randint(0, 6)]),
                omit_usage=rng.random() < 0.1,
            )
        )
    return out


@pytest.fixture
async def recording_redis_store(redis_url: str, key_prefix: str) -> AsyncIterator[RecordingStore]:
    """A real Redis store that tells its ``book`` every hold and settle (requested before
    the app, so that it outlives the app's shutdown, which still settles)."""
    store = RecordingStore(RedisStore.from_url(redis_url, prefix=key_prefix, timeout_s=2.0), Book())
    try:
        yield store
    finally:
        await store.aclose()


async def test_sixty_concurrent_requests_never_bill_past_the_hard_cap(
    recording_redis_store: RecordingStore,
    aiohttp_client: AiohttpClient,
    billing_upstream: BillingUpstream,
) -> None:
    store, hard_cap = recording_redis_store, Decimal("0.15")
    await spend_all_of_globex(store)
    tenant_caps = [{"window": "monthly", "hard_limit_usd": str(hard_cap)}]
    with access_log() as log:
        settings = invariant_settings(billing_upstream.url, tenant_caps=tenant_caps)
        app = create_app(settings, store=store)
        client: TestClient[Any, Any] = await aiohttp_client(ServedLikeProduction(app))
        rig = Rig(client, billing_upstream, store.book, log)
        gate = asyncio.Semaphore(12)

        async def one(i: int, case: Case) -> tuple[Case, Sent, dict[str, Any]]:
            async with gate:
                sent, line = await exchange(rig, case, f"conc-{i}")
            return case, sent, line

        results = await asyncio.gather(*(one(i, c) for i, c in enumerate(_concurrent_cases(60))))

    problems = []
    for case, sent, line in results:
        try:
            check(rig, case, sent, line)
        except AssertionError as exc:
            problems.append(f"{sent.marker} {case.path} {case.client}: {exc}")
    statuses = [line["status"] for _, _, line in results]
    assert 429 in statuses, "the cap never bit: make the requests larger"
    assert any(s.marker in store.book.holds for _, s, _ in results), "nothing was admitted"

    limit = usd_to_micros(hard_cap)
    (state,) = await store.snapshot([Counter("acme", None, Window.MONTHLY, limit)], tz=UTC)
    invoice = billing_upstream.total_micros
    assert invoice <= limit, (
        f"the upstream billed ${micros_to_usd(invoice)}, past the ${hard_cap} hard cap"
    )
    assert state.spent >= invoice, f"recorded {state}, the upstream billed {invoice}"
    assert state.spent <= limit, f"recorded spend passed the hard cap: {state}"
    assert state.held == 0, f"holds left behind: {state}"
    assert not problems, "\n".join(problems)
