"""Wiring: the only place that picks concrete classes and owns long-lived resources.

app = create_app(settings)                       # store from settings.store.url
app = create_app(settings, store=MemoryStore())  # tests inject their own
run(settings, config_path=path)                  # serve until SIGINT/SIGTERM
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from pydantic import SecretStr

from proxy import dashboard, handlers, logs, spend
from proxy.alerts import Alerter
from proxy.config import Settings
from proxy.counters import Store
from proxy.endpoints import Endpoint
from proxy.errors import (
    InternalError,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    StoreUnavailable,
)
from proxy.journal import Journal, journal_files
from proxy.ledger import Ledger
from proxy.listener import Limits, raise_open_files_limit, serve
from proxy.logs import log_event
from proxy.memory_store import MemoryStore
from proxy.metrics import Metrics
from proxy.redis_store import RedisStore
from proxy.reload import Reloader
from proxy.state import (
    ALERTER,
    JOURNAL,
    LEDGER,
    LIFECYCLE,
    METRICS,
    RUNTIME,
    SESSION,
    UPSTREAM,
    Lifecycle,
    Runtime,
    RuntimeRef,
)
from proxy.upstream import UpstreamClient

log = logging.getLogger("capproxy")

# Open files kept for upstream and store connections, journal and logs, beyond clients'.
FD_RESERVE = 256

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
CONFIG_PATH = web.AppKey("config_path", Path)


def error_response(error: ProxyError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def guarded(handler: Handler) -> Handler:
    """``handler`` with its request's task tracked, so that shutdown can wait for it and
    then cut it, and every error rendered as an OpenAI error body: nothing else ever
    reaches a client. Each route's handler is wrapped, rather than the app given a
    middleware: with none, aiohttp calls a route's handler directly, not through a chain."""

    @functools.wraps(handler)
    async def guard(request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        inflight = request.app[LIFECYCLE].inflight
        if task is not None:
            inflight.add(task)
        try:
            return await handler(request)
        except ProxyError as exc:
            return error_response(exc)
        except web.HTTPNotFound:
            return error_response(NotFound(_unknown_url(request)))
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(InternalError("The proxy failed to handle the request."))
        finally:
            if task is not None:
                inflight.discard(task)

    return guard


def _unknown_url(request: web.Request) -> str:
    return f"Unknown request URL: {request.method} {request.path}"


async def unrouted(request: web.Request) -> web.StreamResponse:
    """Any method on any path no other route takes (the last route): 405 with the methods
    a route has for this path, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        match, methods = await resource.resolve(request)
        if match is None:  # (the one resource that matches: this catch-all)
            allowed |= methods
    if allowed:
        raise MethodNotAllowed(
            f"Method {request.method} is not allowed for {request.path}",
            headers={"Allow": ", ".join(sorted(allowed))},
        )
    raise NotFound(_unknown_url(request))


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def open_store(settings: Settings) -> Store:
    url = settings.store.url.get_secret_value()
    timeout_s = settings.store.timeout_ms / 1000
    if url.startswith("memory://"):
        log_event(
            "store",
            kind="memory",
            note="spend is kept in this process only: not shared, not durable",
        )
        return MemoryStore()
    config = settings.store
    sentinel = config.sentinel
    log_event(
        "store",
        kind="redis",
        mode=config.mode,
        timeout_ms=config.timeout_ms,
        max_connections=config.max_connections,
    )
    return RedisStore.from_url(
        url,
        timeout_s=timeout_s,
        mode=config.mode,
        sentinels=sentinel.nodes if sentinel else (),
        service_name=sentinel.service_name if sentinel else "",
        sentinel_password=_secret(sentinel.password) if sentinel else None,
        max_connections=config.max_connections,
    )


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    runtime = await asyncio.get_running_loop().run_in_executor(None, Runtime.build, settings)
    app[RUNTIME] = RuntimeRef(runtime)
    yield


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    client = UpstreamClient()
    app[UPSTREAM] = client
    # Webhooks only: no cookies, no proxies from the environment.
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
    app[SESSION] = session
    try:
        yield
    finally:
        await session.close()
        await client.close()


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE] if STORE in app else open_store(app[SETTINGS])
    if isinstance(store, RedisStore):
        # Opens the script connections before the first request (a store that is down
        # is logged here once, and the proxy starts anyway: /readyz says so).
        with contextlib.suppress(StoreUnavailable):
            await store.ping()
    ledger = Ledger(store, fail_open=app[SETTINGS].store.on_error == "fail_open")
    app[LEDGER] = ledger
    app[METRICS].set_pending_settles(lambda: ledger.pending)
    retries = asyncio.create_task(ledger.retry_loop(), name="capproxy-settle-retries")
    try:
        yield
    finally:
        await _stop(retries)
        await ledger.drain(timeout_s=max(5.0, app[SETTINGS].server.shutdown_grace_s))
        await store.aclose()


async def _alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    # Alerts are claimed in the shared store, so N replicas send each crossing once.
    alerter = Alerter(app[SESSION], app[SETTINGS].alerts, claim=app[LEDGER].store.claim)
    app[ALERTER] = alerter
    task = asyncio.create_task(alerter.run(), name="capproxy-alerts")
    try:
        yield
    finally:
        await _stop(task)
        await alerter.drain(timeout_s=5)


async def _continuity_ctx(app: web.Application) -> AsyncIterator[None]:
    """Spend the store lost: each replica watches for it, says so once, and refuses the
    affected tenants (``store.on_data_loss: fail_closed``) or goes on from zero."""
    store = app[LEDGER].store
    if not isinstance(store, RedisStore):
        yield
        return
    settings = app[SETTINGS]
    metrics, alerter = app[METRICS], app[ALERTER]

    def lost(tenant: str | None, detail: str) -> None:
        log_event(
            "store_data_lost",
            level=logging.ERROR,
            tenant=tenant or "*",
            detail=detail,
            policy=settings.store.on_data_loss,
        )
        metrics.data_lost(whole_store=tenant is None)
        alerter.observe_data_loss(tenant)

    store.data_loss_policy = settings.store.on_data_loss
    store.on_data_loss = lost
    history = settings.journal is not None and any(
        path.stat().st_size > 0 for path in journal_files(settings.journal.path)
    )
    if maxmemory_policy := await _eviction_policy(store):
        log_event(
            "store_warning",
            level=logging.WARNING,
            detail=f"maxmemory-policy is {maxmemory_policy}: Redis may evict budget counters "
            "(set maxmemory-policy noeviction)",
        )
    task = asyncio.create_task(store.watch(has_history=history), name="capproxy-store-watch")
    try:
        yield
    finally:
        await _stop(task)


async def _eviction_policy(store: RedisStore) -> str | None:
    """The store's ``maxmemory-policy`` when it can evict keys (None: noeviction, or it
    cannot be read, as on managed Redis that hides CONFIG)."""
    try:
        policy = await store.config_value("maxmemory-policy")
    except StoreUnavailable:
        return None
    return policy if policy not in (None, "noeviction") else None


async def _journal_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[SETTINGS].journal
    if config is None:
        app[JOURNAL] = None
        yield
        return
    journal = Journal(config.path, max_bytes=config.max_bytes)
    await journal.start()
    app[JOURNAL] = journal
    try:
        yield
    finally:
        await journal.aclose()


async def _reload_ctx(app: web.Application) -> AsyncIterator[None]:
    if CONFIG_PATH not in app:
        yield
        return
    path = app[CONFIG_PATH]
    metrics = app[METRICS]
    reloader = Reloader(
        path,
        app[RUNTIME],
        on_result=lambda ok: metrics.reload_ok() if ok else metrics.reload_failed(),
    )
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(reloader.run(), name="capproxy-reload")
    hup = threading.current_thread() is threading.main_thread()
    if hup:
        loop.add_signal_handler(signal.SIGHUP, reloader.trigger)
    try:
        yield
    finally:
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        await _stop(task)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _on_shutdown(app: web.Application) -> None:
    # The listener is closed by now; requests in flight get the grace period, then are cut.
    grace_s = app[SETTINGS].server.shutdown_grace_s
    log_event("shutdown", grace_s=grace_s, in_flight=len(app[LIFECYCLE].inflight))
    cut = await app[LIFECYCLE].drain(grace_s)
    if cut:
        log_event("shutdown_cut", level=logging.WARNING, requests=cut)


def create_app(
    settings: Settings, *, store: Store | None = None, config_path: Path | None = None
) -> web.Application:
    app = web.Application(client_max_size=2**40)
    app[SETTINGS] = settings
    if config_path is not None:
        app[CONFIG_PATH] = config_path
    app[LIFECYCLE] = Lifecycle()
    if store is not None:
        app[STORE] = store
    app[METRICS] = Metrics(
        known_tenants=lambda: app[RUNTIME].current.tenant_ids,
        known_agents=lambda: app[RUNTIME].current.agent_ids,
        is_known_model=lambda model: model in app[RUNTIME].current.model_names,
    )
    app.cleanup_ctx.extend(
        [
            _runtime_ctx,
            _session_ctx,
            _journal_ctx,
            _ledger_ctx,
            _alerts_ctx,
            _continuity_ctx,
            _reload_ctx,
        ]
    )
    app.on_shutdown.append(_on_shutdown)
    metered = "|".join(re.escape(e.value) for e in Endpoint)
    routes = [
        web.get("/healthz", handlers.healthz),
        web.get("/readyz", handlers.readyz),
        web.get("/metrics", handlers.metrics),
        *spend.routes(),
        *dashboard.routes(),
        web.get("/v1/models", handlers.models),
        web.post(f"/v1/{{path:(?:{metered})}}", handlers.metered),
    ]
    for route in routes:
        handler = route.handler
        if isinstance(handler, type):  # a class-based view: none here
            raise TypeError(f"route {route.path}: a view class cannot be guarded")
        app.router.add_routes(
            [web.RouteDef(route.method, route.path, guarded(handler), route.kwargs)]
        )
    app.router.add_route("*", "/{tail:.*}", guarded(unrouted))  # last: every other path
    return app


def new_event_loop(kind: str = "uvloop") -> asyncio.AbstractEventLoop:
    """uvloop's event loop (a dependency wherever it builds: about 10 % less CPU per
    request in ``make bench``), or asyncio's when ``kind`` is ``asyncio`` or uvloop is
    missing."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log_event(
                "startup_warning",
                level=logging.WARNING,
                detail="uvloop is not installed: serving on asyncio's event loop",
            )
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(settings: Settings, *, config_path: Path | None) -> None:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads the caps file."""
    logs.setup(os.environ.get("CAPPROXY_LOG_LEVEL", "INFO"))
    if not any(u.api_key for u in settings.upstreams) and settings.auth.mode == "keys":
        log_event(
            "startup_warning",
            level=logging.WARNING,
            detail="no upstream api_key is set (e.g. OPENAI_API_KEY): upstreams may refuse",
        )
    soft, hard = raise_open_files_limit()
    loop = new_event_loop(os.environ.get("CAPPROXY_EVENT_LOOP", "uvloop"))
    server = settings.server
    log_event(
        "startup",
        config=str(config_path) if config_path else None,
        host=server.host,
        port=server.port,
        tenants=len(settings.tenants),
        upstreams=len(settings.upstreams),
        max_connections=server.max_connections,
        open_files_limit=soft,
        event_loop=type(loop).__module__.partition(".")[0],
    )
    if server.max_connections + FD_RESERVE > soft:
        log_event(
            "startup_warning",
            level=logging.WARNING,
            detail=f"server.max_connections ({server.max_connections}) leaves fewer than "
            f"{FD_RESERVE} of the {soft} open files (nofile) for upstream and store "
            f"connections; lower it or raise nofile (hard limit {hard})",
        )
    limits = Limits(
        max_connections=server.max_connections,
        header_timeout_s=server.request_header_timeout_s,
        keepalive_s=server.keepalive_timeout_s,
    )
    serve(
        create_app(settings, config_path=config_path),
        limits=limits,
        host=server.host,
        port=server.port,
        loop=loop,
    )
    log_event("stopped")
