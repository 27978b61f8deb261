"""Leases end to end over a real Redis: a ledger's renewals keep a long request's hold for
as long as it runs, and a proxy killed with kill -9 leaves holds that end one lease later,
charged as spent (the upstream received, and may have billed, every one of them)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.budget import BudgetPlan
from proxy.config import BudgetCap
from proxy.counters import Amounts, Counter
from proxy.ledger import Ledger
from proxy.redis_store import RedisStore
from proxy.windows import Window

UTC = ZoneInfo("UTC")
ROOT = Path(__file__).resolve().parent.parent
LEASE = 0.6  # renewed every 0.2 s
COUNTER = Counter("acme", None, Window.DAILY, 2500)
PLAN = BudgetPlan(
    counters=(COUNTER,),
    caps=(BudgetCap(window=Window.DAILY, hard_limit_usd=Decimal("0.0025")),),
    amounts=Amounts(100),
)

# A proxy process: admits ``n`` requests whose upstream never answers, then says so.
PROXY = """
import asyncio, sys
from zoneinfo import ZoneInfo

from proxy.ledger import Ledger
from proxy.redis_store import RedisStore
from tests.test_lease import PLAN


async def main(url, prefix, lease, n):
    ledger = Ledger(RedisStore.from_url(url, prefix=prefix, timeout_s=1.0), fail_open=False)
    admitted = 0

    async def request():
        nonlocal admitted
        async with ledger.hold(PLAN, tz=ZoneInfo("UTC"), hold_ttl_s=lease):
            admitted += 1
            if admitted == n:
                print("in flight", flush=True)
            await asyncio.Event().wait()  # the upstream is still generating

    await asyncio.gather(*(request() for _ in range(n)))


asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
"""


@pytest.fixture
async def store(redis_url: str, key_prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_url, prefix=key_prefix, timeout_s=2.0)
    try:
        yield store
    finally:
        async for key in store.client.scan_iter(match=f"{key_prefix}:*"):
            await store.client.delete(key)
        await store.aclose()


async def run_past(store: RedisStore, moment: float) -> None:
    """Wait until Redis's clock is past ``moment`` (lease expiries are whole ms)."""
    while await store.now() <= moment + 0.001:
        await asyncio.sleep(0.02)


async def held(store: RedisStore) -> tuple[int, int, float | None]:
    (state,) = await store.snapshot([COUNTER], tz=UTC)
    return state.spent, state.held, state.holds_end


async def test_a_long_request_keeps_its_hold_for_several_leases(store: RedisStore) -> None:
    ledger = Ledger(store, fail_open=False)
    async with ledger.hold(PLAN, tz=UTC, hold_ttl_s=LEASE) as hold:
        first_end = hold.states[0].holds_end
        assert first_end is not None
        await run_past(store, first_end + 2 * LEASE)  # a slow upstream: three leases
        spent, holding, end = await held(store)
        assert (spent, holding) == (0, 100)  # renewed, neither charged nor released
        assert end is not None and end > first_end + 2 * LEASE
        await hold.commit(70)
    assert ledger.renewing == 0
    assert await held(store) == (70, 0, None)


async def test_a_proxy_killed_mid_flight_leaves_holds_that_end_charged(
    store: RedisStore, redis_url: str, key_prefix: str
) -> None:
    proxy = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PROXY,
        redis_url,
        key_prefix,
        str(LEASE),
        "20",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proxy.stdout is not None
        assert await proxy.stdout.readline() == b"in flight\n"
        spent, holding, first_end = await held(store)
        assert (spent, holding) == (0, 2000) and first_end is not None
        await run_past(store, first_end + LEASE)
        spent, holding, end = await held(store)
        assert (spent, holding) == (0, 2000)  # alive: its renewals keep the holds
        assert end is not None and end > first_end + LEASE
    finally:
        proxy.kill()  # SIGKILL: no settle, no release, no more renewals
        await proxy.wait()
    killed_at = await store.now()

    # Others are refused while the holds last, and told when they end: one lease at most.
    refused = await store.reserve("next", [COUNTER], 600, tz=UTC, hold_ttl_s=LEASE)
    assert not refused.ok
    (state,) = refused.states
    assert (state.spent, state.held) == (0, 2000)
    assert state.holds_end is not None and state.holds_end <= killed_at + LEASE

    await run_past(store, state.holds_end)
    assert await held(store) == (2000, 0, None)  # every request charged its hold
    assert not (await store.reserve("next", [COUNTER], 501, tz=UTC, hold_ttl_s=LEASE)).ok
    assert (await store.reserve("fits", [COUNTER], 500, tz=UTC, hold_ttl_s=LEASE)).ok
