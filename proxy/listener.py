"""The listening socket's limits: how many connections, how long a request head may take.

    serve(app, limits=Limits(max_connections=4000, header_timeout_s=10, keepalive_s=75),
          host="0.0.0.0", port=8080)   # until SIGINT/SIGTERM

Past ``max_connections`` a new connection first takes the place of the oldest idle one
(a keep-alive connection waiting for its next request, with nothing of it sent yet), so
a flood of idle connections never locks out a health check or a real client; when every
connection is busy with a request, the new one is closed at once. The limit keeps file
descriptors for the upstream and the store: ``raise_open_files_limit`` lifts the soft
``RLIMIT_NOFILE`` to the hard one at startup, and the limit should stay well below it.

A request head (request line and headers) must arrive whole within ``header_timeout_s``
of its first byte, or the connection is closed (a slow-loris client holds nothing for
long); a connection with no request yet, or idle between requests, is closed after
``keepalive_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import sys
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import GracefulExit

__all__ = ["Limits", "raise_open_files_limit", "serve", "start", "tune_interpreter"]

# The youngest generation's threshold: a request makes and drops a few hundred objects,
# so at Python's default (700) the collector ran every other request or so.
GC_YOUNG_THRESHOLD = 10_000
# How long a thread that wants the interpreter lock waits before the holder must let go
# (Python's default: 5 ms). A worker sizing a large prompt then holds up the event loop
# for at most about this long at a time.
SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True, slots=True)
class Limits:
    """What one listener allows (``server.max_connections`` and the two timeouts)."""

    max_connections: int
    header_timeout_s: float
    keepalive_s: float


def raise_open_files_limit() -> tuple[int, int]:
    """Lift the soft limit on open files to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


class _Connection(RequestHandler):
    """aiohttp's connection handler, with a deadline for each request head."""

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._head_timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """Waiting for a request of which nothing has arrived yet."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and self._head_timer is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if isinstance(manager, _Server) and not manager.admit(self):
            self.force_close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():  # part of a request head
            if self._head_timer is None:
                self._head_timer = self._loop.call_later(
                    self._limits.header_timeout_s, self._head_late
                )
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class _Server(web.Server):
    """aiohttp's server, making ``_Connection``s and holding them to ``limits``."""

    limits: Limits

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)

    def admit(self, new: _Connection) -> bool:
        """Room for ``new``: under the limit, or in place of the oldest idle connection."""
        if len(self._connections) <= self.limits.max_connections:
            return True
        for handler in self._connections:
            if handler is not new and isinstance(handler, _Connection) and handler.idle:
                handler.force_close()
                return True
        return False


class _Runner(web.AppRunner):
    def __init__(self, app: web.Application, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_s, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The server as aiohttp built it (handler arguments, access log), held to limits.
        server.__class__ = _Server
        assert isinstance(server, _Server)
        server.limits = self.limits
        return server


async def start(
    app: web.Application, *, limits: Limits, host: str, port: int, handle_signals: bool = True
) -> web.AppRunner:
    """Start serving ``app``; the caller stops it with ``await runner.cleanup()``."""
    # In-flight requests are drained by the app's on_shutdown; shutdown_timeout is a backstop.
    runner = _Runner(
        app, limits=limits, access_log=None, handle_signals=handle_signals, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def tune_interpreter() -> None:
    """Once the app is up: what start-up built (modules, settings, pools) is moved out of
    the cyclic collector's sight (``gc.freeze``), and the youngest generation is collected
    less often (measured: about 5 % of a request's instructions went to the collector);
    threads contending for the interpreter lock switch within a millisecond."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)
    sys.setswitchinterval(SWITCH_INTERVAL_S)


async def _serve(app: web.Application, limits: Limits, host: str, port: int) -> None:
    runner = await start(app, limits=limits, host=host, port=port)
    tune_interpreter()
    try:
        await asyncio.Event().wait()  # until SIGINT/SIGTERM end the loop
    finally:
        await runner.cleanup()


def serve(
    app: web.Application,
    *,
    limits: Limits,
    host: str,
    port: int,
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, then shut it down (as ``web.run_app`` does)."""
    loop = loop or asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, limits, host, port))
    try:
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():  # the app's shutdown and cleanup run here
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            if rest:
                loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()
