"""Wiring: the only place that picks concrete classes and owns long-lived resources.

app = create_app(settings)                       # store from settings.store.url
app = create_app(settings, store=MemoryStore())  # tests inject their own
run(settings, config_path=path)                  # serve until SIGINT/SIGTERM
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from proxy import handlers, spend
from proxy.config import Settings
from proxy.endpoints import Endpoint
from proxy.errors import InternalError, MethodNotAllowed, NotFound, ProxyError
from proxy.ledger import Ledger
from proxy.state import LEDGER, RUNTIME, SESSION, Runtime, RuntimeRef
from proxy.store import MemoryStore, RedisStore, Store
from proxy.upstream import new_session

log = logging.getLogger("capproxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)


def error_response(error: ProxyError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as an OpenAI error body; nothing else ever reaches a client."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return error_response(exc)
    except web.HTTPNotFound:
        return error_response(NotFound(f"Unknown request URL: {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return error_response(
            MethodNotAllowed(f"Method {request.method} is not allowed for {request.path}")
        )
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(InternalError("The proxy failed to handle the request."))


def open_store(settings: Settings) -> Store:
    url = settings.store.url.get_secret_value()
    timeout_s = settings.store.timeout_ms / 1000
    if url.startswith("memory://"):
        log.warning("store: memory:// keeps spend in this process only (not shared, not durable)")
        return MemoryStore()
    return RedisStore.from_url(url, timeout_s=timeout_s)


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    runtime = await asyncio.get_running_loop().run_in_executor(None, Runtime.build, settings)
    app[RUNTIME] = RuntimeRef(runtime)
    yield


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    session = new_session()
    app[SESSION] = session
    try:
        yield
    finally:
        await session.close()


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE] if STORE in app else open_store(app[SETTINGS])
    ledger = Ledger(store, fail_open=app[SETTINGS].store.on_error == "fail_open")
    app[LEDGER] = ledger
    retries = asyncio.create_task(ledger.retry_loop(), name="capproxy-settle-retries")
    try:
        yield
    finally:
        retries.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await retries
        await ledger.drain(timeout_s=5)
        await store.aclose()


def create_app(settings: Settings, *, store: Store | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=2**40)
    app[SETTINGS] = settings
    if store is not None:
        app[STORE] = store
    app.cleanup_ctx.extend([_runtime_ctx, _session_ctx, _ledger_ctx])
    app.router.add_get("/healthz", handlers.healthz)
    spend.add_routes(app)
    app.router.add_get("/v1/models", handlers.models)
    metered = "|".join(re.escape(e.value) for e in Endpoint)
    app.router.add_post(f"/v1/{{path:(?:{metered})}}", handlers.metered)
    return app


def run(settings: Settings, *, config_path: Path | None) -> None:
    """Serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if config_path is not None:
        log.info("capproxy: loaded caps file %s", config_path)
    if not any(u.api_key for u in settings.upstreams) and settings.auth.mode == "keys":
        log.warning("no upstream api_key is set (e.g. OPENAI_API_KEY): upstreams may refuse")
    web.run_app(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_grace_s,
        print=lambda msg: log.info("%s", msg),
    )
