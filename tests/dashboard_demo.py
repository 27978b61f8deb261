"""The README's dashboard screenshot: the real app with demo data, in headless Chromium.

    .venv/bin/python -m tests.dashboard_demo docs/dashboard.png   # (make dashboard-screenshot)

Four tenants with 90 days of spend history written through the store as settles would
write it (the embedded store on a clock set back for each), windows at about 60 %, 85 %,
past a soft limit and low, a few recent rejections, and two agents and two end users of
acme's today; then the page as an admin sees it at 1280 px, acme's row open.
"""

from __future__ import annotations

import asyncio
import functools
import random
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from playwright.sync_api import expect, sync_playwright

from proxy.config import Settings
from proxy.counters import Counter
from proxy.history import Rejection
from proxy.memory_store import MemoryStore
from proxy.windows import Window
from tests.browser import LiveProxy, launch_chromium
from tests.harness import settings_for

UTC = ZoneInfo("UTC")
ADMIN = "demo-admin-token"
USD = 1_000_000
HOUR_S = 3600
DAY_S = 86_400


class DemoClock:
    """The store's clock: set to a past moment while history is written, then real."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self) -> float:
        return time.time() if self.at is None else self.at


# Each tenant's budget windows (None: tenant-wide; "_default": its default agent's), the
# share of each limit used now, and its typical spend per hour (USD).
WINDOWS: dict[str, list[tuple[str | None, Window]]] = {
    "acme": [(None, Window.DAILY)],
    "globex": [(None, Window.HOURLY), (None, Window.MONTHLY)],
    "initech": [(None, Window.DAILY)],
    "umbrella": [],
}
AGENT_WINDOWS = [("_default", Window.HOURLY), ("_default", Window.DAILY)]
NOW_USED = {"acme": 0.62, "globex": 0.85, "initech": 0.82, "umbrella": 0.12}
SOFT = {"acme": 0.8, "globex": 0.9, "initech": 0.75, "umbrella": 0.8}
RATES = {"acme": 1.1, "globex": 2.0, "initech": 0.45, "umbrella": 0.2}
REJECTED = [
    ("initech", "report-writer", "gpt-4o", "budget_exceeded", ("daily",)),
    ("globex", "support-bot", "gpt-4o-mini", "token_cap_exceeded", ()),
    ("globex", "support-bot", "gpt-4o-mini", "budget_exceeded", ("hourly",)),
    ("acme", "planner", "o3-mini", "concurrency_limit_exceeded", ()),
    ("initech", "report-writer", "gpt-4o", "budget_exceeded", ("daily",)),
]
# Requests of acme's today: (agent, end user, USD).
NAMED = [
    ("planner", "user-1042", 0.42),
    ("writer", "user-2210", 0.18),
    ("planner", "user-2210", 0.25),
]
Limits = dict[tuple[str, str | None, Window], Decimal]


def counters(tenant: str) -> list[Counter]:
    scopes = [*WINDOWS[tenant], *AGENT_WINDOWS]
    return [Counter(tenant, agent, window, 10**12) for agent, window in scopes]


async def seed(store: MemoryStore, clock: DemoClock) -> Limits:
    """90 days of settles per tenant; returns limits that put each window now at its
    tenant's share (``NOW_USED``)."""
    rng = random.Random(11)
    now = time.time()
    rid_of = iter(range(10**9))

    async def spend(tenant: str, at: float, usd: float) -> None:
        clock.at = at
        micros = int(usd * USD)
        rid = f"demo-{next(rid_of)}"
        await store.record(rid, counters(tenant), micros, tz=UTC, hold_ttl_s=60)

    for tenant, rate in RATES.items():
        for day in range(90, 2, -1):  # older days: one settle each
            weekday = time.gmtime(now - day * DAY_S).tm_wday
            factor = 0.35 if weekday >= 5 else 1.0
            await spend(tenant, now - day * DAY_S, rate * 24 * factor * rng.uniform(0.6, 1.3))
        for hour in range(48, -1, -1):  # the last two days hour by hour
            at = now - hour * HOUR_S
            busy = 1.0 if 8 <= time.gmtime(at).tm_hour <= 19 else 0.25
            await spend(tenant, at, rate * busy * rng.uniform(0.5, 1.5))
    clock.at = None
    for agent, user, usd in NAMED:  # held and settled as a proxied request would be
        named = [
            Counter("acme", None, Window.DAILY, 10**12),
            *(Counter("acme", agent, window, 10**12) for _, window in AGENT_WINDOWS),
            Counter("acme", None, Window.DAILY, 10**12, user_id=user),
        ]
        rid = f"demo-{next(rid_of)}"
        held = await store.reserve(rid, named, int(usd * USD), tz=UTC, hold_ttl_s=60)
        await store.settle(rid, held.states, int(usd * USD), hold_ttl_s=60, tz=UTC)
    limits: Limits = {}
    for tenant, share in NOW_USED.items():
        for state in await store.snapshot(counters(tenant), tz=UTC):
            spent = Decimal(state.spent) / USD
            limit = (spent / Decimal(share)).quantize(Decimal("0.01"))
            if state.counter.agent_id is None:
                limits[(tenant, None, state.counter.window)] = limit
    for minutes, (tenant, agent, model, code, windows) in zip(
        (41, 27, 12, 6, 2), REJECTED, strict=True
    ):
        rejection = Rejection(
            time=now - 60 * minutes, agent=agent, model=model, code=code, windows=windows
        )
        await store.note_rejection(tenant, rejection)
    return limits


def demo_settings(upstream_url: str, limits: Limits) -> Settings:
    """Each tenant's own windows at the limits given; the agents' default caps as in the
    test harness (hourly $10 with a soft $8, daily $100); $10 a day per end user."""

    def caps(tenant: str) -> list[dict[str, Any]]:
        out = []
        for _, window in WINDOWS[tenant]:
            hard = limits[(tenant, None, window)]
            soft = (hard * Decimal(SOFT[tenant])).quantize(Decimal("0.01"))
            out.append({"window": window.value, "hard_limit_usd": hard, "soft_limit_usd": soft})
        return out

    tenants = [{"id": t, "api_keys": [f"sk-demo-{t}"], "budget_caps": caps(t)} for t in WINDOWS]
    user_caps = {"budget_caps": [{"window": "daily", "hard_limit_usd": 10}]}
    return settings_for(
        upstream_url,
        auth={"admin_token": ADMIN},
        tenants=tenants,
        cost_caps={"user_caps": user_caps},
    )


def main(out: Path) -> None:
    clock = DemoClock()
    store = MemoryStore(clock=clock)
    limits = asyncio.run(seed(store, clock))
    with (
        LiveProxy(functools.partial(demo_settings, limits=limits), store=store) as proxy,
        sync_playwright() as pw,
    ):
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{proxy.url}/dashboard")
        page.fill("#token", ADMIN)
        page.click("#sign-in-form button[type=submit]")
        expect(page.locator("#chart rect").first).to_be_visible()
        expect(page.locator("#rejections tbody tr")).to_have_count(len(REJECTED))
        acme = page.locator('.tenant[data-tenant="acme"]')
        acme.locator("details.more summary").click()
        expect(acme.locator(".user")).to_have_count(2)
        page.screenshot(path=out, full_page=True)
        browser.close()
    print(f"dashboard screenshot: {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png"))
