"""The dashboard's browser set-up: the real app served on loopback from a thread of its own,
and Debian's headless Chromium driven by Playwright.

    with LiveProxy(settings_for_upstream, store=MemoryStore()) as proxy:
        proxy.post(chat(), key=TENANT_KEY)             # a proxied request, synchronously
        proxy.get("/api/v1/tenants", key=ADMIN)        # (status, JSON) from the spend API
        proxy.run(store.record(...))                   # a coroutine on the proxy's loop
        browser = launch_chromium(playwright)          # fails, saying why, without chromium

The proxy and its fake upstream run on an event loop in a thread of their own, so that
the tests drive the browser with Playwright's synchronous API (which cannot run inside an
event loop) while the proxy answers the page. Playwright never downloads a browser here:
it starts ``/usr/bin/chromium`` (``CAPPROXY_CHROMIUM`` to use another), which ``make dev``
installs from Debian's packages.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from playwright.sync_api import Browser, Playwright

from proxy.app import create_app
from proxy.config import Settings
from proxy.counters import Store
from tests.fake_upstream import FakeUpstream

CHROMIUM = Path(os.environ.get("CAPPROXY_CHROMIUM", "/usr/bin/chromium"))
START_TIMEOUT_S = 60.0

T = TypeVar("T")


def launch_chromium(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless; a clear failure when it is not installed."""
    if not CHROMIUM.is_file():
        raise RuntimeError(
            f"Chromium not found at {CHROMIUM}: the dashboard's browser tests need Debian's "
            "'chromium' package (make dev installs it: apt-get install -y chromium), or "
            "CAPPROXY_CHROMIUM set to a Chromium binary."
        )
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)


class LiveProxy:
    """The app and a fake upstream, served on loopback by an event loop in a thread."""

    def __init__(self, settings_for: Callable[[str], Settings], *, store: Store) -> None:
        self._settings_for = settings_for
        self.store = store
        self.upstream = FakeUpstream()
        self.url = ""  # the proxy's base URL, once started
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-proxy")
        self._runners: list[web.AppRunner] = []

    def __enter__(self) -> LiveProxy:
        self._thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            try:
                self.run(self._stop())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=30)
        self._loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = START_TIMEOUT_S) -> T:
        """Run ``coro`` on the proxy's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, handler_cancellation=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _start(self) -> None:
        upstream_url = await self._serve(self.upstream.app())
        self.upstream.url = upstream_url + "/v1"
        settings = self._settings_for(self.upstream.url)
        self.url = await self._serve(create_app(settings, store=self.store))

    async def _stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()

    # --- calls, from the test's thread ----------------------------------------------------

    def request(
        self, method: str, path: str, *, key: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """(status, JSON body) of one call, with fractions read as ``Decimal``."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read()
        return status, json.loads(text, parse_float=Decimal)

    def get(self, path: str, *, key: str) -> Any:
        status, body = self.request("GET", path, key=key)
        assert status == 200, (path, body)
        return body

    def post(self, body: dict[str, Any], *, key: str, agent: str | None = None) -> int:
        """A proxied chat completion; returns its status."""
        path = "/v1/chat/completions"
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        req.add_header("Authorization", f"Bearer {key}")
        req.add_header("Content-Type", "application/json")
        if agent is not None:
            req.add_header("X-Agent-Id", agent)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
                return int(resp.status)
        except urllib.error.HTTPError as err:
            err.read()
            return err.code
