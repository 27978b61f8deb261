"""The spend dashboard: how the page is served, then the page itself in headless Chromium.

The browser tests serve the real app (``tests.browser.LiveProxy``) with the embedded store or
a real Redis, drive Debian's Chromium with Playwright, wait on what the page shows (never on
the clock), fail on any console error the test did not expect, and save a screenshot of the
page as it ended in ``$CAPPROXY_SCREENSHOTS`` or a temporary folder (its path is printed).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, expect, sync_playwright

from proxy.config import Settings
from proxy.counters import Counter
from proxy.dashboard import CSP
from proxy.memory_store import MemoryStore
from proxy.redis_store import RedisStore
from proxy.windows import Window
from tests.browser import LiveProxy, launch_chromium
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import OTHER_KEY, TENANT_KEY, chat, settings_for
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "proxy" / "static" / "dashboard"
UTC = ZoneInfo("UTC")
ADMIN = "dash-admin-token"
THIRD_KEY = "sk-initech-test-key"
REFRESH_MS = 300
WAIT_MS = 15_000  # any effect the page shows, on a busy machine
USD = 1_000_000  # micro-USD


def dashboard_settings(upstream_url: str, **over: Any) -> Settings:
    """Three tenants: acme with a tenant-wide daily cap, globex with an hourly one, and
    initech with a rate cap; the agents' default caps, premium-agent's own, a model cap on
    the test model, and a daily cap per end user."""
    return settings_for(
        upstream_url,
        auth={"admin_token": ADMIN},
        tenants=[
            {
                "id": "acme",
                "api_keys": [TENANT_KEY],
                "budget_caps": [{"window": "daily", "hard_limit_usd": 1, "soft_limit_usd": 0.9}],
            },
            {
                "id": "globex",
                "api_keys": [OTHER_KEY],
                "budget_caps": [{"window": "hourly", "hard_limit_usd": 1, "soft_limit_usd": 0.95}],
            },
            {
                "id": "initech",
                "api_keys": [THIRD_KEY],
                "rate_caps": [{"window": "minute", "max_requests": 100}],
            },
        ],
        cost_caps={
            "model_caps": [
                {
                    "name": "frontier",
                    "models": ["test-*"],
                    "budget_caps": [{"window": "daily", "hard_limit_usd": 5}],
                }
            ],
            "user_caps": {"budget_caps": [{"window": "daily", "hard_limit_usd": 2}]},
        },
        **over,
    )


def tenant_counter(tenant: str, window: Window) -> Counter:
    return Counter(tenant, None, window, 1 * USD)


def js_number(value: Decimal) -> str:
    """A decimal as JavaScript writes the number it parses to (for the small amounts here)."""
    return f"{value.normalize():f}"


# --- how the page is served ----------------------------------------------------------------


async def test_the_page_is_served_with_a_strict_policy_and_holds_no_data(
    upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client = await make_client(dashboard_settings(upstream.url))
    resp = await client.get("/dashboard")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"] == CSP
    assert "script-src 'self';" in CSP and "unsafe-inline" not in CSP
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"
    html = await resp.text()
    for tenant in ("acme", "globex", "initech", ADMIN, TENANT_KEY):
        assert tenant not in html
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        resp = await client.get(f"/dashboard/{name}")
        assert (resp.status, resp.content_type) == (200, kind)
        assert resp.headers["Content-Security-Policy"] == CSP
    resp = await client.get("/dashboard/", allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (308, "../dashboard")
    for path in ("/dashboard/index.html", "/dashboard/nope.js", "/dashboard/../proxy/app.py"):
        resp = await client.get(path)
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "unknown_url"
    assert upstream.received == []


def test_the_page_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() -> None:
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", html) == ['<script src="dashboard/dashboard.js" defer>']
    assert re.search(r"<style|\sstyle=|\son[a-z]+=", html) is None
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = (STATIC / name).read_text()
        assert re.search(r"https?://(?!www\.w3\.org/2000/svg)", text) is None, name
    script = (STATIC / "dashboard.js").read_text()
    assert "innerHTML" not in script and "eval(" not in script
    assert 'setAttribute("style"' not in script


def test_the_package_ships_every_file_of_the_page() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["proxy"]
    for path in STATIC.iterdir():
        relative = path.relative_to(REPO / "proxy").as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


# --- in the browser ------------------------------------------------------------------------


@dataclass
class Tab:
    """A browser page with the console errors it logged."""

    page: Page
    url: str = ""
    errors: list[str] = field(default_factory=list)
    api_calls: list[str] = field(default_factory=list)
    # Statuses the test expects the spend API to answer (the browser logs them as errors).
    expected_statuses: set[int] = field(default_factory=set)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def unexpected_errors(self) -> list[str]:
        allowed = re.compile(
            r"Failed to load resource: the server responded with a status of (\d+)"
        )
        out = []
        for text in self.errors:
            match = allowed.match(text)
            if match is None or int(match.group(1)) not in self.expected_statuses:
                out.append(text)
        return out

    def sign_in(self, token: str) -> None:
        self.page.goto(self.url)
        self.page.fill("#token", token)
        self.page.click("#sign-in-form button[type=submit]")

    def tenant(self, tenant_id: str) -> Any:
        return self.page.locator(f'.tenant[data-tenant="{tenant_id}"]')


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """One headless Chromium for the module's browser tests."""
    try:
        chromium = launch_chromium(playwright)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("CAPPROXY_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("dashboard-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"dashboard screenshots: {folder}")
    return folder


@pytest.fixture
def proxy() -> Iterator[LiveProxy]:
    with LiveProxy(dashboard_settings, store=MemoryStore()) as live:
        yield live


@contextlib.contextmanager
def open_tab(browser: Browser, url: str, name: str, folder: Path, **context: Any) -> Iterator[Tab]:
    """A page at 1280 px (unless ``context`` says otherwise) on ``url``'s dashboard; its
    screenshot is saved as ``name``.png on the way out, then its console is checked."""
    ctx = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context})
    page = ctx.new_page()
    page.set_default_timeout(WAIT_MS)
    tab = Tab(page, url=f"{url}/dashboard?refresh={REFRESH_MS}")
    page.on("console", tab.on_console)
    page.on("pageerror", lambda exc: tab.errors.append(f"page error: {exc}"))
    page.on("request", lambda req: tab.api_calls.append(req.url) if "/api/v1/" in req.url else None)
    try:
        yield tab
    finally:
        page.screenshot(path=folder / f"{name}.png", full_page=True)
        ctx.close()
    assert tab.unexpected_errors() == []


@pytest.fixture
def tab(
    browser: Browser, proxy: LiveProxy, screenshots: Path, request: pytest.FixtureRequest
) -> Iterator[Tab]:
    with open_tab(browser, proxy.url, request.node.name, screenshots) as opened:
        yield opened


def test_the_admin_signs_in_and_sees_every_tenant_of_the_caps_file(tab: Tab) -> None:
    tab.page.goto(tab.url)
    expect(tab.page.locator("#sign-in")).to_be_visible()
    expect(tab.page.locator("#board")).to_be_hidden()
    assert tab.api_calls == []  # nothing is read before sign-in
    tab.sign_in(ADMIN)
    rows = tab.page.locator(".tenant")
    expect(rows).to_have_count(3)
    assert [rows.nth(i).get_attribute("data-tenant") for i in range(3)] == [
        "acme",
        "globex",
        "initech",
    ]
    # Each window a bar: acme's own daily cap, then its _default agent's windows.
    windows = tab.tenant("acme").locator(":scope > .windows > .window")
    expect(windows).to_have_count(3)
    expect(windows.first).to_have_attribute("data-window", "daily")
    expect(windows.first).to_have_attribute("data-scope", "tenant")
    expect(windows.first.locator(".reset")).to_contain_text("resets in")
    expect(tab.page.locator("#status")).to_contain_text("Live")
    # The token stays for the tab: a reload signs in again, and signing out forgets it.
    tab.page.reload()
    expect(rows).to_have_count(3)
    tab.page.click("#sign-out")
    expect(tab.page.locator("#sign-in")).to_be_visible()
    assert tab.page.evaluate("sessionStorage.length") == 0


def test_bars_and_the_history_chart_show_what_the_spend_api_reports(
    tab: Tab, proxy: LiveProxy
) -> None:
    tab.sign_in(ADMIN)
    expect(tab.page.locator(".tenant")).to_have_count(3)
    for agent in ("bot", None, None):
        assert proxy.post(chat(max_completion_tokens=50), key=TENANT_KEY, agent=agent) == 200
    assert proxy.post(chat(max_completion_tokens=50), key=OTHER_KEY) == 200

    (acme, globex, _) = proxy.get("/api/v1/tenants", key=ADMIN)["tenants"]
    daily = acme["tenant_windows"][0]
    assert daily["current_spend_usd"] == Decimal("0.00015")  # 3 requests of $0.00005
    bar = tab.tenant("acme").locator('.window[data-scope="tenant"][data-window="daily"]')
    expect(bar).to_have_attribute("data-spend-usd", js_number(daily["current_spend_usd"]))
    expect(bar.locator(".window-text b")).to_have_text("$0.00015")
    expect(bar).to_have_attribute("data-state", "ok")
    for window in acme["windows"]:  # the _default agent's
        agent_bar = tab.tenant("acme").locator(
            f'.window[data-scope="agent _default"][data-window="{window["window"]}"]'
        )
        expect(agent_bar).to_have_attribute(
            "data-spend-usd", js_number(window["current_spend_usd"])
        )
    hourly = globex["tenant_windows"][0]
    expect(tab.tenant("globex").locator('.window[data-scope="tenant"]')).to_have_attribute(
        "data-spend-usd", js_number(hourly["current_spend_usd"])
    )

    for granularity, button in (("hour", "#range-hour"), ("day", "#range-day")):
        tab.page.click(button)
        history = proxy.get(f"/api/v1/costs/history?granularity={granularity}", key=ADMIN)
        expect(tab.page.locator(f'#chart svg[data-range="{granularity}"]')).to_be_visible()
        for series in history["series"]:
            legend = tab.page.locator(f'#chart-legend li[data-tenant="{series["tenant_id"]}"]')
            expect(legend).to_have_attribute("data-total-usd", js_number(series["total_usd"]))
        expect(tab.page.locator('#chart rect[data-tenant="acme"]')).to_have_count(1)
        expect(tab.page.locator('#chart rect[data-tenant="globex"]')).to_have_count(1)
    today = tab.tenant("acme").locator(".tenant-totals .today")
    expect(today).to_have_text("$0.00015")
    # One tenant's series alone.
    tab.page.select_option("#chart-tenant", "globex")
    expect(tab.page.locator("#chart-legend li")).to_have_count(1)
    expect(tab.page.locator('#chart rect[data-tenant="acme"]')).to_have_count(0)


def test_a_tenant_row_expands_to_its_agents_model_caps_and_rate_caps(
    tab: Tab, proxy: LiveProxy
) -> None:
    assert proxy.post(chat(), key=TENANT_KEY, agent="premium-agent") == 200
    assert proxy.post(chat(), key=THIRD_KEY) == 200
    tab.sign_in(ADMIN)
    acme = tab.tenant("acme")
    more = acme.locator("details.more")
    expect(more.locator("summary")).to_contain_text("1 model cap window")
    agent = acme.locator('.agent[data-agent="premium-agent"] .window[data-window="daily"]')
    expect(agent).to_have_count(0)  # read once the row is opened
    more.locator("summary").click()
    expect(more.locator("summary")).to_contain_text("1 agent and 0 end users today")
    expect(agent).to_have_attribute("data-spend-usd", "0.00005")
    expect(agent.locator(".window-name")).to_have_text("daily · agent premium-agent")
    model = acme.locator('.window[data-scope="model frontier"]')
    expect(model).to_have_attribute("data-spend-usd", "0.00005")
    # Still open, and still current, after the next refreshes.
    assert proxy.post(chat(), key=TENANT_KEY, agent="premium-agent") == 200
    expect(agent).to_have_attribute("data-spend-usd", "0.0001")
    requests = tab.tenant("initech").locator('.window[data-unit="requests"]')
    expect(requests).to_have_attribute("data-amount", "1")
    expect(requests.locator(".window-text")).to_contain_text("1 requests of 100 requests")


def test_a_tenant_at_85_percent_shows_the_warning_state(tab: Tab, proxy: LiveProxy) -> None:
    counter = tenant_counter("globex", Window.HOURLY)
    proxy.run(proxy.store.record("seed", [counter], 850_000, tz=UTC, hold_ttl_s=60))
    tab.sign_in(ADMIN)
    bar = tab.tenant("globex").locator('.window[data-scope="tenant"]')
    expect(bar).to_have_attribute("data-state", "warn")
    expect(bar.locator(".window-text")).to_contain_text("85.0 %")
    expect(tab.tenant("globex")).to_have_attribute("data-state", "warn")
    expect(tab.tenant("acme")).to_have_attribute("data-state", "ok")
    # Past the soft limit, then the hard limit, within a refresh each.
    proxy.run(proxy.store.record("seed-2", [counter], 100_000, tz=UTC, hold_ttl_s=60))
    expect(bar).to_have_attribute("data-state", "soft")
    proxy.run(proxy.store.record("seed-3", [counter], 50_000, tz=UTC, hold_ttl_s=60))
    expect(bar).to_have_attribute("data-state", "over")


def test_a_rejected_request_appears_under_recent_rejections(tab: Tab, proxy: LiveProxy) -> None:
    tab.sign_in(ADMIN)
    expect(tab.page.locator("#no-rejections")).to_be_visible()
    too_long = chat(max_completion_tokens=5000)  # over the agents' token cap
    assert proxy.post(too_long, key=TENANT_KEY, agent="bot") == 429
    rows = tab.page.locator("#rejections tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("token_cap_exceeded")
    expect(rows.first).to_contain_text("bot")
    expect(rows.first).to_contain_text("test-model")
    expect(rows.first).to_contain_text("acme")
    # A budget that is spent refuses by its window.
    counter = tenant_counter("acme", Window.DAILY)
    proxy.run(proxy.store.record("spent", [counter], 1 * USD, tz=UTC, hold_ttl_s=60))
    assert proxy.post(chat(), key=TENANT_KEY, agent="planner") == 429
    expect(rows).to_have_count(2)
    expect(rows.first).to_have_attribute("data-code", "budget_exceeded")
    expect(rows.first).to_contain_text("planner")
    expect(rows.first.locator("td").last).to_have_text("daily")
    expect(tab.tenant("acme")).to_have_attribute("data-state", "over")
    assert proxy.get("/api/v1/rejections", key=ADMIN)["rejections"][0]["agent_id"] == "planner"


def test_a_tenant_key_sees_only_its_tenant(tab: Tab, proxy: LiveProxy) -> None:
    tab.expected_statuses = {403}  # the key is not the admin's: /api/v1/tenants says so
    assert proxy.post(chat(), key=TENANT_KEY) == 200
    assert proxy.post(chat(max_completion_tokens=5000), key=TENANT_KEY) == 429
    assert proxy.post(chat(), key=OTHER_KEY) == 200
    tab.sign_in(OTHER_KEY)
    rows = tab.page.locator(".tenant")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-tenant", "globex")
    expect(tab.page.locator("#overview-title")).to_have_text("Tenant")
    expect(tab.page.locator("#chart-legend li")).to_have_count(1)
    expect(tab.page.locator("#no-rejections")).to_be_visible()
    text = tab.page.locator("body").inner_text()
    assert "acme" not in text and "initech" not in text
    assert not any("tenant_id=" in url for url in tab.api_calls)


def test_a_wrong_token_shows_an_error(tab: Tab) -> None:
    tab.expected_statuses = {401}
    tab.sign_in("sk-not-a-key")
    error = tab.page.locator("#sign-in-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("not accepted")
    expect(tab.page.locator("#board")).to_be_hidden()
    assert tab.page.evaluate("sessionStorage.length") == 0


def test_the_page_fits_a_phone_in_dark_mode(
    browser: Browser, proxy: LiveProxy, screenshots: Path
) -> None:
    assert proxy.post(chat(), key=TENANT_KEY) == 200
    phone = {"viewport": {"width": 390, "height": 844}, "color_scheme": "dark"}
    with open_tab(browser, proxy.url, "phone-dark", screenshots, **phone) as tab:
        tab.sign_in(ADMIN)
        expect(tab.page.locator(".tenant")).to_have_count(3)
        expect(tab.page.locator("#chart svg")).to_be_visible()
        width = tab.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
        background = tab.page.evaluate("getComputedStyle(document.body).backgroundColor")
        red, green, blue = (int(v) for v in re.findall(r"\d+", background)[:3])
        assert red + green + blue < 150, background  # dark


def test_the_page_says_when_the_store_is_down_and_recovers(
    browser: Browser, screenshots: Path, redis_server: RedisServer, key_prefix: str
) -> None:
    store = RedisStore.from_url(redis_server.url, prefix=key_prefix, timeout_s=0.25)
    with LiveProxy(dashboard_settings, store=store) as proxy:
        assert proxy.post(chat(), key=TENANT_KEY) == 200
        with open_tab(browser, proxy.url, "store-down", screenshots) as tab:
            tab.expected_statuses = {503}
            tab.sign_in(ADMIN)
            spend = tab.tenant("acme").locator('.window[data-scope="tenant"]')
            expect(spend).to_have_attribute("data-spend-usd", "0.00005")
            expect(tab.page.locator("body")).to_have_attribute("data-store", "up")
            redis_server.stop()
            banner = tab.page.locator("#store-down")
            expect(banner).to_be_visible()
            expect(banner).to_contain_text("The spend store is not answering")
            expect(tab.page.locator("#status")).to_have_text("Store down")
            tab.page.screenshot(path=screenshots / "store-down-banner.png", full_page=True)
            # The last figures stay on the page.
            expect(spend).to_have_attribute("data-spend-usd", "0.00005")
            redis_server.start()
            expect(banner).to_be_hidden()
            expect(tab.page.locator("body")).to_have_attribute("data-store", "up")


def scopes_calls(tab: Tab) -> list[str]:
    return [url for url in tab.api_calls if "/api/v1/scopes" in url]


def expect_windows_as_reported(row: Any, selector: str, scope: str, windows: Any) -> None:
    """Each budget window the spend API reports, as the bar of ``scope`` in ``row`` shows it."""
    assert windows
    for window in windows:
        bar = row.locator(
            f'{selector} .window[data-scope="{scope}"][data-window="{window["window"]}"]'
        )
        expect(bar).to_have_attribute("data-spend-usd", js_number(window["current_spend_usd"]))


def test_an_open_tenant_row_shows_the_agents_and_end_users_of_today_with_their_spend(
    tab: Tab, proxy: LiveProxy
) -> None:
    for agent, user in (("bot", "alice"), ("planner", "bob"), ("bot", "bob")):
        assert proxy.post(chat(user=user), key=TENANT_KEY, agent=agent) == 200
    assert proxy.post(chat(user="carol"), key=OTHER_KEY, agent="globex-bot") == 200
    tab.sign_in(ADMIN)
    acme = tab.tenant("acme")
    expect(acme.locator(".window").first).to_be_visible()
    assert scopes_calls(tab) == []  # nothing is read for a closed row
    acme.locator("details.more summary").click()
    summary = acme.locator("details.more summary")
    expect(summary).to_contain_text("2 agents and 2 end users today")
    seen = proxy.get("/api/v1/scopes?tenant_id=acme", key=ADMIN)
    assert (seen["agents"], seen["users"]) == (["bot", "planner"], ["alice", "bob"])
    for agent_id in seen["agents"]:
        snap = proxy.get(f"/api/v1/costs/current?tenant_id=acme&agent_id={agent_id}", key=ADMIN)
        selector = f'.agent[data-agent="{agent_id}"]'
        expect_windows_as_reported(acme, selector, f"agent {agent_id}", snap["windows"])
    for user_id in seen["users"]:
        snap = proxy.get(f"/api/v1/costs/current?tenant_id=acme&user_id={user_id}", key=ADMIN)
        assert snap["user_windows"][0]["current_spend_usd"] > 0
        selector = f'.user[data-user="{user_id}"]'
        expect_windows_as_reported(acme, selector, f"user {user_id}", snap["user_windows"])
    bob = acme.locator('.user[data-user="bob"] .window[data-window="daily"]')
    expect(bob.locator(".window-name")).to_have_text("daily · user bob")
    expect(bob).to_have_attribute("data-spend-usd", "0.0001")  # two requests
    expect(acme.locator(".user")).to_have_count(2)
    expect(acme.locator(".and-more")).to_have_count(0)
    # Still current after the next refreshes; another tenant's users stay in its row.
    assert proxy.post(chat(user="bob"), key=TENANT_KEY, agent="planner") == 200
    expect(bob).to_have_attribute("data-spend-usd", "0.00015")
    expect(tab.tenant("globex").locator(".user")).to_have_count(0)
    # Closed again, the row is no longer read.
    summary.click()
    expect(acme.locator(".user")).to_have_count(0)
    tab.api_calls.clear()
    for _ in range(2):  # two refreshes that began after it closed
        with tab.page.expect_request("**/api/v1/rejections"):
            pass
    assert scopes_calls(tab) == []


def test_an_open_row_lists_twenty_agents_and_end_users_and_says_how_many_more(
    tab: Tab, proxy: LiveProxy
) -> None:
    for i in range(22):
        assert proxy.post(chat(user=f"user-{i:02d}"), key=TENANT_KEY, agent=f"agent-{i:02d}") == 200
    tab.sign_in(ADMIN)
    acme = tab.tenant("acme")
    acme.locator("details.more summary").click()
    expect(acme.locator("details.more summary")).to_contain_text("22 agents and 22 end users")
    expect(acme.locator(".agent")).to_have_count(20)
    expect(acme.locator(".user")).to_have_count(20)
    expect(acme.locator(".agent").last).to_have_attribute("data-agent", "agent-19")
    expect(acme.locator('.and-more[data-kind="agent"]')).to_have_text("and 2 more agents")
    expect(acme.locator('.and-more[data-kind="end user"]')).to_have_text("and 2 more end users")


def test_a_tenant_keys_open_row_shows_its_own_agents_and_end_users(
    tab: Tab, proxy: LiveProxy
) -> None:
    tab.expected_statuses = {403}  # the key is not the admin's: /api/v1/tenants says so
    for agent, user in (("bot", "alice"), ("planner", "bob")):
        assert proxy.post(chat(user=user), key=TENANT_KEY, agent=agent) == 200
    assert proxy.post(chat(user="carol"), key=OTHER_KEY, agent="globex-bot") == 200
    tab.sign_in(TENANT_KEY)
    acme = tab.tenant("acme")
    acme.locator("details.more summary").click()
    for agent_id in ("bot", "planner"):
        snap = proxy.get(f"/api/v1/costs/current?agent_id={agent_id}", key=TENANT_KEY)
        selector = f'.agent[data-agent="{agent_id}"]'
        expect_windows_as_reported(acme, selector, f"agent {agent_id}", snap["windows"])
    for user_id in ("alice", "bob"):
        snap = proxy.get(f"/api/v1/costs/current?user_id={user_id}", key=TENANT_KEY)
        selector = f'.user[data-user="{user_id}"]'
        expect_windows_as_reported(acme, selector, f"user {user_id}", snap["user_windows"])
    expect(acme.locator(".agent")).to_have_count(2)
    expect(acme.locator(".user")).to_have_count(2)
    assert scopes_calls(tab)
    assert not any("tenant_id=" in url for url in tab.api_calls)
    text = tab.page.locator("body").inner_text()
    assert "globex" not in text and "carol" not in text
