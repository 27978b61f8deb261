"""One contract suite for both stores, plus Redis-specific layout, clock and fault tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo

import pytest
from redis.asyncio import Redis

from proxy import redis_store
from proxy.budget import BudgetPlan
from proxy.config import BudgetCap
from proxy.counters import (
    DEFAULT_EXPIRY_MARGIN_S,
    SEEN_READ_MAX,
    Amounts,
    Counter,
    CounterState,
    Limits,
    ReserveResult,
    Store,
    Unit,
)
from proxy.errors import StoreUnavailable
from proxy.history import DAYS_KEPT, HOURS_KEPT, Rejection, buckets
from proxy.ledger import Ledger
from proxy.memory_store import MemoryStore
from proxy.redis_store import RedisStore
from proxy.windows import Period, Window, period_of
from tests.harness import cluster_store, sentinel_store
from tests.redis_server import RedisServer
from tests.redis_topology import RedisCluster, SentinelSet

UTC = ZoneInfo("UTC")
T0 = 1_715_768_400.0  # 2024-05-15 10:20:00 UTC, mid-hour
TTL = 60


class RawRedis:
    """A minimal RESP client for looking at what the store wrote."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, url: str) -> RawRedis:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 6379)
        raw = cls(reader, writer)
        if parts.password:
            auth = [unquote(parts.username or "default"), unquote(parts.password)]
            await raw.call("AUTH", *auth)
        db = parts.path.strip("/")
        if db and db != "0":
            await raw.call("SELECT", db)
        return raw

    async def call(self, *args: str | int) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._writer.write(b"".join(out))
        await self._writer.drain()
        return await self._read()

    async def _read(self) -> Any:
        line = (await self._reader.readline())[:-2]
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise AssertionError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else (await self._reader.readexactly(size + 2))[:-2].decode()
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [await self._read() for _ in range(size)]
        raise AssertionError(f"unexpected reply {line!r}")

    async def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        cursor = "0"
        while True:
            cursor, batch = await self.call("SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 1000)
            found += batch
            if cursor == "0":
                return sorted(found)

    async def aclose(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    store: Store
    clock: FakeClock | None = None
    raw: RawRedis | None = None
    prefix: str = ""

    async def elapse(self, seconds: float) -> None:
        """Let time pass: instantly on the fake clock, for real on Redis's clock."""
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    async def run_past(self, moment: float) -> None:
        """Let the store clock pass ``moment`` (epoch s): set on the fake clock, polled on
        Redis's clock (its lease expiries are in whole milliseconds)."""
        if self.clock is not None:
            self.clock.now = max(self.clock.now, moment + 0.001)
            return
        while await self.store.now() <= moment + 0.001:
            await asyncio.sleep(0.01)


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock(T0)
        yield Harness(MemoryStore(clock=clock), clock=clock)
        return
    prefix: str = request.getfixturevalue("key_prefix")
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("cluster")
        store = cluster_store(cluster, prefix, timeout_s=2.0)
        # Open the connections the tests' bursts use, so that lease timings measure the
        # store and not a cold client's connection set-up.
        await asyncio.gather(*(store.snapshot([tenant(1)], tz=UTC) for _ in range(24)))
        yield Harness(store)
        await store.aclose()
        return
    if request.param == "sentinel":
        sentinels: SentinelSet = request.getfixturevalue("sentinels")
        store = sentinel_store(sentinels, prefix, timeout_s=2.0)
        yield Harness(store)
        await store.aclose()
        return
    url: str = request.getfixturevalue("redis_url")
    store = RedisStore.from_url(url, prefix=prefix, timeout_s=2.0)
    raw = await RawRedis.connect(url)
    try:
        yield Harness(store, raw=raw, prefix=prefix)
    finally:
        for key in await raw.keys(prefix):
            await raw.call("DEL", key)
        await raw.aclose()
        await store.aclose()


def tenant(limit: int, window: Window = Window.DAILY, tenant_id: str = "acme") -> Counter:
    return Counter(tenant_id, None, window, limit)


def agent(limit: int, agent_id: str = "bot-1", window: Window = Window.DAILY) -> Counter:
    return Counter("acme", agent_id, window, limit)


def amounts(states: tuple[CounterState, ...]) -> list[tuple[int, int]]:
    return [(s.spent, s.held) for s in states]


async def reserve(
    h: Harness, rid: str, counters: list[Counter], amount: int, *, ttl: float = TTL
) -> ReserveResult:
    return await h.store.reserve(rid, counters, amount, tz=UTC, hold_ttl_s=ttl)


def lease_end(result: ReserveResult) -> float:
    """When the holds in ``result`` end, unless renewed (the latest over its counters)."""
    ends = [s.holds_end for s in result.states]
    assert all(end is not None for end in ends)
    return max(end for end in ends if end is not None)


# --- contract, both stores -----------------------------------------------------------------


async def test_reserve_within_limit(harness: Harness) -> None:
    counters = [tenant(1000), agent(500, window=Window.HOURLY)]
    result = await reserve(harness, "r1", counters, 300)
    assert result.ok
    assert result.exceeded == ()
    assert amounts(result.states) == [(0, 300), (0, 300)]
    assert [s.counter for s in result.states] == counters
    for s in result.states:
        assert s.period == period_of(s.counter.window, result.now, UTC)
        assert s.room == s.counter.limit - 300
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 300), (0, 300)]


async def test_rejection_changes_no_counter(harness: Harness) -> None:
    counters = [tenant(1000), agent(500)]
    assert (await reserve(harness, "r1", counters, 400)).ok
    result = await reserve(harness, "r2", counters, 200)  # tenant fits, agent does not
    assert not result.ok
    assert amounts(result.states) == [(0, 400), (0, 400)]
    assert result.exceeded == (result.states[1],)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 400), (0, 400)]


async def test_exact_fill_is_allowed(harness: Harness) -> None:
    counters = [tenant(1000)]
    assert (await reserve(harness, "r1", counters, 600)).ok
    assert (await reserve(harness, "r2", counters, 400)).ok
    rejected = await reserve(harness, "r3", counters, 1)
    assert not rejected.ok
    assert rejected.exceeded == rejected.states
    assert (await reserve(harness, "r4", counters, 0)).ok


async def test_reserve_counts_spent(harness: Harness) -> None:
    counters = [tenant(1000)]
    await harness.store.record("r0", counters, 700, tz=UTC, hold_ttl_s=TTL)
    assert not (await reserve(harness, "r1", counters, 301)).ok
    assert (await reserve(harness, "r2", counters, 300)).ok


async def test_settle_replaces_hold_by_actual(harness: Harness) -> None:
    counters = [tenant(1000), agent(800)]
    result = await reserve(harness, "r1", counters, 500)
    await harness.store.settle("r1", result.states, 320, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(320, 0), (320, 0)]


async def test_settle_above_hold_counts_in_full(harness: Harness) -> None:
    counters = [tenant(1000)]
    result = await reserve(harness, "r1", counters, 100)
    await harness.store.settle("r1", result.states, 1200, hold_ttl_s=TTL)
    (state,) = await harness.store.snapshot(counters, tz=UTC)
    assert (state.spent, state.held, state.room) == (1200, 0, -200)
    assert not (await reserve(harness, "r2", counters, 0)).ok


async def test_settle_twice_counts_once(harness: Harness) -> None:
    counters = [tenant(1000)]
    result = await reserve(harness, "r1", counters, 500)
    await harness.store.settle("r1", result.states, 320, hold_ttl_s=TTL)
    await harness.store.settle("r1", result.states, 320, hold_ttl_s=TTL)
    await harness.store.settle("r1", result.states, 999, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(320, 0)]


async def test_settle_zero_releases(harness: Harness) -> None:
    counters = [tenant(1000)]
    result = await reserve(harness, "r1", counters, 1000)
    await harness.store.settle("r1", result.states, 0, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 0)]
    assert (await reserve(harness, "r2", counters, 1000)).ok


async def test_negative_actual_counts_as_zero(harness: Harness) -> None:
    counters = [tenant(1000)]
    result = await reserve(harness, "r1", counters, 500)
    await harness.store.settle("r1", result.states, -250, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 0)]


async def test_reserve_with_same_rid_holds_once(harness: Harness) -> None:
    counters = [tenant(1000)]
    first = await reserve(harness, "r1", counters, 600)
    again = await reserve(harness, "r1", counters, 600)  # e.g. a retry after a lost reply
    assert first.ok and again.ok
    assert amounts(again.states) == [(0, 600)]
    await harness.store.settle("r1", again.states, 100, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(100, 0)]


async def test_concurrent_reserves_never_overbook(harness: Harness) -> None:
    counters = [tenant(10 * 1_000), agent(10 * 1_000)]
    results = await asyncio.gather(*(reserve(harness, f"r{i}", counters, 1_000) for i in range(50)))
    assert sum(r.ok for r in results) == 10
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 10_000)] * 2


# --- leases --------------------------------------------------------------------------------

LEASE = 0.2  # short leases, so that Redis's own clock runs past them in a test


async def test_a_lease_not_renewed_is_charged_at_expiry(harness: Harness) -> None:
    counters = [tenant(1000), agent(1000)]
    first = await reserve(harness, "r1", counters, 400, ttl=LEASE)
    assert first.ok
    await harness.run_past(lease_end(first))
    # The upstream may have billed up to the hold: it is spent, not given back.
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(400, 0)] * 2
    assert not (await reserve(harness, "r2", counters, 601)).ok
    assert amounts((await reserve(harness, "r3", counters, 600)).states) == [(400, 600)] * 2


async def test_a_renewed_lease_outlives_several_leases(harness: Harness) -> None:
    counters = [tenant(1000), agent(1000)]
    lease = 0.5
    result = await reserve(harness, "r1", counters, 300, ttl=lease)
    first_end = end = lease_end(result)
    while end < first_end + 2 * lease + 0.3:
        await harness.run_past(end - 0.3)  # renew with time to spare
        assert await harness.store.renew("r1", result.states, hold_ttl_s=lease)
        states = await harness.store.snapshot(counters, tz=UTC)
        assert amounts(states) == [(0, 300)] * 2
        assert all(s.holds_end is not None and s.holds_end > end for s in states)
        end = min(s.holds_end or 0 for s in states)
    await harness.run_past(first_end + 2 * lease)  # three first leases later
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 300)] * 2
    await harness.store.settle("r1", result.states, 120, hold_ttl_s=lease)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(120, 0)] * 2


@pytest.mark.parametrize("actual", [0, 250, 1000, 1200])
@pytest.mark.parametrize("charged_by", ["reserve", "renew", "nothing"])
async def test_a_late_settle_replaces_the_expiry_charge_once(
    harness: Harness, actual: int, charged_by: str
) -> None:
    # The proxy was alive but stalled past its lease: its settle brings the actual cost,
    # whether or not the expired hold was charged before the settle arrived.
    counters = [tenant(1000), agent(1000)]
    short = await reserve(harness, "r1", counters, 1000, ttl=LEASE)
    await harness.run_past(lease_end(short))
    if charged_by == "reserve":
        rejected = await reserve(harness, "r2", counters, 1)
        assert not rejected.ok and amounts(rejected.states) == [(1000, 0)] * 2
    elif charged_by == "renew":
        assert not await harness.store.renew("r1", short.states, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(1000, 0)] * 2
    for _ in range(2):  # a replayed settle changes nothing
        await harness.store.settle("r1", short.states, actual, hold_ttl_s=TTL)
        assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(actual, 0)] * 2
    if actual == 0:
        return  # a release writes no marker (it leaves no key): nothing settles it again
    await harness.store.settle("r1", short.states, 999, hold_ttl_s=TTL)
    await harness.store.record("r1", counters, 999, tz=UTC, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(actual, 0)] * 2


async def test_a_late_settle_after_expiry_leaves_other_holds_alone(harness: Harness) -> None:
    counters = [tenant(1000), agent(1000)]
    short = await reserve(harness, "r1", counters, 1000, ttl=LEASE)
    await harness.run_past(lease_end(short))
    assert not (await reserve(harness, "r2", counters, 600)).ok  # the charge fills the cap
    await harness.store.settle("r1", short.states, 250, hold_ttl_s=TTL)
    third = await reserve(harness, "r3", counters, 600)
    assert third.ok and amounts(third.states) == [(250, 600)] * 2
    await harness.store.settle("r3", third.states, 100, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(350, 0)] * 2


async def test_a_release_by_record_refunds_an_expired_lease(harness: Harness) -> None:
    # A reserve whose reply was lost is released by rid (the request never went out),
    # possibly only after its lease ran out and it was charged.
    counters = [tenant(1000), agent(1000)]
    lost = await reserve(harness, "r1", counters, 400, ttl=LEASE)
    await harness.run_past(lease_end(lost))
    assert not (await reserve(harness, "r2", counters, 601)).ok
    await harness.store.record("r1", counters, 0, tz=UTC, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 0)] * 2
    await harness.store.record("r1", counters, 0, tz=UTC, hold_ttl_s=TTL)
    assert (await reserve(harness, "r3", counters, 1000)).ok


async def test_renew_of_a_settled_rid_returns_false_and_holds_nothing(harness: Harness) -> None:
    counters = [tenant(1000), agent(1000)]
    result = await reserve(harness, "r1", counters, 300)
    await harness.store.settle("r1", result.states, 200, hold_ttl_s=TTL)
    assert not await harness.store.renew("r1", result.states, hold_ttl_s=TTL)
    assert not await harness.store.renew("never-reserved", result.states, hold_ttl_s=TTL)
    states = await harness.store.snapshot(counters, tz=UTC)
    assert amounts(states) == [(200, 0)] * 2
    assert [s.holds_end for s in states] == [None, None]


async def test_renew_of_an_expired_lease_returns_false_and_charges_it(harness: Harness) -> None:
    counters = [tenant(1000), agent(1000)]
    short = await reserve(harness, "r1", counters, 300, ttl=LEASE)
    await harness.run_past(lease_end(short))
    assert not await harness.store.renew("r1", short.states, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(300, 0)] * 2
    assert not await harness.store.renew("r1", short.states, hold_ttl_s=TTL)  # gone for good


async def test_a_rid_whose_lease_ran_out_cannot_hold_again(harness: Harness) -> None:
    # A retried reserve arriving after its lease ran out must not hold a second time.
    counters = [tenant(1000), agent(1000)]
    short = await reserve(harness, "r1", counters, 300, ttl=LEASE)
    await harness.run_past(lease_end(short))
    again = await reserve(harness, "r1", counters, 300)
    assert not again.ok
    assert amounts(again.states) == [(300, 0)] * 2
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(300, 0)] * 2


async def test_states_report_when_the_holds_end(harness: Harness) -> None:
    counters = [tenant(1000), agent(1000)]
    empty = await harness.store.snapshot(counters, tz=UTC)
    assert [s.holds_end for s in empty] == [None, None]
    r1 = await reserve(harness, "r1", counters, 400, ttl=60)
    assert [s.holds_end for s in r1.states] == [pytest.approx(r1.now + 60, abs=0.002)] * 2
    r2 = await reserve(harness, "r2", counters[:1], 400, ttl=120)
    assert r2.states[0].holds_end == pytest.approx(r2.now + 120, abs=0.002)
    # A 429 says when the holds in its way end at the latest: the basis of Retry-After.
    refused = await reserve(harness, "r3", counters, 300)
    assert not refused.ok and refused.exceeded == (refused.states[0],)
    assert [s.holds_end for s in refused.states] == [
        pytest.approx(r2.now + 120, abs=0.002),
        pytest.approx(r1.now + 60, abs=0.002),
    ]
    await harness.store.settle("r2", r2.states, 0, hold_ttl_s=TTL)
    ends = [s.holds_end for s in await harness.store.snapshot(counters, tz=UTC)]
    assert ends == [pytest.approx(r1.now + 60, abs=0.002)] * 2
    assert await harness.store.renew("r1", r1.states, hold_ttl_s=90)
    now = await harness.store.now()
    ends = [s.holds_end for s in await harness.store.snapshot(counters, tz=UTC)]
    assert ends == [pytest.approx(now + 90, abs=0.1)] * 2
    await harness.store.settle("r1", r1.states, 0, hold_ttl_s=TTL)
    ends = [s.holds_end for s in await harness.store.snapshot(counters, tz=UTC)]
    assert ends == [None, None]


async def test_a_dead_proxys_holds_end_charged_one_lease_later(harness: Harness) -> None:
    # kill -9 with 20 requests in flight: no renewals and no settles ever come. Their holds
    # block others for one lease at most, and then count as spent: the upstream received
    # and may have billed all 20. At no moment is room given back without spend recorded.
    counters = [tenant(2500), agent(2500)]
    results = await asyncio.gather(
        *(reserve(harness, f"dead-{i}", counters, 100, ttl=LEASE) for i in range(20))
    )
    assert all(r.ok for r in results)
    end = max(lease_end(r) for r in results)
    refused = await reserve(harness, "next", counters, 600)
    assert not refused.ok
    assert amounts(refused.states) == [(0, 2000)] * 2
    assert [s.holds_end for s in refused.states] == [pytest.approx(end, abs=0.002)] * 2
    while await harness.store.now() <= end + 0.001:
        states = await harness.store.snapshot(counters, tz=UTC)
        assert [s.spent + s.held for s in states] == [2000, 2000]
        await harness.elapse(0.02)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(2000, 0)] * 2
    refused = await reserve(harness, "next", counters, 501)
    assert not refused.ok and amounts(refused.states) == [(2000, 0)] * 2
    assert [s.holds_end for s in refused.states] == [None, None]
    assert (await reserve(harness, "fits", counters, 500)).ok
    # A stalled (not dead) proxy's settles still land later, each once, at the actual cost.
    for i, r in enumerate(results[:5]):
        await harness.store.settle(f"dead-{i}", r.states, 40, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(1700, 500)] * 2


async def test_record_adds_spend_once(harness: Harness) -> None:
    counters = [tenant(1000), agent(1000, window=Window.MONTHLY)]
    await harness.store.record("r1", counters, 250, tz=UTC, hold_ttl_s=TTL)
    await harness.store.record("r1", counters, 250, tz=UTC, hold_ttl_s=TTL)
    await harness.store.record("r2", counters, -5, tz=UTC, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(250, 0)] * 2


async def test_reserve_after_its_rid_was_released_holds_nothing(harness: Harness) -> None:
    # A reserve whose reply was lost (timeout) is released by rid; if the reserve itself
    # reaches the store only after that, it must not leave a hold behind.
    counters = [tenant(1000), agent(1000)]
    await harness.store.record("r1", counters, 0, tz=UTC, hold_ttl_s=TTL)
    result = await reserve(harness, "r1", counters, 300)
    assert not result.ok
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 0)] * 2


async def test_record_removes_the_hold_of_its_rid(harness: Harness) -> None:
    counters = [tenant(1000)]
    assert (await reserve(harness, "r1", counters, 300)).ok
    await harness.store.record("r1", counters, 0, tz=UTC, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 0)]


async def test_settle_uses_the_periods_it_is_given(harness: Harness) -> None:
    counters = [tenant(1000, window=Window.HOURLY)]
    result = await reserve(harness, "r1", counters, 500)
    (state,) = result.states
    previous = Period(state.period.start - 3600, state.period.start)
    late = CounterState(state.counter, previous, 0, 0)
    await harness.store.record("r0", counters, 1, tz=UTC, hold_ttl_s=TTL)
    await harness.store.settle("r2", [late], 700, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(1, 500)]


async def test_scopes_are_isolated(harness: Harness) -> None:
    whole = tenant(1000)
    bot1, bot2 = agent(1000, "bot-1"), agent(1000, "bot-2")
    other = tenant(1000, tenant_id="globex")
    result = await reserve(harness, "r1", [bot1], 400)
    await harness.store.settle("r1", result.states, 400, hold_ttl_s=TTL)
    assert (await reserve(harness, "r2", [whole], 900)).ok
    assert (await reserve(harness, "r3", [other], 950)).ok
    snapshot = await harness.store.snapshot([whole, bot1, bot2], tz=UTC)
    assert amounts(snapshot) == [(0, 900), (400, 0), (0, 0)]
    assert amounts(await harness.store.snapshot([other], tz=UTC)) == [(0, 950)]


async def test_windows_of_one_scope_are_isolated(harness: Harness) -> None:
    hourly, daily = tenant(1000, Window.HOURLY), tenant(5000, Window.DAILY)
    result = await reserve(harness, "r1", [hourly, daily], 800)
    await harness.store.settle("r1", result.states, 800, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot([daily, hourly], tz=UTC)) == [(800, 0)] * 2
    assert (await reserve(harness, "r2", [daily], 4200)).ok


@pytest.mark.parametrize(
    "counters",
    [
        [Counter("bad tenant", None, Window.DAILY, 10)],
        [Counter("{acme}", None, Window.DAILY, 10)],
        [Counter("acme", "bot 1", Window.DAILY, 10)],
        [tenant(10), tenant(10, tenant_id="globex")],
        [tenant(10), tenant(20)],
        [tenant(-1)],
        [],
    ],
)
async def test_invalid_counters_are_refused(harness: Harness, counters: list[Counter]) -> None:
    with pytest.raises(ValueError):
        await reserve(harness, "r1", counters, 1)


async def test_invalid_amount_and_rid_are_refused(harness: Harness) -> None:
    with pytest.raises(ValueError):
        await reserve(harness, "r1", [tenant(10)], -1)
    with pytest.raises(ValueError):
        await reserve(harness, "r 1", [tenant(10)], 1)
    with pytest.raises(ValueError):
        await harness.store.reserve("r1", [tenant(10)], 1, tz=UTC, hold_ttl_s=0)


async def test_large_amounts_stay_exact(harness: Harness) -> None:
    big = 4 * 10**15  # $4 billion: exact, and printed in full (not as 4e+15) by the script
    counters = [tenant(big), agent(big)]
    result = await reserve(harness, "r1", counters, big - 1)
    assert result.ok and amounts(result.states) == [(0, big - 1)] * 2
    assert not (await reserve(harness, "r2", counters, 2)).ok
    await harness.store.settle("r1", result.states, big - 7, hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(big - 7, 0)] * 2
    assert not (await reserve(harness, "r3", counters, 8)).ok
    assert (await reserve(harness, "r4", counters, 7)).ok
    with pytest.raises(ValueError):
        await reserve(harness, "r5", counters, 2**53 + 1)


async def test_now_follows_the_store_clock(harness: Harness) -> None:
    now = await harness.store.now()
    if harness.clock is not None:
        assert now == T0
    else:
        assert abs(now - time.time()) < 5
    await harness.store.ping()


# --- memory store ----------------------------------------------------------------------------


async def test_memory_spend_stays_in_its_period() -> None:
    clock = FakeClock(T0)
    store = MemoryStore(clock=clock)
    hourly, daily = tenant(1000, Window.HOURLY), tenant(5000, Window.DAILY)
    result = await store.reserve("r1", [hourly, daily], 900, tz=UTC, hold_ttl_s=TTL)
    await store.settle("r1", result.states, 900, hold_ttl_s=TTL)
    clock.now += 3600
    assert amounts(await store.snapshot([hourly, daily], tz=UTC)) == [(0, 0), (900, 0)]
    assert (await store.reserve("r2", [hourly], 1000, tz=UTC, hold_ttl_s=TTL)).ok


async def test_memory_periods_follow_the_time_zone() -> None:
    clock = FakeClock(T0)  # 15:50 in Kolkata
    store = MemoryStore(clock=clock)
    counters = [tenant(1000, Window.DAILY)]
    kolkata = ZoneInfo("Asia/Kolkata")
    await store.record("r1", counters, 100, tz=kolkata, hold_ttl_s=TTL)
    clock.now += 8 * 3600 + 10 * 60  # 00:00 in Kolkata, 18:30 UTC
    assert amounts(await store.snapshot(counters, tz=kolkata)) == [(0, 0)]
    assert amounts(await store.snapshot(counters, tz=UTC)) == [(0, 0)]
    clock.now -= 1
    assert amounts(await store.snapshot(counters, tz=kolkata)) == [(100, 0)]


async def test_memory_prunes_ended_periods() -> None:
    clock = FakeClock(T0)
    store = MemoryStore(clock=clock)
    for i in range(100):
        await store.record(f"r{i}", [tenant(10, Window.HOURLY, f"t{i}")], 1, tz=UTC, hold_ttl_s=1)
    clock.now += 2 * 3600
    await store.record("late", [tenant(10, Window.HOURLY)], 1, tz=UTC, hold_ttl_s=1)
    assert len(store._buckets) == 1
    assert list(store._settled) == [("acme", "late")]


async def test_memory_drops_unsettled_charges_with_their_period() -> None:
    clock = FakeClock(T0)
    store = MemoryStore(clock=clock)
    counters = [tenant(1000, Window.HOURLY)]
    short = await store.reserve("r1", counters, 300, tz=UTC, hold_ttl_s=1)
    clock.now += 2
    assert amounts(await store.snapshot(counters, tz=UTC)) == [(300, 0)]
    (bucket,) = store._buckets.values()
    assert bucket.charged == {"r1": 300}
    clock.now = short.states[0].period.end + 1 + DEFAULT_EXPIRY_MARGIN_S
    await store.record("late", [tenant(10, Window.HOURLY, "other")], 1, tz=UTC, hold_ttl_s=1)
    assert bucket not in store._buckets.values()


# --- Redis store -----------------------------------------------------------------------------

COUNTER_KEY = re.compile(
    r"(?P<prefix>[^:{}]+):\{(?P<tenant>[A-Za-z0-9._-]+)\}:"
    r"(?:t|a:(?P<agent>[A-Za-z0-9._:@/-]+)):(?P<window>hourly|daily|weekly|monthly):"
    r"(?P<start>\d+)(?P<holds>:holds)?"
)
SETTLED_KEY = re.compile(r"(?P<prefix>[^:{}]+):\{(?P<tenant>[A-Za-z0-9._-]+)\}:settled:(?P<rid>.+)")
TENANT_KEY = re.compile(
    r"(?P<prefix>[^:{}]+):\{(?P<tenant>[A-Za-z0-9._-]+)\}:"
    r"(?:epoch|agents:\d+|spend:(?:hour|day)|rejections)"
)


async def hgetall(raw: RawRedis, key: str) -> dict[str, str]:
    flat = await raw.call("HGETALL", key)
    return dict(zip(flat[::2], flat[1::2], strict=True))


@pytest.fixture
async def redis_harness(redis_url: str, key_prefix: str) -> AsyncIterator[Harness]:
    store = RedisStore.from_url(redis_url, prefix=key_prefix, timeout_s=2.0)
    raw = await RawRedis.connect(redis_url)
    try:
        yield Harness(store, raw=raw, prefix=key_prefix)
    finally:
        for key in await raw.keys(key_prefix):
            await raw.call("DEL", key)
        await raw.aclose()
        await store.aclose()


async def test_redis_key_layout_and_expiry(redis_harness: Harness) -> None:
    h = redis_harness
    assert isinstance(h.store, RedisStore) and h.raw is not None
    counters = [tenant(1000, Window.HOURLY), agent(1000, "team/bot@x:1", Window.MONTHLY)]
    result = await reserve(h, "req-1", counters, 100)
    p_hour, p_month = (s.period for s in result.states)
    hour_key = f"{h.prefix}:{{acme}}:t:hourly:{p_hour.start}"
    month_key = f"{h.prefix}:{{acme}}:a:team/bot@x:1:monthly:{p_month.start}"
    agents_key = f"{h.prefix}:{{acme}}:agents:{int(result.now // 86400)}"
    assert await h.raw.keys(h.prefix) == sorted(
        [hour_key, hour_key + ":holds", month_key, month_key + ":holds", agents_key]
    )
    assert await h.raw.call("SMEMBERS", agents_key) == ["team/bot@x:1"]
    assert await hgetall(h.raw, hour_key) == {"held": "100", "h:req-1": "100"}
    now_ms = int(result.now * 1000)
    expiry = int(await h.raw.call("ZSCORE", hour_key + ":holds", "req-1"))
    assert abs(expiry - (now_ms + TTL * 1000)) < 1000
    for key, period in [(hour_key, p_hour), (month_key, p_month)]:
        for k in (key, key + ":holds"):
            expected = period.end * 1000 + (TTL + DEFAULT_EXPIRY_MARGIN_S) * 1000 - now_ms
            pttl = await h.raw.call("PTTL", k)
            assert 0 < pttl <= expected and expected - pttl < 5000

    await h.store.settle("req-1", result.states, 40, hold_ttl_s=TTL)
    settled_key = f"{h.prefix}:{{acme}}:settled:req-1"
    epoch_key = f"{h.prefix}:{{acme}}:epoch"
    tenants_key = f"{h.prefix}:{{store}}:tenants"  # tenants that recorded spend
    spend_keys = [f"{h.prefix}:{{acme}}:spend:hour", f"{h.prefix}:{{acme}}:spend:day"]
    assert await h.raw.keys(h.prefix) == sorted(
        [hour_key, month_key, settled_key, epoch_key, agents_key, tenants_key, *spend_keys]
    )
    hour, day = buckets(result.now, UTC)
    assert await hgetall(h.raw, spend_keys[0]) == {str(hour): "40"}
    assert await hgetall(h.raw, spend_keys[1]) == {str(day): "40"}
    for key, kept_s in zip(spend_keys, [HOURS_KEPT * 3600, DAYS_KEPT * 86400], strict=True):
        assert kept_s * 1000 < await h.raw.call("PTTL", key) <= (kept_s + 86400) * 1000
    assert await h.raw.call("SMEMBERS", tenants_key) == ["acme"]
    assert await h.raw.call("PTTL", epoch_key) == -1  # kept: its absence means a loss
    assert 0 < await h.raw.call("PTTL", settled_key) <= 2 * TTL * 1000
    assert await h.raw.call("PTTL", hour_key) > 0
    assert await hgetall(h.raw, hour_key) == {"held": "0", "spent": "40"}


async def test_redis_expiry_charge_lives_in_the_counter_until_settled(
    redis_harness: Harness,
) -> None:
    h = redis_harness
    assert isinstance(h.store, RedisStore) and h.raw is not None
    counters = [tenant(1000, Window.HOURLY)]
    short = await reserve(h, "req-1", counters, 300, ttl=LEASE)
    key = h.store.counter_key(counters[0], short.states[0].period)
    await h.run_past(lease_end(short))
    assert (await reserve(h, "req-2", counters, 100)).ok  # finds req-1's lease over
    assert await hgetall(h.raw, key) == {
        "spent": "300",
        "held": "100",
        "x:req-1": "300",
        "h:req-2": "100",
    }
    assert await h.raw.call("ZRANGE", key + ":holds", 0, -1) == ["req-2"]
    await h.store.settle("req-1", short.states, 120, hold_ttl_s=TTL)
    assert await hgetall(h.raw, key) == {"spent": "120", "held": "100", "h:req-2": "100"}
    assert await h.raw.call("PTTL", key) > 0  # an unsettled charge expires with its counter


async def test_redis_reserve_renew_and_settle_are_one_script_call_each(
    redis_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = redis_harness
    assert isinstance(h.store, RedisStore)
    store = h.store
    scripts: list[Any] = []
    run = store._run

    async def counted(script: Any, packed: bytes, slot_key: str) -> Any:
        scripts.append(script)
        return await run(script, packed, slot_key)

    counters = [tenant(1000, Window.HOURLY), agent(1000, window=Window.DAILY)]
    # A tenant that never spent has no epoch: its reserve also asks whether it is new
    # or lost, until its first spend gives it one.
    first = await reserve(h, "r0", counters, 10)
    await store.settle("r0", first.states, 1, hold_ttl_s=TTL)
    await store.now()  # learn Redis's clock first, so no call is a skew retry
    monkeypatch.setattr(store, "_run", counted)
    result = await reserve(h, "r1", counters, 10)
    assert await store.renew("r1", result.states, hold_ttl_s=TTL)
    await store.settle("r1", result.states, 5, hold_ttl_s=TTL)
    assert scripts == [store._reserve, store._renew, store._commit]


async def test_redis_keys_hold_only_ids(redis_harness: Harness) -> None:
    h = redis_harness
    assert h.raw is not None
    secret = "sk-live-1234567890abcdef"
    counters = [tenant(1000), agent(1000, "agent.7")]
    result = await reserve(h, "rid-9", counters, 10)
    await h.store.settle("rid-9", result.states, 10, hold_ttl_s=TTL)
    await h.store.record("rid-10", counters, 10, tz=UTC, hold_ttl_s=TTL)
    await h.store.note_rejection("acme", rejection(1, "agent.7"))
    keys = [k for k in await h.raw.keys(h.prefix) if ":{store}:" not in k]
    # 2 counters, 2 settled markers, the epoch, the day's agents, the history, rejections.
    assert len(keys) == 9
    for key in keys:
        assert secret not in key
        match = (
            COUNTER_KEY.fullmatch(key) or SETTLED_KEY.fullmatch(key) or TENANT_KEY.fullmatch(key)
        )
        assert match is not None, key
        assert match["prefix"] == h.prefix and match["tenant"] == "acme"
        if not key.endswith(":epoch"):
            assert await h.raw.call("PTTL", key) > 0, key


async def test_redis_corrects_a_skewed_local_clock(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = RedisStore.from_url(redis_url, prefix=key_prefix, timeout_s=2.0)
    store = RedisStore(
        owner.client,
        prefix=key_prefix,
        timeout_s=2.0,
        local_clock=lambda: time.time() + 7200,
    )
    calls = 0
    run = store._run

    async def counted(script: Any, packed: bytes, slot_key: str) -> Any:
        nonlocal calls
        calls += script is store._reserve
        return await run(script, packed, slot_key)

    monkeypatch.setattr(store, "_run", counted)
    counters = [tenant(1000, Window.HOURLY)]
    first = await store.reserve("r1", counters, 10, tz=UTC, hold_ttl_s=TTL)
    assert first.ok and calls == 2  # skew, then the retry with Redis's time
    assert abs(first.now - time.time()) < 5
    assert first.states[0].period == period_of(Window.HOURLY, first.now, UTC)
    second = await store.reserve("r2", counters, 10, tz=UTC, hold_ttl_s=TTL)
    assert second.ok and calls == 3  # the learned offset makes one round trip enough
    assert amounts(second.states) == [(0, 20)]
    await store.record("r3", counters, 5, tz=UTC, hold_ttl_s=TTL)
    assert amounts(await store.snapshot(counters, tz=UTC)) == [(5, 20)]
    await store.aclose()  # borrowed client: still open for its owner
    await owner.ping()
    await owner.aclose()


async def test_redis_snapshot_sums_many_live_holds(redis_harness: Harness) -> None:
    h = redis_harness
    assert isinstance(h.store, RedisStore) and h.raw is not None
    counter = tenant(10**9, Window.MONTHLY)
    (state,) = await h.store.snapshot([counter], tz=UTC)
    key = h.store.counter_key(counter, state.period)
    later_ms = int((time.time() + 3600) * 1000)
    rids = [f"r{i}" for i in range(10_000)]
    await h.raw.call("HSET", key, "held", 20_000, *(x for r in rids for x in (f"h:{r}", 2)))
    await h.raw.call("ZADD", key + ":holds", *(x for r in rids for x in (later_ms, r)))
    await h.raw.call("PEXPIRE", key, 60_000)
    await h.raw.call("PEXPIRE", key + ":holds", 60_000)
    assert amounts(await h.store.snapshot([counter], tz=UTC)) == [(0, 20_000)]


async def test_redis_replaces_a_lost_script_cache(redis_harness: Harness) -> None:
    h = redis_harness
    assert h.raw is not None
    counters = [tenant(1000)]
    assert (await reserve(h, "r1", counters, 10)).ok
    assert await h.raw.call("SCRIPT", "FLUSH") == "OK"
    assert (await reserve(h, "r2", counters, 10)).ok
    assert amounts(await h.store.snapshot(counters, tz=UTC)) == [(0, 20)]


# --- Redis faults ------------------------------------------------------------------------------

TIMEOUT_S = 0.5


async def assert_unavailable_in_time(call: Callable[[], Awaitable[object]]) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await call()
    assert time.monotonic() - started < TIMEOUT_S + 0.5
    assert info.value.__cause__ is not None


async def test_redis_down_then_back(redis_server: RedisServer, key_prefix: str) -> None:
    store = RedisStore.from_url(redis_server.url, prefix=key_prefix, timeout_s=TIMEOUT_S)
    counters = [tenant(1000)]
    first = await store.reserve("r1", counters, 100, tz=UTC, hold_ttl_s=TTL)
    assert first.ok
    redis_server.stop()
    await assert_unavailable_in_time(
        lambda: store.reserve("r2", counters, 100, tz=UTC, hold_ttl_s=TTL)
    )
    await assert_unavailable_in_time(lambda: store.settle("r1", first.states, 1, hold_ttl_s=TTL))
    await assert_unavailable_in_time(lambda: store.record("r3", counters, 1, tz=UTC, hold_ttl_s=1))
    await assert_unavailable_in_time(lambda: store.snapshot(counters, tz=UTC))
    await assert_unavailable_in_time(store.now)
    await assert_unavailable_in_time(store.ping)
    redis_server.start()  # empty: no data, no cached scripts
    again = await store.reserve("r4", counters, 100, tz=UTC, hold_ttl_s=TTL)
    assert again.ok and amounts(again.states) == [(0, 100)]
    await store.ping()
    await store.aclose()


async def test_redis_hung_answers_within_timeout(
    redis_server: RedisServer, key_prefix: str
) -> None:
    store = RedisStore.from_url(redis_server.url, prefix=key_prefix, timeout_s=TIMEOUT_S)
    counters = [tenant(1000)]
    assert (await store.reserve("r1", counters, 100, tz=UTC, hold_ttl_s=TTL)).ok
    proc = redis_server._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        await assert_unavailable_in_time(
            lambda: store.reserve("r2", counters, 100, tz=UTC, hold_ttl_s=TTL)
        )
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert (await store.reserve("r3", counters, 100, tz=UTC, hold_ttl_s=TTL)).ok
    await store.aclose()


async def test_redis_unreachable_from_the_start(key_prefix: str) -> None:
    from tests.redis_server import free_port

    store = RedisStore.from_url(
        f"redis://127.0.0.1:{free_port()}/0", prefix=key_prefix, timeout_s=TIMEOUT_S
    )
    await assert_unavailable_in_time(
        lambda: store.reserve("r1", [tenant(10)], 1, tz=UTC, hold_ttl_s=TTL)
    )
    await store.aclose()


async def test_claim_is_won_once_per_ttl(harness: Harness) -> None:
    name = f"alert:{uuid.uuid4().hex}"
    results = await asyncio.gather(*(harness.store.claim(name, 60) for _ in range(10)))
    assert sorted(results) == [False] * 9 + [True]
    assert await harness.store.claim(name + ":other", 60)


# --- bounded keys ----------------------------------------------------------------------


async def test_a_tenant_names_at_most_max_agents_a_day(harness: Harness) -> None:
    def crowd(name: str) -> list[Counter]:
        return [tenant(10_000), agent(1000, name)]

    held = []
    for name in ("a1", "a2"):
        result = await harness.store.reserve(
            f"r-{name}", crowd(name), 10, tz=UTC, hold_ttl_s=TTL, limits=Limits(max_agents=2)
        )
        assert result.ok
        held.append(result)
    third = await harness.store.reserve(
        "r-a3", crowd("a3"), 10, tz=UTC, hold_ttl_s=TTL, limits=Limits(max_agents=2)
    )
    assert not third.ok and third.too_many_agents
    assert third.exceeded == ()
    # An agent already counted today still gets in.
    again = await harness.store.reserve(
        "r-a1b", crowd("a1"), 10, tz=UTC, hold_ttl_s=TTL, limits=Limits(max_agents=2)
    )
    assert again.ok
    # An agent whose requests all cost nothing leaves the count.
    await harness.store.settle("r-a2", held[1].states, 0, hold_ttl_s=TTL)
    late = await harness.store.reserve(
        "r-a3b", crowd("a3"), 10, tz=UTC, hold_ttl_s=TTL, limits=Limits(max_agents=2)
    )
    assert late.ok


async def test_released_reservations_leave_no_redis_key(redis_harness: Harness) -> None:
    h = redis_harness
    assert h.raw is not None
    # Invented tenants and agents, each reserving, then released (the upstream refused).
    for i in range(300):
        counters = [
            Counter(f"junk-{i}", None, Window.DAILY, 10_000),
            Counter(f"junk-{i}", f"agent-{i}", Window.HOURLY, 1000),
        ]
        result = await reserve(h, f"r{i}", counters, 50)
        assert result.ok
        await h.store.settle(f"r{i}", result.states, 0, hold_ttl_s=TTL)
    assert await h.raw.keys(h.prefix) == []


async def test_a_counter_settled_back_to_zero_is_deleted(redis_harness: Harness) -> None:
    h = redis_harness
    assert h.raw is not None
    counters = [tenant(1000), agent(1000)]
    kept = await reserve(h, "r1", counters, 100)
    gone = await reserve(h, "r2", counters, 100)
    await h.store.settle("r2", gone.states, 0, hold_ttl_s=TTL)
    assert len(await h.raw.keys(h.prefix)) == 5  # r1 still holds: 2 counters, 2 zsets, agents
    await h.store.settle("r1", kept.states, 0, hold_ttl_s=TTL)
    assert await h.raw.keys(h.prefix) == []


# --- requests in flight ------------------------------------------------------------------


async def test_requests_in_flight_are_limited_per_tenant_and_per_agent(harness: Harness) -> None:
    async def hold(rid: str, agent_id: str, limits: tuple[int | None, int | None]) -> ReserveResult:
        counters = [tenant(10_000), agent(10_000, agent_id)]
        return await harness.store.reserve(
            rid, counters, 10, tz=UTC, hold_ttl_s=TTL, limits=Limits(max_concurrent=limits)
        )

    first = await hold("r1", "a1", (3, 2))
    assert first.ok and (await hold("r2", "a1", (3, 2))).ok
    busy = await hold("r3", "a1", (3, 2))
    assert not busy.ok and busy.concurrency_limited == "agent" and busy.exceeded == ()
    assert (await hold("r4", "a2", (3, 2))).ok  # another agent: the tenant has room for one
    busy = await hold("r5", "a3", (3, 2))
    assert not busy.ok and busy.concurrency_limited == "tenant"
    # A settle frees its slot; a refused request held nothing.
    await harness.store.settle("r1", first.states, 5, hold_ttl_s=TTL)
    assert (await hold("r6", "a1", (3, 2))).ok
    assert (await hold("r7", "a4", (None, None))).ok  # no limits: not counted


async def test_a_dead_proxys_requests_leave_the_flight_with_their_leases(harness: Harness) -> None:
    counters = [tenant(10_000)]
    short = await harness.store.reserve(
        "r1", counters, 10, tz=UTC, hold_ttl_s=LEASE, limits=Limits(max_concurrent=(1, None))
    )
    assert short.ok
    busy = await harness.store.reserve(
        "r2", counters, 10, tz=UTC, hold_ttl_s=TTL, limits=Limits(max_concurrent=(1, None))
    )
    assert busy.concurrency_limited == "tenant"
    await harness.run_past(lease_end(short))
    later = await harness.store.reserve(
        "r3", counters, 10, tz=UTC, hold_ttl_s=TTL, limits=Limits(max_concurrent=(1, None))
    )
    assert later.ok


async def test_a_renewed_lease_keeps_its_request_in_flight(harness: Harness) -> None:
    counters = [tenant(10_000)]
    short = await harness.store.reserve(
        "r1", counters, 10, tz=UTC, hold_ttl_s=LEASE, limits=Limits(max_concurrent=(1, None))
    )
    assert await harness.store.renew("r1", short.states, hold_ttl_s=TTL)
    await harness.run_past(lease_end(short))
    busy = await harness.store.reserve(
        "r2", counters, 10, tz=UTC, hold_ttl_s=TTL, limits=Limits(max_concurrent=(1, None))
    )
    assert busy.concurrency_limited == "tenant"


# --- history and rejections, every store ---------------------------------------------------


def rejection(n: int, agent_id: str = "bot-1") -> Rejection:
    return Rejection(
        time=T0 + n, agent=agent_id, model="gpt-4o", code="budget_exceeded", windows=("daily",)
    )


async def test_settled_spend_goes_to_its_hour_and_day_once(harness: Harness) -> None:
    h = harness
    counters = [tenant(10_000, Window.HOURLY), agent(10_000)]
    first = await reserve(h, "req-1", counters, 100)
    await h.store.settle("req-1", first.states, 40, hold_ttl_s=TTL)
    await h.store.settle("req-1", first.states, 40, hold_ttl_s=TTL)  # a retry: once
    second = await reserve(h, "req-2", counters, 100)
    await h.store.settle("req-2", second.states, 0, hold_ttl_s=TTL)  # a release: nothing
    await h.store.record("req-3", counters, 60, tz=UTC, hold_ttl_s=TTL)  # fail-open
    history = await h.store.history("acme")
    hour, day = buckets(await h.store.now(), UTC)
    assert sum(m for _, m in history.hours) == 100 and history.hours[-1][0] <= hour
    assert sum(m for _, m in history.days) == 100 and history.days[-1][0] <= day
    assert await h.store.history("globex") == type(history)()  # other tenants: nothing


async def test_rejections_keep_the_latest_hundred_newest_first(harness: Harness) -> None:
    for n in range(105):
        await harness.store.note_rejection("acme", rejection(n))
    await harness.store.note_rejection("globex", rejection(0, "other"))
    kept = await harness.store.rejections("acme")
    assert len(kept) == 100
    assert kept[0] == rejection(104) and kept[-1] == rejection(5)
    assert await harness.store.rejections("globex") == (rejection(0, "other"),)
    assert await harness.store.rejections("initech") == ()


@pytest.fixture(params=["memory", "redis"])
async def clocked(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Store, FakeClock]]:
    """A store whose history follows a fake clock (Redis: the time its settles are
    counted at comes from the proxy's estimate of the store clock, and its keys expire
    by it: the clock starts at 20 past the current hour)."""
    clock = FakeClock(period_of(Window.HOURLY, time.time(), UTC).start + 1200.0)
    if request.param == "memory":
        yield MemoryStore(clock=clock), clock
        return
    url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("key_prefix")
    client = Redis.from_url(url)
    store = RedisStore(client, prefix=prefix, timeout_s=2.0, local_clock=clock)
    try:
        yield store, clock
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_history_is_trimmed_to_48_hours_and_90_days(
    clocked: tuple[Store, FakeClock],
) -> None:
    store, clock = clocked
    counter = tenant(10**12, Window.HOURLY)
    start = clock.now

    async def settle_at(at: float, rid: str) -> None:
        clock.now = at
        period = period_of(Window.HOURLY, at, UTC)
        await store.settle(rid, [CounterState(counter, period, 0, 0)], 1, hold_ttl_s=TTL)

    for i in range(60):
        await settle_at(start + 3600 * i, f"h-{i}")
    history = await store.history("acme")
    assert len(history.hours) == 48
    assert history.hours[-1] == (period_of(Window.HOURLY, clock.now, UTC).start, 1)
    days_from = start + 60 * 3600
    if days_from % 86400 < 7200:
        # In a day's first hour, 90 days and the hour kept for days of 25 hours reach
        # back into a 91st day: settle later in the day.
        days_from += 7200
    for i in range(100):
        await settle_at(days_from + 86400 * i, f"d-{i}")
    history = await store.history("acme")
    assert len(history.days) == 90
    assert history.days[-1] == (period_of(Window.DAILY, clock.now, UTC).start, 1)
    if isinstance(store, RedisStore):  # the hashes themselves stay that small
        hour_key, day_key = store.history_keys("acme")
        assert await store.client.hlen(hour_key) <= 49
        assert await store.client.hlen(day_key) <= 91


async def test_history_days_follow_the_time_zone(clocked: tuple[Store, FakeClock]) -> None:
    store, clock = clocked
    tokyo = ZoneInfo("Asia/Tokyo")
    counter = tenant(10**12, Window.HOURLY)
    period = period_of(Window.HOURLY, clock.now, tokyo)
    await store.settle("r", [CounterState(counter, period, 0, 0)], 7, hold_ttl_s=TTL, tz=tokyo)
    history = await store.history("acme")
    day = period_of(Window.DAILY, clock.now, tokyo)
    assert history.days == ((day.start, 7),)
    assert day != period_of(Window.DAILY, clock.now, UTC)  # Tokyo's day is not UTC's
    assert history.hours == ((period.start, 7),)


async def test_redis_rejections_are_one_bounded_expiring_list(redis_harness: Harness) -> None:
    h = redis_harness
    assert isinstance(h.store, RedisStore) and h.raw is not None
    for n in range(103):
        await h.store.note_rejection("acme", rejection(n))
    key = f"{h.prefix}:{{acme}}:rejections"
    assert await h.raw.keys(h.prefix) == [key]
    assert await h.raw.call("LLEN", key) == 100
    assert 0 < await h.raw.call("PTTL", key) <= 7 * 86400 * 1000


# --- units and scopes: money, tokens and requests in one reservation ----------------------


def rate(limit: int, unit: Unit, window: Window = Window.DAILY, **scope: str) -> Counter:
    return Counter("acme", scope.get("agent_id"), window, limit, unit, **_other_scopes(scope))


def _other_scopes(scope: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in scope.items() if k in ("model_cap", "user_id")}


async def test_each_counter_holds_the_amount_of_its_unit(harness: Harness) -> None:
    counters = [
        tenant(1_000_000),
        rate(10, Unit.REQUESTS),
        rate(5_000, Unit.TOKENS, agent_id="bot-1"),
        rate(1_000_000, Unit.USD, Window.DAILY, model_cap="frontier"),
        rate(3_000, Unit.TOKENS, Window.HOURLY, user_id="u@example.com"),
    ]
    held = Amounts(700, tokens=1_200, requests=1)
    result = await harness.store.reserve("r1", counters, held, tz=UTC, hold_ttl_s=TTL)
    assert result.ok
    assert amounts(result.states) == [(0, 700), (0, 1), (0, 1_200), (0, 700), (0, 1_200)]
    # Settled to what the request used, in each unit.
    await harness.store.settle("r1", result.states, Amounts(300, 900, 1), hold_ttl_s=TTL)
    after = await harness.store.snapshot(counters, tz=UTC)
    assert amounts(after) == [(300, 0), (1, 0), (900, 0), (300, 0), (900, 0)]


async def test_a_request_is_refused_by_whichever_unit_runs_out(harness: Harness) -> None:
    counters = [tenant(1_000_000), rate(2, Unit.REQUESTS), rate(1_000, Unit.TOKENS)]
    one = Amounts(10, tokens=400, requests=1)
    assert (await harness.store.reserve("r1", counters, one, tz=UTC, hold_ttl_s=TTL)).ok
    big = Amounts(10, tokens=601, requests=1)
    refused = await harness.store.reserve("r2", counters, big, tz=UTC, hold_ttl_s=TTL)
    assert not refused.ok
    assert [s.counter.unit for s in refused.exceeded] == [Unit.TOKENS]
    assert (await harness.store.reserve("r3", counters, one, tz=UTC, hold_ttl_s=TTL)).ok
    third = await harness.store.reserve("r4", counters, Amounts(1, 1, 1), tz=UTC, hold_ttl_s=TTL)
    assert [s.counter.unit for s in third.exceeded] == [Unit.REQUESTS]
    # Nothing was held for the refused requests, in any unit.
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(0, 20), (0, 2), (0, 800)]


async def test_concurrent_requests_never_overbook_a_request_or_token_limit(
    harness: Harness,
) -> None:
    by_requests = [rate(7, Unit.REQUESTS), rate(10**9, Unit.TOKENS)]
    results = await asyncio.gather(
        *(
            harness.store.reserve(f"q{i}", by_requests, Amounts(1, 10, 1), tz=UTC, hold_ttl_s=TTL)
            for i in range(40)
        )
    )
    assert sum(r.ok for r in results) == 7
    by_tokens = [rate(1_000, Unit.TOKENS, agent_id="bot-2")]
    results = await asyncio.gather(
        *(
            harness.store.reserve(f"t{i}", by_tokens, Amounts(1, 90, 1), tz=UTC, hold_ttl_s=TTL)
            for i in range(40)
        )
    )
    assert sum(r.ok for r in results) == 11  # 11 x 90 = 990 <= 1,000
    assert amounts(await harness.store.snapshot(by_tokens, tz=UTC)) == [(0, 990)]


async def test_a_released_request_gives_back_every_unit(harness: Harness) -> None:
    counters = [rate(1, Unit.REQUESTS), rate(100, Unit.TOKENS)]
    first = await harness.store.reserve("r1", counters, Amounts(5, 50, 1), tz=UTC, hold_ttl_s=TTL)
    await harness.store.settle("r1", first.states, 0, hold_ttl_s=TTL)
    again = await harness.store.reserve("r2", counters, Amounts(5, 100, 1), tz=UTC, hold_ttl_s=TTL)
    assert again.ok


async def test_a_lapsed_lease_is_charged_in_every_unit(harness: Harness) -> None:
    counters = [rate(10, Unit.REQUESTS), rate(1_000, Unit.TOKENS)]
    first = await harness.store.reserve(
        "r1", counters, Amounts(5, 600, 1), tz=UTC, hold_ttl_s=LEASE
    )
    await harness.run_past(lease_end(first))
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(1, 0), (600, 0)]
    # The late settle replaces the charge by what was used.
    await harness.store.settle("r1", first.states, Amounts(5, 250, 1), hold_ttl_s=TTL)
    assert amounts(await harness.store.snapshot(counters, tz=UTC)) == [(1, 0), (250, 0)]


async def test_a_tenant_has_at_most_max_users_a_day(harness: Harness) -> None:
    def for_user(user: str) -> list[Counter]:
        return [tenant(10_000), rate(100, Unit.REQUESTS, user_id=user)]

    async def hold(rid: str, user: str) -> ReserveResult:
        return await harness.store.reserve(
            rid,
            for_user(user),
            Amounts(1, 0, 1),
            tz=UTC,
            hold_ttl_s=TTL,
            limits=Limits(max_users=2),
        )

    assert (await hold("r1", "u1")).ok
    second = await hold("r2", "u2")
    assert second.ok
    third = await hold("r3", "u3")
    assert not third.ok and third.too_many_users and third.exceeded == ()
    assert (await hold("r4", "u1")).ok  # already counted today
    # A user whose requests were all released leaves the count.
    await harness.store.settle("r2", second.states, 0, hold_ttl_s=TTL)
    assert (await hold("r5", "u3")).ok


async def test_in_flight_counts_the_live_requests_under_a_limit(harness: Harness) -> None:
    counters = [tenant(10_000), agent(10_000)]
    limits = Limits(max_concurrent=(5, 5))
    first = await harness.store.reserve("r1", counters, 1, tz=UTC, hold_ttl_s=TTL, limits=limits)
    await harness.store.reserve("r2", counters, 1, tz=UTC, hold_ttl_s=TTL, limits=limits)
    assert await harness.store.in_flight("acme", "bot-1") == (2, 2)
    await harness.store.settle("r1", first.states, 1, hold_ttl_s=TTL)
    assert await harness.store.in_flight("acme", "bot-1") == (1, 1)
    assert await harness.store.in_flight("acme", "other") == (1, 0)


# --- who a tenant named today --------------------------------------------------------


async def test_seen_today_lists_a_tenants_agents_and_end_users_sorted_and_bounded(
    harness: Harness,
) -> None:
    async def named(rid: str, agent_id: str, user: str, tenant_id: str = "acme") -> None:
        counters = [
            Counter(tenant_id, agent_id, Window.DAILY, 1000),
            Counter(tenant_id, None, Window.DAILY, 100, Unit.REQUESTS, user_id=user),
        ]
        result = await harness.store.reserve(
            rid, counters, Amounts(1, 0, 1), tz=UTC, hold_ttl_s=TTL
        )
        assert result.ok
        await harness.store.settle(rid, result.states, Amounts(1, 0, 1), hold_ttl_s=TTL)

    empty = await harness.store.seen_today("acme", limit=5)
    assert (empty.agents, empty.agents_total, empty.users, empty.users_total) == ((), 0, (), 0)
    # Byte order, whatever the server's locale: "-" < "B" < "_" < "a".
    for i, (agent_id, user) in enumerate(
        [("b", "u_2"), ("a", "U-1"), ("_x", "u-3"), ("-y", "u_2")]
    ):
        await named(f"r{i}", agent_id, user)
    await named("other", "0-globex-bot", "0-globex-user", tenant_id="globex")

    seen = await harness.store.seen_today("acme", limit=3)
    assert (seen.agents, seen.agents_total) == (("-y", "_x", "a"), 4)
    assert (seen.users, seen.users_total) == (("U-1", "u-3", "u_2"), 3)
    assert seen.day == int(await harness.store.now()) // 86_400 * 86_400
    assert (await harness.store.seen_today("acme", limit=100)).agents == ("-y", "_x", "a", "b")
    globex = await harness.store.seen_today("globex", limit=3)
    assert (globex.agents, globex.users) == (("0-globex-bot",), ("0-globex-user",))
    # An agent whose requests all cost nothing is not named.
    free = [Counter("acme", "free-bot", Window.DAILY, 1000)]
    result = await harness.store.reserve("free", free, 1, tz=UTC, hold_ttl_s=TTL)
    assert "free-bot" in (await harness.store.seen_today("acme", limit=10)).agents
    await harness.store.settle("free", result.states, 0, hold_ttl_s=TTL)
    assert (await harness.store.seen_today("acme", limit=10)).agents_total == 4


@pytest.mark.parametrize(
    ("tenant_id", "limit"), [("acme", 0), ("acme", 101), ("no spaces", 5), ("", 5)]
)
async def test_seen_today_refuses_an_invalid_tenant_or_limit(
    harness: Harness, tenant_id: str, limit: int
) -> None:
    with pytest.raises(ValueError):
        await harness.store.seen_today(tenant_id, limit=limit)


async def test_redis_seen_today_reads_a_bounded_sample_of_a_crowded_day(
    redis_harness: Harness,
) -> None:
    h = redis_harness
    assert isinstance(h.store, RedisStore) and h.raw is not None
    at = await h.store.now()
    crowd = [f"user-{i:05d}" for i in range(SEEN_READ_MAX + 5)]
    await h.raw.call("SADD", h.store.users_key("acme", at), *crowd)
    seen = await h.store.seen_today("acme", limit=20)
    assert seen.users_total == len(crowd)
    assert len(seen.users) == 20 and list(seen.users) == sorted(seen.users)
    assert set(seen.users) <= set(crowd)
    assert (seen.agents, seen.agents_total) == ((), 0)


async def test_redis_prepared_calls_follow_their_counters_and_stay_bounded(
    redis_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = redis_harness
    assert isinstance(h.store, RedisStore)
    monkeypatch.setattr(redis_store, "MAX_PREPARED_CALLS", 4)
    plans = [[tenant(1000), agent(1000, f"bot-{i}")] for i in range(6)]
    for round_ in range(2):
        for i, counters in enumerate(plans):
            result = await reserve(h, f"r{round_}-{i}", counters, 10 + i)
            # Each plan's own keys and amounts, whichever calls were prepared before.
            assert result.ok
            assert result.states[1].held == (round_ + 1) * (10 + i)
            assert len(h.store._calls) <= 4
    snapshot = await h.store.snapshot(plans[5], tz=UTC)
    assert amounts(snapshot)[1] == (0, 2 * 15)  # bot-5's own counter: its two holds
    assert amounts(snapshot)[0] == (0, 2 * sum(10 + i for i in range(6)))  # the tenant's


async def test_the_store_backstop_cuts_a_call_off_and_leaves_its_task_usable() -> None:
    never = asyncio.Event()
    with pytest.raises(TimeoutError):
        await redis_store._within(0.01, never.wait)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation left behind
    assert await redis_store._within(5, lambda: asyncio.sleep(0, "done")) == "done"


async def test_the_store_backstop_lets_another_cancellation_through() -> None:
    started, never = asyncio.Event(), asyncio.Event()

    async def waits() -> None:
        started.set()
        await never.wait()

    inner = asyncio.create_task(redis_store._within(5, waits))
    await started.wait()
    inner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await inner
    assert inner.cancelled()


@pytest.mark.parametrize("cut", ["before", "after"])
async def test_a_settle_cut_around_its_script_is_counted_once(
    redis_harness: Harness, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    """A request cancelled while its settle is under way: the ledger applies the settle
    again in a task of its own. Whether the first call ran in Redis or not, the charge
    counts once and the hold is gone."""
    h = redis_harness
    store = h.store
    assert isinstance(store, RedisStore)
    ledger = Ledger(store, fail_open=False)
    counters = (tenant(1000, Window.HOURLY), agent(1000, window=Window.DAILY))
    caps = tuple(BudgetCap(window=c.window, hard_limit_usd=Decimal("0.001")) for c in counters)
    run = store._run
    commits = 0

    async def cut_around(script: Any, packed: bytes, slot_key: str) -> Any:
        nonlocal commits
        if script is store._commit:
            commits += 1
            if commits == 1:
                task = asyncio.current_task()
                assert task is not None
                if cut == "after":
                    await run(script, packed, slot_key)  # the script ran; its reply is lost
                task.cancel()
                await asyncio.sleep(0)
        return await run(script, packed, slot_key)

    monkeypatch.setattr(store, "_run", cut_around)

    async def request() -> None:
        plan = BudgetPlan(counters=counters, caps=caps, amounts=Amounts(300))
        async with ledger.hold(plan, tz=UTC, hold_ttl_s=TTL) as hold:
            await hold.commit(120)

    task = asyncio.create_task(request())
    with pytest.raises(asyncio.CancelledError):
        await task
    await ledger.drain(timeout_s=5)
    assert commits == 2
    snapshot = await store.snapshot(counters, tz=UTC)
    assert amounts(snapshot) == [(120, 0), (120, 0)]
