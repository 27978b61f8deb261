from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr
from pytest_aiohttp import AiohttpServer

from proxy.alerts import Alert, Alerter
from proxy.budget import BudgetPlan
from proxy.config import AlertsConfig, BudgetCap, RateCap
from proxy.counters import Amounts, Counter, CounterState, Unit
from proxy.pricing import usd_to_micros
from proxy.windows import Period, Window

DAY = 86_400
START = 1_715_731_200  # 2024-05-15 00:00 UTC
TOKEN = "s3cr3t-webhook-token"
WAIT_S = 5.0


@dataclass
class Receiver:
    """A webhook on loopback that records every POST; answers follow ``statuses``, then 200."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    hang: int = 0  # this many requests (the first ones) wait for `release` before answering
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        return app

    async def _hook(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))
        self.arrived.set()
        if len(self.bodies) <= self.hang:
            await self.release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    async def wait_for(self, count: int) -> None:
        """Until ``count`` requests have arrived (bounded by ``WAIT_S``)."""
        async with asyncio.timeout(WAIT_S):
            while len(self.bodies) < count:
                self.arrived.clear()
                await self.arrived.wait()

    @property
    def kinds(self) -> list[str]:
        return [body["kind"] for body in self.bodies]


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> AsyncIterator[Receiver]:
    fake = Receiver()
    server = await aiohttp_server(fake.app())
    fake.url = f"{server.make_url('/hook')}?token={TOKEN}"
    yield fake
    fake.release.set()  # let hanging handlers finish before the server closes


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def config(url: str | None, *, timeout_s: float = 0.2, retries: int = 1) -> AlertsConfig:
    return AlertsConfig(
        webhook_url=None if url is None else SecretStr(url), timeout_s=timeout_s, retries=retries
    )


def alerter(
    session: aiohttp.ClientSession,
    url: str | None,
    *,
    retries: int = 1,
    timeout_s: float = 0.2,
    **kwargs: Any,
) -> Alerter:
    """An alerter whose clock stands in the test period (``START``'s day)."""
    kwargs.setdefault("clock", lambda: START + 100)
    kwargs.setdefault("backoff_s", 0.01)
    return Alerter(session, config(url, timeout_s=timeout_s, retries=retries), **kwargs)


def plan(
    hard: str = "10",
    soft: str | None = None,
    *,
    tenant_id: str = "acme",
    agent_id: str | None = None,
    window: Window = Window.DAILY,
) -> BudgetPlan:
    cap = BudgetCap(
        window=window,
        hard_limit_usd=Decimal(hard),
        soft_limit_usd=None if soft is None else Decimal(soft),
    )
    counter = Counter(tenant_id, agent_id, window, usd_to_micros(cap.hard_limit_usd))
    return BudgetPlan(counters=(counter,), caps=(cap,), amounts=Amounts(1))


def states(p: BudgetPlan, spent_usd: str, *, start: int = START) -> tuple[CounterState, ...]:
    spent = usd_to_micros(Decimal(spent_usd))
    return tuple(CounterState(c, Period(start, start + DAY), spent, 0) for c in p.counters)


def usd(amount: str) -> int:
    return usd_to_micros(Decimal(amount))


@contextlib.asynccontextmanager
async def running(a: Alerter) -> AsyncIterator[None]:
    """The delivery loop as the app runs it: a task cancelled at exit."""
    task = asyncio.create_task(a.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- observe: what is queued -------------------------------------------------------


async def test_observe_is_synchronous(session: aiohttp.ClientSession) -> None:
    assert not inspect.iscoroutinefunction(Alerter.observe)
    assert not inspect.iscoroutinefunction(Alerter.observe_rejection)
    a = alerter(session, "http://127.0.0.1:1/hook")
    p = plan()
    a.observe(p, states(p, "7.9"), usd("0.05"))
    assert a.pending == 0


async def test_repeated_observations_queue_each_crossing_once(
    session: aiohttp.ClientSession,
) -> None:
    a = alerter(session, "http://127.0.0.1:1/hook")
    p = plan("10", "9")
    a.observe(p, states(p, "7.9"), usd("0.05"))  # 79.5 %: nothing
    assert a.pending == 0
    for spent in ("7.95", "8.1", "8.5"):
        a.observe(p, states(p, spent), usd("0.05"))
    assert a.pending == 1
    a.observe(p, states(p, "8.95"), usd("0.05"))  # exactly the soft limit
    a.observe(p, states(p, "9.5"), usd("0.05"))
    assert a.pending == 2
    a.observe(p, states(p, "9.95"), usd("0.05"))  # exactly the hard limit
    a.observe(p, states(p, "12"), usd("1"))
    assert a.pending == 3


async def test_one_charge_past_every_threshold_queues_all_in_order(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    a = alerter(session, receiver.url)
    p = plan("10", "5")  # the soft limit comes before 80 %
    a.observe(p, states(p, "0"), usd("11"))
    await a.drain(WAIT_S)
    assert receiver.kinds == ["soft_limit", "budget_80_percent", "hard_limit"]
    assert [b["limit_usd"] for b in receiver.bodies] == ["5.000000", "10.000000", "10.000000"]
    assert a.sent == 3


async def test_empty_states_alert_nothing(session: aiohttp.ClientSession) -> None:
    a = alerter(session, "http://127.0.0.1:1/hook")
    p = plan()
    a.observe(p, (), usd("100"))  # admitted without the store: no counters to judge
    a.observe_rejection(p, ())
    assert a.pending == 0


# --- delivery ----------------------------------------------------------------------


async def test_one_alert_per_crossing_and_again_in_a_new_period(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    a = alerter(session, receiver.url)
    p = plan("10", "9")
    async with running(a):
        for spent in ("8", "8.2", "8.4", "8.6"):
            a.observe(p, states(p, spent), usd("0.1"))
        await receiver.wait_for(1)
        for spent in ("9", "9.1"):
            a.observe(p, states(p, spent), usd("0.1"))
        await receiver.wait_for(2)
        for spent in ("10", "11"):
            a.observe(p, states(p, spent), usd("0.1"))
            a.observe_rejection(p, states(p, spent))
        await receiver.wait_for(3)
        a.observe(p, states(p, "8", start=START + DAY), usd("0.1"))
        await receiver.wait_for(4)  # FIFO: a duplicate would have arrived before this one
    assert receiver.kinds == ["budget_80_percent", "soft_limit", "hard_limit", "budget_80_percent"]
    assert [b["period_start"] for b in receiver.bodies] == [START] * 3 + [START + DAY]
    assert [b["spend_usd"] for b in receiver.bodies] == [
        "8.100000",
        "9.100000",
        "10.100000",
        "8.100000",
    ]
    assert a.failed == a.dropped == a.skipped == 0


async def test_body_shape(session: aiohttp.ClientSession, receiver: Receiver) -> None:
    a = alerter(session, receiver.url, clock=lambda: START + 3661.5)
    p = plan("40", "30", tenant_id="acme", agent_id="planner:v2", window=Window.WEEKLY)
    a.observe(p, states(p, "29.999999"), usd("0.000001"))
    await a.drain(WAIT_S)
    assert receiver.bodies == [
        {
            "kind": "soft_limit",
            "tenant_id": "acme",
            "agent_id": "planner:v2",
            "window": "weekly",
            "period_start": START,
            "period_end": START + DAY,
            "spend_usd": "30.000000",
            "limit_usd": "30.000000",
            "at": "2024-05-15T01:01:01.500Z",
            "unit": "usd",
            "model_cap": None,
            "user_id": None,
            "used": None,
            "limit": None,
        }
    ]
    assert datetime.fromisoformat(receiver.bodies[0]["at"]).timestamp() == START + 3661.5
    headers = receiver.headers[0]
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == f"acme:a:planner:v2:weekly:{START}:soft_limit"
    fields = set(Alert.__dataclass_fields__)
    assert set(receiver.bodies[0]) == fields


async def test_tenant_wide_window_has_null_agent(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    a = alerter(session, receiver.url)
    p = plan("10")
    a.observe(p, states(p, "8"), 0)
    await a.drain(WAIT_S)
    assert receiver.bodies[0]["agent_id"] is None
    assert receiver.bodies[0]["limit_usd"] == "10.000000"
    assert receiver.headers[0]["Idempotency-Key"] == f"acme:t:daily:{START}:budget_80_percent"


async def test_rejection_alerts_hard_limit_on_spend_only(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    a = alerter(session, receiver.url)
    p = plan("10", "9")
    held = tuple(CounterState(s.counter, s.period, s.spent, usd("5")) for s in states(p, "9.5"))
    a.observe_rejection(p, held)  # refused because of holds: spend is below the limit
    assert a.pending == 0
    a.observe_rejection(p, states(p, "10"))
    a.observe_rejection(p, states(p, "10.5"))
    a.observe(p, states(p, "10.5"), usd("0.1"))  # 80 % and soft are new; hard was sent
    await a.drain(WAIT_S)
    assert receiver.kinds == ["hard_limit", "budget_80_percent", "soft_limit"]
    assert receiver.bodies[0]["spend_usd"] == "10.000000"


async def test_hanging_webhook_never_blocks_and_gives_up(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.hang = 10**6  # never answers
    a = alerter(session, receiver.url, retries=1)
    first, second = plan(tenant_id="one"), plan(tenant_id="two")
    async with running(a):
        a.observe(first, states(first, "9"), 0)
        await receiver.wait_for(1)
        for _ in range(100):  # while delivery hangs, observing stays a plain call
            a.observe(first, states(first, "9.5"), 0)
        a.observe(second, states(second, "9"), 0)
        await receiver.wait_for(3)  # 2 attempts (timeout, 1 retry), then the next alert
        assert a.failed == 1
        assert a.sent == 0
    assert [b["tenant_id"] for b in receiver.bodies] == ["one", "one", "two"]


async def test_server_error_is_retried_then_counted_failed(
    session: aiohttp.ClientSession, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500, 502, 503]
    a = alerter(session, receiver.url, retries=2)
    p = plan()
    a.observe(p, states(p, "8"), 0)
    with caplog.at_level(logging.WARNING, logger="capproxy.alerts"):
        await a.drain(WAIT_S)
    assert len(receiver.bodies) == 3
    assert (a.sent, a.failed) == (0, 1)
    assert "HTTP 503" in caplog.text
    assert TOKEN not in caplog.text and "/hook" not in caplog.text
    a.observe(p, states(p, "8.5"), 0)  # a failed crossing is not sent again
    assert a.pending == 0


async def test_transient_error_then_success(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses = [503]
    a = alerter(session, receiver.url, retries=1)
    p = plan()
    a.observe(p, states(p, "8"), 0)
    await a.drain(WAIT_S)
    assert len(receiver.bodies) == 2
    assert receiver.bodies[0] == receiver.bodies[1]
    assert receiver.headers[0]["Idempotency-Key"] == receiver.headers[1]["Idempotency-Key"]
    assert (a.sent, a.failed) == (1, 0)


async def test_client_error_status_is_not_retried(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses = [404]
    a = alerter(session, receiver.url, retries=3)
    p = plan()
    a.observe(p, states(p, "8"), 0)
    await a.drain(WAIT_S)
    assert len(receiver.bodies) == 1
    assert (a.sent, a.failed) == (0, 1)


async def test_unreachable_webhook_logs_no_url(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    urls = ["http://127.0.0.1:1/hook?token=" + TOKEN, "http://[bad/hook?token=" + TOKEN]
    for url in urls:
        a = alerter(session, url, retries=1)
        p = plan()
        a.observe(p, states(p, "8"), 0)
        with caplog.at_level(logging.DEBUG, logger="capproxy.alerts"):
            await a.drain(WAIT_S)
        assert (a.sent, a.failed) == (0, 1)
    assert caplog.records
    assert TOKEN not in caplog.text and "/hook" not in caplog.text


async def test_no_webhook_does_nothing(session: aiohttp.ClientSession) -> None:
    a = alerter(session, None)
    assert not a.enabled
    p = plan("10", "5")
    a.observe(p, states(p, "20"), usd("1"))
    a.observe_rejection(p, states(p, "20"))
    assert (a.pending, a.remembered) == (0, 0)
    async with asyncio.timeout(WAIT_S):
        await a.run()  # nothing to deliver: returns at once
        await a.drain(WAIT_S)
    assert a.sent == a.failed == a.dropped == 0


async def test_full_queue_drops_and_counts(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    a = alerter(session, receiver.url, max_queue=2)
    plans = [plan(tenant_id=f"t{i}") for i in range(4)]
    for p in plans:
        a.observe(p, states(p, "8"), 0)
    assert (a.pending, a.dropped) == (2, 2)
    await a.drain(WAIT_S)
    assert [b["tenant_id"] for b in receiver.bodies] == ["t0", "t1"]
    a.observe(plans[2], states(plans[2], "8.5"), 0)  # a dropped crossing may be queued again
    assert a.pending == 1


async def test_dedup_memory_forgets_ended_periods(session: aiohttp.ClientSession) -> None:
    now = [float(START + 100)]
    a = alerter(session, "http://127.0.0.1:1/hook", clock=lambda: now[0], grace_s=60)
    p = plan("10", "9")
    a.observe(p, states(p, "9.5"), 0)
    assert a.remembered == 2
    now[0] = START + DAY + 60  # the period ended, and its grace too
    a.observe(p, states(p, "1", start=START + DAY), 0)
    assert a.remembered == 0


async def test_period_long_over_is_not_alerted(session: aiohttp.ClientSession) -> None:
    a = alerter(session, "http://127.0.0.1:1/hook", clock=lambda: START + DAY + 60, grace_s=60)
    p = plan()
    a.observe(p, states(p, "9"), 0)  # a very late settle of yesterday's period
    assert (a.pending, a.remembered) == (0, 0)
    a.observe(p, states(p, "9", start=START + DAY), 0)
    assert (a.pending, a.remembered) == (1, 1)


async def test_drain_is_bounded(session: aiohttp.ClientSession, receiver: Receiver) -> None:
    receiver.hang = 10**6
    a = alerter(session, receiver.url, timeout_s=WAIT_S * 2, retries=0)
    p, q = plan(tenant_id="one"), plan(tenant_id="two")
    a.observe(p, states(p, "8"), 0)
    a.observe(q, states(q, "8"), 0)
    async with asyncio.timeout(WAIT_S):
        await a.drain(0.2)
    assert (a.pending, a.dropped, a.sent) == (0, 2, 0)


async def test_delivery_cancelled_midway_is_left_for_drain(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.hang = 1  # the first request hangs until the test ends
    a = alerter(session, receiver.url, timeout_s=WAIT_S * 2)
    p = plan()
    async with running(a):
        a.observe(p, states(p, "8"), 0)
        await receiver.wait_for(1)
    assert a.pending == 1
    await a.drain(WAIT_S)
    assert (a.pending, a.sent) == (0, 1)
    assert len(receiver.bodies) == 2


# --- dedup across replicas ---------------------------------------------------------


async def test_claim_sends_each_crossing_once_across_replicas(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    claimed: dict[str, int] = {}

    async def claim(key: str, ttl_s: int) -> bool:  # what Redis SET NX EX does
        if key in claimed:
            return False
        claimed[key] = ttl_s
        return True

    clock = float(START + DAY - 100)
    replicas = [
        alerter(session, receiver.url, claim=claim, grace_s=600, clock=lambda: clock)
        for _ in range(3)
    ]
    p = plan()
    for replica in replicas:
        replica.observe(p, states(p, "8"), 0)
    for replica in replicas:
        await replica.drain(WAIT_S)
    assert receiver.kinds == ["budget_80_percent"]
    assert claimed == {f"acme:t:daily:{START}:budget_80_percent": 700}
    assert [r.sent for r in replicas] == [1, 0, 0]
    assert [r.skipped for r in replicas] == [0, 1, 1]


async def test_claim_failure_sends_anyway(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    async def claim(key: str, ttl_s: int) -> bool:
        raise ConnectionError("store down")

    a = alerter(session, receiver.url, claim=claim)
    p = plan()
    a.observe(p, states(p, "8"), 0)
    await a.drain(WAIT_S)
    assert receiver.kinds == ["budget_80_percent"]
    assert (a.sent, a.skipped) == (1, 0)


def test_alert_body_is_json_of_its_fields() -> None:
    alert = Alert("hard_limit", "acme", None, "hourly", 0, 3600, "1.000000", "1.000000", "x")
    assert json.loads(alert.body()) == {
        "kind": "hard_limit",
        "tenant_id": "acme",
        "agent_id": None,
        "window": "hourly",
        "period_start": 0,
        "period_end": 3600,
        "spend_usd": "1.000000",
        "limit_usd": "1.000000",
        "at": "x",
        "unit": "usd",
        "model_cap": None,
        "user_id": None,
        "used": None,
        "limit": None,
    }


async def test_rate_caps_and_model_and_user_windows_alert_in_their_own_units(
    session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    a = alerter(session, receiver.url)
    tokens = Counter("acme", None, Window.DAILY, 1000, Unit.TOKENS, user_id="u1")
    money = Counter("acme", None, Window.DAILY, usd("20"), model_cap="frontier")
    p = BudgetPlan(
        counters=(tokens, money),
        caps=(
            RateCap(window=Window.DAILY, max_tokens=1000),
            BudgetCap(window=Window.DAILY, hard_limit_usd=Decimal(20)),
        ),
        amounts=Amounts(1, 1, 1),
    )
    period = Period(START, START + DAY)
    before = (CounterState(tokens, period, 700, 0), CounterState(money, period, usd("15"), 0))
    a.observe(p, before, Amounts(usd("2"), 150, 1))  # 850 tokens; $17 (85 %)
    await a.drain(WAIT_S)
    by_kind = {b["kind"]: b for b in receiver.bodies}
    assert set(by_kind) == {"rate_80_percent", "budget_80_percent"}
    rate = by_kind["rate_80_percent"]
    assert (rate["unit"], rate["user_id"], rate["used"], rate["limit"]) == (
        "tokens",
        "u1",
        850,
        1000,
    )
    assert rate["spend_usd"] is None and rate["limit_usd"] is None
    budget = by_kind["budget_80_percent"]
    assert (budget["unit"], budget["model_cap"], budget["spend_usd"]) == (
        "usd",
        "frontier",
        "17.000000",
    )
