"""Sending a request to the configured upstream: HTTP/1.1 over pooled keep-alive connections.

    client = UpstreamClient()
    async with await send(client, upstream, "chat/completions", method="POST",
                          headers=hdrs, body=raw) as resp:
        data = await read_body(resp, upstream, limit=limit)    # or: resp.read_any() per chunk
    await client.close()

The URL and key come only from the caps file; redirects are never followed (a 3xx is
relayed as it is). Failures become ``UpstreamError`` (502) and timeouts ``UpstreamTimeout``
(504), with ``sent=False`` only when the request never reached the upstream (no
connection). One deadline (``upstream.timeout_s``) bounds the whole exchange, a stream's
last byte included; ``connect_timeout_s`` bounds opening a connection.

The client does what one proxy needs and nothing else, because it runs twice per request
(a response parsed by ``httptools``, one write per request, one timer per exchange): no
cookies, no proxies from the environment, no redirects, no retries (a POST that may have
reached the upstream is never sent twice). Bodies are asked for uncompressed; a gzip or
deflate body is decompressed anyway, any other coding is a broken response.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamTooLarge

# Reading from the upstream pauses while this much of its body waits for the proxy.
HIGH_WATER = 256 * 1024
# A connection idle this long is closed instead of reused (servers close theirs at 60 s
# and more; closing first avoids sending on a connection the server is closing).
KEEPALIVE_S = 30.0
# Idle connections kept per upstream (more are closed when released).
MAX_IDLE = 1024
# Most bytes one decompression step may produce (a small compressed chunk can be huge).
INFLATE_STEP = 256 * 1024


class ResponseBroken(Exception):
    """The upstream's response broke off, or is not HTTP/1.1 the proxy can read."""


class _Target:
    """Where an upstream's requests go: made once per base URL."""

    __slots__ = ("host", "key", "netloc", "path", "port", "ssl")

    def __init__(self, base_url: str, tls: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        secure = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if secure else 80)
        default = self.port == (443 if secure else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.netloc = host if default else f"{host}:{self.port}"
        self.path = parts.path.rstrip("/")
        self.ssl = (tls or _tls()) if secure else None
        self.key = (parts.scheme, self.host, self.port)


_TLS: list[ssl.SSLContext] = []


def _tls() -> ssl.SSLContext:
    """The system's trust store, verified (made once: loading it is slow)."""
    if not _TLS:
        _TLS.append(ssl.create_default_context())
    return _TLS[0]


class Response:
    """One upstream response: status and headers at once, the body as it arrives."""

    __slots__ = ("_conn", "content_length", "headers", "status")

    def __init__(self, conn: _Connection, status: int, headers: CIMultiDictProxy[str]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    def read_any(self) -> Coroutine[Any, Any, bytes]:
        """The body's bytes that have arrived (waits for some); ``b""`` at its end.
        Raises ``ResponseBroken``, ``ConnectionError`` or ``TimeoutError``. (The
        connection's own coroutine: no frame of its own per read.)"""
        return self._conn.read_any()

    def release(self) -> None:
        """Done with the response: its connection is kept for the next request when the
        body was read to its end, else closed. Once only: the connection may serve
        another request since."""
        if self._conn.serves(self):
            self._conn.release()

    def close(self) -> None:
        """Close the connection (the upstream sees the client gone)."""
        if self._conn.serves(self):
            self._conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection to an upstream, one exchange at a time."""

    def __init__(self, pool: UpstreamClient, key: tuple[str, str, int]) -> None:
        self._pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self.idle_since = 0.0
        self._busy = False
        self._closed = False
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._framed = False  # the body's end is known from Content-Length or chunks
        self._response: Response | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._inflate: zlib._Decompress | None = None
        self._tail = b""  # compressed bytes not yet decompressed
        self._keep = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have asyncio.Transport's methods, not its class.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._done:  # nothing asked for: a server out of turn
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ResponseBroken("the upstream switched protocols"))
        except httptools.HttpParserError:
            self._fail(ResponseBroken("the upstream sent a malformed HTTP response"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._pool.forget(self)
        if self._busy and not self._done:
            if self._response is not None and not self._framed and exc is None:
                self.on_message_complete()  # a body that ends with the connection
            else:
                self._fail(ConnectionResetError("the upstream closed the connection"))

    def pause_writing(self) -> None:
        pass  # the request is in memory already: the transport buffers it

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._done:  # a second response to one request: not this connection's to keep
            self._closed = True

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp reads them: UTF-8, any other byte kept as it came.
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        if self._done:
            return
        status = self._parser.get_status_code()
        if status < 200:  # 1xx: an interim response, the real one follows
            self._headers = []
            return
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        self._status = status
        self._framed = (
            "Content-Length" in headers or "chunked" in headers.get("Transfer-Encoding", "").lower()
        )
        coding = headers.get("Content-Encoding", "identity").strip().lower()
        if coding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS)
        elif coding not in ("identity", ""):
            self._fail(ResponseBroken(f"the upstream's Content-Encoding '{coding[:32]}'"))
            return
        self._response = Response(self, status, headers)
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._status < 200 or self._done:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._status < 200 or self._done:
            return
        self._done = True
        self._keep = self._parser.should_keep_alive()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    # -- the exchange

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self.transport is not None:
            self.transport.abort()
        self._closed = True
        self._wake()

    def _expire(self) -> None:
        self._timer = None
        if not self._done:
            self._fail(TimeoutError("the upstream took longer than its timeout"))

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def exchange(self, head: bytes, body: bytes | None, timeout_s: float) -> Response:
        """Send a request; the response once its headers are in."""
        transport = self.transport
        assert transport is not None
        self._busy = True
        self._timer = self._loop.call_later(timeout_s, self._expire)
        if body:
            transport.writelines((head, body))
        else:
            transport.write(head)
        while self._response is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._response

    async def read_any(self) -> bytes:
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks = []
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                if self._inflate is None:
                    return data
                self._tail += data
            if self._inflate is not None:
                out = self._inflated()
                if out:
                    return out
                if self._tail:
                    continue  # more output is due from what has arrived
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            # _wait, inline: once per event of a stream.
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _inflated(self) -> bytes:
        """What the decompressor gives for the compressed bytes received so far (at most
        ``INFLATE_STEP`` at a time), and what it held back once the body is complete."""
        inflate = self._inflate
        assert inflate is not None
        try:
            out = inflate.decompress(self._tail, INFLATE_STEP)
            self._tail = inflate.unconsumed_tail
            if not out and not self._tail and self._done and not self._chunks:
                out = inflate.flush()
                self._inflate = None
        except zlib.error as exc:
            self._fail(ResponseBroken("the upstream's compressed body is corrupt"))
            raise ResponseBroken("the upstream's compressed body is corrupt") from exc
        return out

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        keep = (
            self._done
            and self._error is None
            and not self._closed
            and not self._chunks
            and self._keep
        )
        self._busy = False
        self._reset()
        if keep:
            self._pool.keep(self)
        else:
            self.close()

    def serves(self, response: Response) -> bool:
        return self._response is response

    def closing(self) -> bool:
        return self._closed or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamClient:
    """Keep-alive connections to the upstreams, reused most recent first."""

    def __init__(
        self,
        *,
        keepalive_s: float = KEEPALIVE_S,
        max_idle: int = MAX_IDLE,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._tls = tls  # None: the system's trust store
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._keepalive_s = keepalive_s
        self._max_idle = max_idle
        self._sweeper: asyncio.TimerHandle | None = None
        self.opened = 0  # connections opened, ever (for tests and benchmarks)

    def target(self, base_url: str) -> _Target:
        found = self._targets.get(base_url)
        if found is None:
            found = self._targets[base_url] = _Target(base_url, self._tls)
        return found

    async def connect(self, target: _Target, timeout_s: float) -> _Connection:
        """An idle connection to ``target``, or a new one (``OSError``, ``ssl.SSLError``,
        ``TimeoutError`` when none can be opened)."""
        idle = self._idle.get(target.key)
        if idle:
            oldest = asyncio.get_running_loop().time() - self._keepalive_s
            while idle:
                conn = idle.pop()
                if conn.idle_since > oldest and not conn.closing():
                    return conn
                conn.close()
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            _, conn = await loop.create_connection(
                lambda: _Connection(self, target.key),
                target.host,
                target.port,
                ssl=target.ssl,
                server_hostname=target.host if target.ssl else None,
            )
        self.opened += 1
        return conn

    def keep(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self._max_idle:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._keepalive_s, self._sweep)

    def forget(self, conn: _Connection) -> None:
        """Drop a closed connection from the idle lists."""
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive time (oldest first in each list)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self._keepalive_s
        left = False
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= oldest:
                idle.pop(0).close()
            left = left or bool(idle)
        if left:
            self._sweeper = loop.call_later(self._keepalive_s, self._sweep)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    def idle(self) -> int:
        """Idle connections held now."""
        return sum(len(idle) for idle in self._idle.values())


def _head(
    method: str, target: _Target, path: str, headers: Sequence[tuple[str, str]], body: bytes | None
) -> bytes:
    lines = [f"{method} {target.path}/{path} HTTP/1.1", f"Host: {target.netloc}"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    text = "\r\n".join(lines)
    # A CR or LF inside a header would split it: refused (aiohttp's server never lets one
    # through from a client, but a key in the caps file could hold one).
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("a header holds a line break")
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")


async def send(
    client: UpstreamClient,
    upstream: UpstreamConfig,
    path: str,
    *,
    method: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None,
) -> Response:
    """Send the request; the response once its status and headers are in. Errors while
    sending and waiting for them are translated."""
    target = client.target(upstream.base_url)
    try:
        head = _head(method, target, path, headers, body)
    except (ValueError, UnicodeError) as exc:
        raise UpstreamError(
            f"Upstream '{upstream.name}': the request's headers cannot be sent", sent=False
        ) from exc
    try:
        conn = await client.connect(target, upstream.connect_timeout_s)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"Upstream '{upstream.name}' timed out", sent=False) from exc
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamError(f"Upstream '{upstream.name}' is unreachable", sent=False) from exc
    try:
        return await conn.exchange(head, body, upstream.timeout_s)
    except TimeoutError as exc:
        conn.release()
        raise UpstreamTimeout(f"Upstream '{upstream.name}' timed out", sent=True) from exc
    except (ResponseBroken, OSError) as exc:
        conn.release()
        raise UpstreamError(f"Upstream '{upstream.name}' broke off", sent=True) from exc
    except BaseException:
        conn.release()
        raise


async def read_body(resp: Response, upstream: UpstreamConfig, *, limit: int | None = None) -> bytes:
    """The whole response body, at most ``limit`` bytes (``UpstreamTooLarge`` beyond it);
    a broken or stalled body is an upstream error."""

    def too_large() -> UpstreamTooLarge:
        resp.close()
        return UpstreamTooLarge(
            f"Upstream '{upstream.name}' answered with a body over the proxy's limit of "
            f"{limit} bytes."
        )

    length = resp.content_length
    if limit is not None and length is not None and length > limit:
        raise too_large()
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await resp.read_any():
            size += len(chunk)
            if limit is not None and size > limit:
                raise too_large()
            chunks.append(chunk)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"Upstream '{upstream.name}' timed out") from exc
    except (ResponseBroken, OSError) as exc:
        raise UpstreamError(f"Upstream '{upstream.name}' broke off its response") from exc
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
