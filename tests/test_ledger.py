"""Holds, lease renewals, settles, the fail-open policy and the retry queue, over an
in-memory store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from proxy.budget import BudgetPlan
from proxy.config import BudgetCap
from proxy.counters import (
    NO_LIMITS,
    Amounts,
    Counter,
    CounterState,
    Limits,
    ReserveResult,
    SeenToday,
    as_amounts,
)
from proxy.errors import BudgetExceeded, StoreUnavailable
from proxy.history import Rejection, SpendHistory
from proxy.ledger import Hold, Ledger
from proxy.memory_store import MemoryStore
from proxy.windows import Window

UTC = ZoneInfo("UTC")
T0 = 1_715_768_400.0  # 2024-05-15 10:20:00 UTC, mid-hour
TTL = 60

TENANT_HOURLY = Counter("acme", None, Window.HOURLY, 10_000_000)
AGENT_DAILY = Counter("acme", "bot", Window.DAILY, 100_000_000)


def plan(amount: int, *counters: Counter) -> BudgetPlan:
    counters = counters or (TENANT_HOURLY, AGENT_DAILY)
    caps = tuple(
        BudgetCap(window=c.window, hard_limit_usd=Decimal(c.limit) / 1_000_000) for c in counters
    )
    return BudgetPlan(counters=counters, caps=caps, amounts=Amounts(amount))


@dataclass(frozen=True, slots=True)
class Call:
    op: str  # "reserve" | "settle" | "record"
    rid: str
    micros: int


class FakeStore:
    """A ``MemoryStore`` whose calls fail with ``StoreUnavailable`` on demand.

        store.down = True               # every call fails
        store.failing_rids.add(rid)     # settles and records of ``rid`` fail
        store.lose_reserve_reply = True # reserve runs, then its reply is "lost"
        store.gate = asyncio.Event()    # settles and records wait for it
        store.renew_fails = True        # renewals fail
        store.renew_step_s = 5.0        # the store clock moves on this much before each renewal
        await store.renewals(n)         # wait until ``n`` renewals were tried

    ``calls`` lists the calls that reached the store, in order; ``now_s`` is its clock.
    """

    def __init__(self) -> None:
        self.now_s = T0
        self.memory = MemoryStore(clock=lambda: self.now_s)
        self.down = False
        self.failing_rids: set[str] = set()
        self.lose_reserve_reply = False
        self.gate: asyncio.Event | None = None
        self.commit_started = asyncio.Event()
        self.renew_fails = False
        self.renew_step_s = 0.0
        self._renewed = asyncio.Event()
        self.calls: list[Call] = []

    def _check(self, rid: str = "") -> None:
        if self.down or rid in self.failing_rids:
            raise StoreUnavailable()

    async def _wait(self) -> None:
        self.commit_started.set()
        if self.gate is not None:
            await self.gate.wait()

    async def reserve(
        self,
        rid: str,
        counters: Sequence[Counter],
        amount: Amounts | int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
        limits: Limits = NO_LIMITS,
    ) -> ReserveResult:
        self._check()
        self.calls.append(Call("reserve", rid, as_amounts(amount).micros))
        result = await self.memory.reserve(
            rid,
            counters,
            amount,
            tz=tz,
            hold_ttl_s=hold_ttl_s,
            limits=limits,
        )
        if self.lose_reserve_reply:
            raise StoreUnavailable()
        return result

    async def renew(self, rid: str, states: Sequence[CounterState], *, hold_ttl_s: float) -> bool:
        self.now_s += self.renew_step_s
        self.calls.append(Call("renew", rid, 0))
        self._renewed.set()
        if self.renew_fails:
            raise StoreUnavailable()
        self._check()
        return await self.memory.renew(rid, states, hold_ttl_s=hold_ttl_s)

    async def renewals(self, n: int) -> None:
        """Wait until ``n`` renewals were tried (the last one has run once this returns)."""
        while len(self.ops("renew")) < n:
            self._renewed.clear()
            await self._renewed.wait()

    async def settle(
        self,
        rid: str,
        states: Sequence[CounterState],
        actual: Amounts | int,
        *,
        hold_ttl_s: float,
        tz: ZoneInfo | None = None,
    ) -> None:
        await self._wait()
        self._check(rid)
        self.calls.append(Call("settle", rid, as_amounts(actual).micros))
        await self.memory.settle(rid, states, actual, hold_ttl_s=hold_ttl_s, tz=tz)

    async def record(
        self,
        rid: str,
        counters: Sequence[Counter],
        actual: Amounts | int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
    ) -> None:
        await self._wait()
        self._check(rid)
        self.calls.append(Call("record", rid, as_amounts(actual).micros))
        await self.memory.record(rid, counters, actual, tz=tz, hold_ttl_s=hold_ttl_s)

    async def snapshot(
        self, counters: Sequence[Counter], *, tz: ZoneInfo
    ) -> tuple[CounterState, ...]:
        self._check()
        return await self.memory.snapshot(counters, tz=tz)

    async def claim(self, name: str, ttl_s: int) -> bool:
        return await self.memory.claim(name, ttl_s)

    async def in_flight(self, tenant_id: str, agent_id: str | None) -> tuple[int, int]:
        return await self.memory.in_flight(tenant_id, agent_id)

    async def now(self) -> float:
        self._check()
        return self.now_s

    def epoch_of(self, tenant_id: str) -> str:
        return self.memory.epoch_of(tenant_id)

    async def ping(self) -> None:
        self._check()

    async def aclose(self) -> None:
        return None

    async def history(self, tenant_id: str) -> SpendHistory:
        self._check()
        return await self.memory.history(tenant_id)

    async def note_rejection(self, tenant_id: str, rejection: Rejection) -> None:
        self._check()
        await self.memory.note_rejection(tenant_id, rejection)

    async def rejections(self, tenant_id: str) -> tuple[Rejection, ...]:
        self._check()
        return await self.memory.rejections(tenant_id)

    async def seen_today(self, tenant_id: str, *, limit: int) -> SeenToday:
        self._check()
        return await self.memory.seen_today(tenant_id, limit=limit)

    def ops(self, *kinds: str) -> list[Call]:
        return [c for c in self.calls if c.op in kinds]

    async def totals(
        self, counters: Sequence[Counter] = (TENANT_HOURLY, AGENT_DAILY)
    ) -> list[tuple[int, int]]:
        """(spent, held) of each counter now."""
        return [(s.spent, s.held) for s in await self.memory.snapshot(counters, tz=UTC)]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


def ledger_for(store: FakeStore, *, fail_open: bool = False, max_pending: int = 100) -> Ledger:
    return Ledger(store, fail_open=fail_open, max_pending=max_pending, retry_interval_s=0.01)


async def deferred_settle(ledger: Ledger, store: FakeStore, actual: int) -> str:
    """Reserve while the store is up, then commit ``actual`` while it is down: one deferral."""
    store.down = False
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
        store.down = True
        await hold.commit(actual)
    return hold.rid


# --- hold and commit -----------------------------------------------------------------------


async def test_commit_replaces_the_hold_once(store: FakeStore) -> None:
    ledger = ledger_for(store)
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
        assert await store.totals() == [(0, 1000), (0, 1000)]
        assert [s.held for s in hold.states] == [1000, 1000]
        assert hold.now == T0
        assert hold.would_reject is None
        assert not hold.admitted_without_store
        await hold.commit(700)
        assert hold.settled
        assert await store.totals() == [(700, 0), (700, 0)]
        await hold.commit(900)
    assert await store.totals() == [(700, 0), (700, 0)]
    assert store.ops("settle", "record") == [Call("settle", hold.rid, 700)]
    assert ledger.pending == 0


async def test_negative_actual_is_settled_as_zero(store: FakeStore) -> None:
    ledger = ledger_for(store)
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
        await hold.commit(-5)
    assert store.ops("settle") == [Call("settle", hold.rid, 0)]
    assert await store.totals() == [(0, 0), (0, 0)]


async def test_leaving_without_commit_releases(store: FakeStore) -> None:
    ledger = ledger_for(store)
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
        assert await store.totals() == [(0, 1000), (0, 1000)]
    assert hold.settled
    assert store.ops("settle", "record") == [Call("settle", hold.rid, 0)]
    assert await store.totals() == [(0, 0), (0, 0)]


async def test_an_error_in_the_body_releases_and_propagates(store: FakeStore) -> None:
    ledger = ledger_for(store)
    with pytest.raises(RuntimeError, match="upstream broke"):
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL):
            raise RuntimeError("upstream broke")
    assert await store.totals() == [(0, 0), (0, 0)]


async def test_each_hold_has_its_own_id(store: FakeStore) -> None:
    ledger = ledger_for(store)
    rids = set()
    for _ in range(3):
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
            await hold.commit(1)
        rids.add(hold.rid)
    assert len(rids) == 3
    assert await store.totals() == [(3, 0), (3, 0)]


async def test_a_plan_without_counters_never_touches_the_store(store: FakeStore) -> None:
    ledger = ledger_for(store)
    store.down = True
    empty = BudgetPlan(counters=(), caps=(), amounts=Amounts(1000))
    async with ledger.hold(empty, tz=UTC, hold_ttl_s=TTL) as hold:
        assert hold.states == ()
        assert not hold.admitted_without_store
        await hold.commit(500)
    assert store.calls == []
    assert ledger.pending == 0
    assert ledger.stats.fail_open_admitted == 0


# --- leases ---------------------------------------------------------------------------------

LEASE = 0.03  # renewed every 10 ms of real time


async def test_renewals_keep_a_long_requests_hold_across_several_leases(
    store: FakeStore,
) -> None:
    ledger = ledger_for(store)
    store.renew_step_s = LEASE / 2  # the store's time moves on between renewals
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=LEASE) as hold:
        assert ledger.renewing == 1
        await store.renewals(6)
        assert store.now_s >= T0 + 3 * LEASE  # the first lease is long over
        assert await store.totals() == [(0, 1000), (0, 1000)]  # still held, not charged
        await hold.commit(700)
    assert ledger.renewing == 0
    renewed = len(store.ops("renew"))
    assert store.ops("settle", "record") == [Call("settle", hold.rid, 700)]
    assert await store.totals() == [(700, 0), (700, 0)]
    assert ledger.stats.leases_lapsed == 0
    # Left the block: no renewal is scheduled any more.
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=LEASE) as other:
        await store.renewals(renewed + 1)
    assert ledger.renewing == 0
    assert {c.rid for c in store.ops("renew")[renewed:]} == {other.rid}


async def test_a_renewal_error_does_not_break_the_request(
    store: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = ledger_for(store)
    store.renew_fails = True
    with caplog.at_level(logging.WARNING, logger="capproxy.ledger"):
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=LEASE) as hold:
            await store.renewals(3)  # tried again at every tick
            store.renew_fails = False
            await store.renewals(4)
            await hold.commit(700)
    assert ledger.stats.renewals_failed >= 3
    assert ledger.stats.leases_lapsed == 0
    assert await store.totals() == [(700, 0), (700, 0)]
    failures = [r for r in caplog.records if "renewal failed" in r.getMessage()]
    assert len(failures) == 1  # logged once per hold, not once per tick
    assert ledger.pending == 0


async def test_a_lapsed_lease_is_charged_and_the_commit_replaces_the_charge(
    store: FakeStore,
) -> None:
    ledger = ledger_for(store)
    store.renew_fails = True
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=LEASE) as hold:
        await store.renewals(1)
        store.now_s += LEASE  # the store was out of reach for a whole lease
        store.renew_fails = False
        await store.renewals(2)  # answered: the hold is gone, charged in full
        assert ledger.stats.leases_lapsed == 1
        assert await store.totals() == [(1000, 0), (1000, 0)]
        await hold.commit(300)  # the actual cost replaces the charge
    assert len(store.ops("renew")) == 2  # no renewal after the hold was found gone
    assert await store.totals() == [(300, 0), (300, 0)]


async def test_holds_without_a_reservation_are_not_renewed(store: FakeStore) -> None:
    ledger = ledger_for(store, fail_open=True)
    store.down = True
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=LEASE) as hold:
        assert hold.admitted_without_store
        assert ledger.renewing == 0
    store.down = False
    async with ledger.hold(plan(10_000_001), tz=UTC, hold_ttl_s=LEASE, enforce=False) as hold:
        assert hold.would_reject is not None
        assert ledger.renewing == 0
    assert store.ops("renew") == []


# --- rejection and shadow mode -------------------------------------------------------------


async def test_rejection_raises_and_calls_on_reject(store: FakeStore) -> None:
    ledger = ledger_for(store)
    seen: list[tuple[BudgetPlan, tuple[CounterState, ...]]] = []
    big = plan(10_000_001)
    entered = False
    with pytest.raises(BudgetExceeded) as info:
        async with ledger.hold(
            big, tz=UTC, hold_ttl_s=TTL, on_reject=lambda p, s: seen.append((p, s))
        ):
            entered = True
    assert not entered
    assert "hourly budget cap exceeded for tenant 'acme'" in info.value.message
    assert info.value.headers["x-should-retry"] == "false"
    assert len(seen) == 1
    assert seen[0][0] is big
    assert [s.counter for s in seen[0][1]] == [TENANT_HOURLY, AGENT_DAILY]
    assert await store.totals() == [(0, 0), (0, 0)]
    assert store.ops("settle", "record") == []


async def test_rejection_without_hook(store: FakeStore) -> None:
    ledger = ledger_for(store)
    with pytest.raises(BudgetExceeded):
        async with ledger.hold(plan(10_000_001), tz=UTC, hold_ttl_s=TTL):
            pass


async def test_shadow_mode_admits_and_records_the_actual(store: FakeStore) -> None:
    ledger = ledger_for(store)
    seen: list[BudgetPlan] = []
    async with ledger.hold(
        plan(10_000_001),
        tz=UTC,
        hold_ttl_s=TTL,
        enforce=False,
        on_reject=lambda p, s: seen.append(p),
    ) as hold:
        assert isinstance(hold.would_reject, BudgetExceeded)
        assert "hourly budget cap exceeded" in hold.would_reject.message
        assert hold.states == ()
        assert await store.totals() == [(0, 0), (0, 0)]  # nothing held
        await hold.commit(12_000_000)
    assert len(seen) == 1
    assert store.ops("settle", "record") == [Call("record", hold.rid, 12_000_000)]
    assert await store.totals() == [(12_000_000, 0), (12_000_000, 0)]


async def test_shadow_mode_without_commit_writes_nothing(store: FakeStore) -> None:
    ledger = ledger_for(store)
    async with ledger.hold(plan(10_000_001), tz=UTC, hold_ttl_s=TTL, enforce=False) as hold:
        assert hold.would_reject is not None
    assert store.ops("settle", "record") == []
    assert ledger.pending == 0


async def test_shadow_mode_that_fits_holds_as_usual(store: FakeStore) -> None:
    ledger = ledger_for(store)
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL, enforce=False) as hold:
        assert hold.would_reject is None
        assert await store.totals() == [(0, 1000), (0, 1000)]
        await hold.commit(600)
    assert store.ops("settle", "record") == [Call("settle", hold.rid, 600)]


# --- store failures ------------------------------------------------------------------------


async def test_fail_open_admits_and_records_after_flush(store: FakeStore) -> None:
    ledger = ledger_for(store, fail_open=True)
    store.down = True
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
        assert hold.reserve_failed
        assert hold.admitted_without_store
        assert hold.states == ()
        assert hold.would_reject is None
        await hold.commit(700)
    assert ledger.stats.fail_open_admitted == 1
    assert ledger.pending == 1
    assert ledger.stats.settles_deferred == 1
    assert await ledger.flush() == 0  # still down: kept
    assert ledger.pending == 1
    store.down = False
    assert await ledger.flush() == 1
    assert ledger.pending == 0
    assert store.ops("settle", "record") == [Call("record", hold.rid, 700)]
    assert await store.totals() == [(700, 0), (700, 0)]


async def test_fail_open_records_at_once_when_the_store_is_back(store: FakeStore) -> None:
    ledger = ledger_for(store, fail_open=True)
    store.down = True
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
        store.down = False
        await hold.commit(700)
    assert ledger.pending == 0
    assert store.ops("record") == [Call("record", hold.rid, 700)]


async def test_fail_open_release_clears_a_hold_whose_reply_was_lost(store: FakeStore) -> None:
    ledger = ledger_for(store, fail_open=True)
    store.lose_reserve_reply = True
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
        assert hold.reserve_failed
        # The reserve ran in the store, though the proxy never heard back.
        assert await store.totals() == [(0, 1000), (0, 1000)]
    assert store.ops("record") == [Call("record", hold.rid, 0)]
    assert await store.totals() == [(0, 0), (0, 0)]


async def test_fail_closed_reraises_and_queues_a_release(store: FakeStore) -> None:
    ledger = ledger_for(store, fail_open=False)
    store.lose_reserve_reply = True
    entered = False
    with pytest.raises(StoreUnavailable):
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL):
            entered = True
    assert not entered
    assert ledger.stats.fail_open_admitted == 0
    assert ledger.pending == 1
    assert ledger.stats.settles_deferred == 1
    (reserve,) = store.ops("reserve")
    assert await store.totals() == [(0, 1000), (0, 1000)]  # the lost reply's hold
    assert await ledger.flush() == 1
    assert store.ops("settle", "record") == [Call("record", reserve.rid, 0)]
    assert await store.totals() == [(0, 0), (0, 0)]


async def test_a_reserve_cancelled_mid_call_is_released(store: FakeStore) -> None:
    # Cancelled (shutdown cut) after the script ran but before its reply: release the rid.
    ledger = ledger_for(store, fail_open=False)
    reserve = store.reserve
    ran = asyncio.Event()

    async def runs_then_hangs(*args: Any, **kwargs: Any) -> ReserveResult:
        await reserve(*args, **kwargs)
        ran.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    store.reserve = runs_then_hangs  # type: ignore[method-assign]

    async def request() -> None:
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL):
            raise AssertionError("admitted")

    task = asyncio.create_task(request())
    await ran.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ledger.pending == 1
    assert await ledger.flush() == 1
    assert await store.totals() == [(0, 0), (0, 0)]


async def test_fail_closed_release_keeps_a_late_reserve_from_holding(store: FakeStore) -> None:
    ledger = ledger_for(store, fail_open=False)
    store.down = True
    with pytest.raises(StoreUnavailable):
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL):
            pass
    store.down = False
    assert await ledger.flush() == 1
    (release,) = store.ops("record")
    # The same reserve arriving late (a retried script) holds nothing.
    late = await store.memory.reserve(
        release.rid, (TENANT_HOURLY, AGENT_DAILY), 1000, tz=UTC, hold_ttl_s=TTL
    )
    assert not late.ok
    assert await store.totals() == [(0, 0), (0, 0)]


async def test_a_settle_the_store_cannot_take_is_deferred(store: FakeStore) -> None:
    ledger = ledger_for(store)
    rid = await deferred_settle(ledger, store, 700)
    assert ledger.pending == 1
    assert ledger.stats.settles_deferred == 1
    assert await store.totals() == [(0, 1000), (0, 1000)]
    store.down = False
    assert await ledger.flush() == 1
    assert store.ops("settle") == [Call("settle", rid, 700)]
    assert await store.totals() == [(700, 0), (700, 0)]


async def test_flush_retries_in_order_and_stops_at_the_first_error(store: FakeStore) -> None:
    ledger = ledger_for(store)
    rids = [await deferred_settle(ledger, store, actual) for actual in (100, 200, 300)]
    assert ledger.pending == 3
    store.down = False
    store.failing_rids.add(rids[1])
    assert await ledger.flush() == 1
    assert ledger.pending == 2
    # The third was not tried: flush stops at the first error.
    assert store.ops("settle") == [Call("settle", rids[0], 100)]
    store.failing_rids.clear()
    assert await ledger.flush() == 2
    assert store.ops("settle") == [
        Call("settle", rids[0], 100),
        Call("settle", rids[1], 200),
        Call("settle", rids[2], 300),
    ]
    assert await store.totals() == [(600, 0), (600, 0)]
    assert await ledger.flush() == 0


async def test_a_full_queue_drops_the_oldest(store: FakeStore) -> None:
    ledger = ledger_for(store, max_pending=3)
    rids = [await deferred_settle(ledger, store, actual) for actual in (100, 200, 300, 400)]
    assert ledger.pending == 3
    assert ledger.stats.settles_deferred == 4
    assert ledger.stats.settles_dropped == 1
    store.down = False
    assert await ledger.flush() == 3
    assert store.ops("settle") == [
        Call("settle", rids[1], 200),
        Call("settle", rids[2], 300),
        Call("settle", rids[3], 400),
    ]
    # The dropped settle's hold stays until its lease ends; then it is charged in full.
    assert await store.totals() == [(900, 1000), (900, 1000)]


async def test_releases_never_crowd_out_settles(store: FakeStore) -> None:
    ledger = ledger_for(store, max_pending=4)
    await deferred_settle(ledger, store, 100)
    assert ledger.pending == 1
    # Below half full: the release of a failed reserve is queued.
    with pytest.raises(StoreUnavailable):
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL):
            pass
    assert ledger.pending == 2
    assert ledger.stats.settles_deferred == 2
    # Half full: another release is not queued...
    with pytest.raises(StoreUnavailable):
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL):
            pass
    assert ledger.pending == 2
    assert ledger.stats.settles_deferred == 2
    # ...but a settle carrying spend still is, up to the bound.
    await deferred_settle(ledger, store, 300)
    await deferred_settle(ledger, store, 400)
    assert ledger.pending == 4
    assert ledger.stats.settles_dropped == 0


async def test_fail_open_release_is_not_queued_when_half_full(store: FakeStore) -> None:
    ledger = ledger_for(store, fail_open=True, max_pending=2)
    await deferred_settle(ledger, store, 100)
    store.down = True
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL):
        pass  # admitted without the store, left without a commit
    assert ledger.pending == 1
    async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
        await hold.commit(250)  # carries spend: queued
    assert ledger.pending == 2


# --- shutdown and cancellation -------------------------------------------------------------


async def test_drain_waits_for_settles_under_way(store: FakeStore) -> None:
    ledger = ledger_for(store)
    store.gate = asyncio.Event()
    done: list[str] = []

    async def request() -> None:
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
            await hold.commit(800)
        done.append("request")

    async def shutdown() -> None:
        await ledger.drain(timeout_s=5)
        done.append("drain")

    req = asyncio.create_task(request())
    await store.commit_started.wait()
    drain = asyncio.create_task(shutdown())
    for _ in range(5):
        await asyncio.sleep(0)  # let drain run as far as it can on its own
    assert not drain.done()
    assert store.ops("settle") == []
    store.gate.set()
    await asyncio.gather(req, drain)
    assert await store.totals() == [(800, 0), (800, 0)]
    assert "drain" in done


async def test_drain_gives_up_after_its_timeout(store: FakeStore) -> None:
    ledger = ledger_for(store)
    await deferred_settle(ledger, store, 100)
    await ledger.drain(timeout_s=0.05)  # still down
    assert ledger.pending == 1


async def test_drain_flushes_deferred_settles(store: FakeStore) -> None:
    ledger = ledger_for(store)
    rid = await deferred_settle(ledger, store, 100)
    store.down = False
    await ledger.drain(timeout_s=5)
    assert ledger.pending == 0
    assert store.ops("settle") == [Call("settle", rid, 100)]


async def test_drain_with_nothing_to_do_returns(store: FakeStore) -> None:
    await ledger_for(store).drain(timeout_s=5)


async def test_a_cancelled_request_still_settles(store: FakeStore) -> None:
    ledger = ledger_for(store)
    store.gate = asyncio.Event()
    holds: list[Hold] = []

    async def request() -> None:
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL) as hold:
            holds.append(hold)
            await hold.commit(800)

    task = asyncio.create_task(request())
    await store.commit_started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.ops("settle") == []  # the settle is still waiting on the store
    store.gate.set()
    await ledger.drain(timeout_s=5)
    assert store.ops("settle", "record") == [Call("settle", holds[0].rid, 800)]
    assert await store.totals() == [(800, 0), (800, 0)]


async def test_a_request_cancelled_inside_the_hold_releases_it(store: FakeStore) -> None:
    ledger = ledger_for(store)
    inside = asyncio.Event()

    async def request() -> None:
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL):
            inside.set()
            await asyncio.Event().wait()  # the upstream never answers

    task = asyncio.create_task(request())
    await inside.wait()
    assert await store.totals() == [(0, 1000), (0, 1000)]
    assert ledger.renewing == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ledger.renewing == 0
    assert await store.totals() == [(0, 0), (0, 0)]


async def test_a_release_cancelled_again_still_lands(store: FakeStore) -> None:
    ledger = ledger_for(store)
    store.gate = asyncio.Event()
    inside = asyncio.Event()

    async def request() -> None:
        async with ledger.hold(plan(1000), tz=UTC, hold_ttl_s=TTL):
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(request())
    await inside.wait()
    task.cancel()  # leaves the hold: the release waits on the store
    await store.commit_started.wait()
    task.cancel()  # cut again while the release is under way
    with pytest.raises(asyncio.CancelledError):
        await task
    store.gate.set()
    await ledger.drain(timeout_s=5)
    assert [c.micros for c in store.ops("settle")] == [0]
    assert await store.totals() == [(0, 0), (0, 0)]
