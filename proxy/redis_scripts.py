"""Lua scripts and the connections that carry them: the Redis store's hot path.

    script = Script(lua("reserve.lua", with_lib=True))
    server = Server(Redis(host="127.0.0.1", port=6379, **QUIET_CONNECT), connections=4)
    reply = await server.eval(script, keys, args)   # EVALSHA, EVAL when the server lost it

The scripts are package files (``proxy/lua/*.lua``); ``lib.lua`` holds the functions
the writing scripts share. Calls are packed straight into RESP and written, as they come,
on a few connections of the store's own that each carry many calls at once (see
``Server``).
"""

from __future__ import annotations

import asyncio
import hashlib
import select
from collections import deque
from collections.abc import Sequence
from importlib import resources
from typing import Any

import hiredis

# With redis_store.py, the only modules that talk to Redis.
from redis._parsers import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "DEFAULT_CONNECTIONS",
    "OPEN",
    "QUIET_CONNECT",
    "Prepared",
    "Script",
    "Server",
    "lua",
    "server_options",
]

# No CLIENT SETINFO on connect: one round trip less per connection, and redis-py 8's
# cluster client breaks connections that several calls open at once while it sends it.
QUIET_CONNECT: dict[str, Any] = {"driver_info": DriverInfo(name=None, lib_version=None)}


def lua(name: str, *, with_lib: bool = False) -> str:
    """A script of the package's ``lua/`` folder (``lib.lua`` prepended, if asked)."""
    folder = resources.files("proxy") / "lua"
    source = (folder / name).read_text(encoding="utf-8")
    return (folder / "lib.lua").read_text(encoding="utf-8") + source if with_lib else source


def server_options(url: str) -> dict[str, Any]:
    """How to reach any server of the url's deployment: credentials and TLS, without
    the address (Sentinel or the cluster's slots say where) or a database (a cluster has
    one)."""
    options: dict[str, Any] = dict(parse_url(url))
    for name in ("host", "port", "path"):
        options.pop(name, None)
    if options.pop("connection_class", None) is not None:
        options["ssl"] = True  # rediss://
    return options


# Connections that carry the script calls to each server (``store.max_connections``).
DEFAULT_CONNECTIONS = 4
# How often an expired call waits for the event loop to read its socket before it fails.
MAX_LATE_CHECKS = 100


class Script:
    """A Lua script and its SHA1, packed straight into RESP."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest().encode()
        self._short = b"$7\r\nEVALSHA\r\n$%d\r\n%s\r\n" % (len(self.sha), self.sha)
        self._full = b"$4\r\nEVAL\r\n$%d\r\n%s\r\n" % (len(self.source), self.source)

    def packed(self, keys: list[str], args: Sequence[str | int], *, full: bool = False) -> bytes:
        items = [str(len(keys)), *keys, *map(str, args)]
        # Keys and arguments are ASCII (ids are validated): lengths in characters are
        # lengths in bytes, and the whole command is encoded at once.
        text = "".join([f"${len(item)}\r\n{item}\r\n" for item in items])
        if text.isascii():
            body = text.encode()
        else:
            body = b"".join(b"$%d\r\n%s\r\n" % (len(b), b) for b in map(str.encode, items))
        head = self._full if full else self._short
        return b"*%d\r\n%s%s" % (len(items) + 2, head, body)

    def full(self, packed: bytes) -> bytes:
        """``packed`` (an EVALSHA) as an EVAL: for a server that lost its script cache."""
        start = packed.index(b"\r\n") + 2
        if not packed.startswith(self._short, start):
            raise ValueError("not a call of this script")
        return packed[:start] + self._full + packed[start + len(self._short) :]


class _Open:
    def __repr__(self) -> str:
        return "OPEN"


OPEN: Any = _Open()  # an item a Prepared call leaves open


class Prepared:
    """A call of a script packed once but for a few items left ``OPEN``, filled per call:
    the keys and arguments a request's counters and periods fix are not packed again.

        call = Prepared(script, ["k1", OPEN], [OPEN, 60000])
        call.fill(["k2", "rid"]) == script.packed(["k1", "k2"], ["rid", 60000])
    """

    __slots__ = ("_chunks", "script")

    def __init__(self, script: Script, keys: Sequence[object], args: Sequence[object]) -> None:
        self.script = script
        items = [len(keys), *keys, *args]
        chunks: list[bytes] = []
        done = [b"*%d\r\n%s" % (len(items) + 2, script._short)]
        for item in items:
            if item is OPEN:
                chunks.append(b"".join(done))
                done = []
            else:
                done.append(_bulk(str(item)))
        chunks.append(b"".join(done))
        self._chunks = chunks

    @property
    def open(self) -> int:
        return len(self._chunks) - 1

    def fill(self, values: Sequence[str | int]) -> bytes:
        """The call with ``values`` in its open items, in order."""
        chunks = self._chunks
        if len(values) != len(chunks) - 1:
            raise ValueError(f"{len(chunks) - 1} open items, {len(values)} values")
        parts = [chunks[0]]
        for value, chunk in zip(values, chunks[1:], strict=True):
            # _bulk, inline and with the chunk that follows: up to a dozen items a call.
            data = b"%d" % value if type(value) is int else str(value).encode()
            parts.append(b"$%d\r\n%s\r\n%s" % (len(data), data, chunk))
        return b"".join(parts)


def _bulk(item: str) -> bytes:
    data = item.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


class _Pipe(asyncio.Protocol):
    """One connection carrying many calls at once: a call on a connection with nothing in
    flight is written at once; the calls made behind it in one turn of the event loop go
    out together in one write; each reply goes to the oldest call still waiting (Redis
    answers in order).

    It takes over the transport of a redis-py connection that has done the handshake
    (TLS, AUTH, SELECT, the Sentinel's primary). A caller that stops waiting (cancelled)
    leaves its slot, and its reply is dropped when it comes: the connection stays in step.
    A reply later than ``timeout_s`` after its command was written breaks the connection,
    and every call still waiting on it fails with ``TimeoutError``.
    """

    def __init__(self, conn: AbstractConnection, timeout_s: float | None) -> None:
        writer = conn._writer  # the stream redis-py opened and authenticated
        if writer is None:
            raise RedisConnectionError("the connection closed during its handshake")
        self._conn = conn
        self._transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._replies = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error
        )
        self._waiting: deque[asyncio.Future[Any]] = deque()
        # Commands of this turn of the loop, and their calls: written together, soon.
        self._unsent: list[bytes] = []
        self._unsent_calls: list[asyncio.Future[Any]] = []
        self.broken = False
        self._transport.set_protocol(self)

    @property
    def pending(self) -> int:
        return len(self._waiting)

    @property
    def gathering(self) -> bool:
        """Whether commands of this turn of the loop wait to be written."""
        return bool(self._unsent)

    async def call(self, packed: bytes) -> Any:
        if self.broken:
            raise RedisConnectionError("connection to the store closed")
        reply = self._loop.create_future()
        idle = not self._waiting
        self._waiting.append(reply)
        self._unsent.append(packed)
        self._unsent_calls.append(reply)
        if idle:
            # Nothing in flight on this connection: no call to gather with, and a busy
            # loop's next turn can be milliseconds away. Written now.
            self._write()
        elif len(self._unsent) == 1:
            self._loop.call_soon(self._write)
        return await reply

    def _write(self) -> None:
        """Write the commands gathered in this turn; their timeout starts now."""
        if self.broken or not self._unsent:
            return
        data, calls = b"".join(self._unsent), self._unsent_calls
        self._unsent, self._unsent_calls = [], []
        self._transport.write(data)
        if self._timeout_s is not None:
            self._loop.call_later(self._timeout_s, self._expire, calls, 0)

    def _expire(self, calls: list[asyncio.Future[Any]], checks: int) -> None:
        """The time of the calls written together is up. The event loop may have been
        too busy to read replies that came in time: while the socket has bytes to read,
        the loop gets more turns (a late loop is the proxy's delay, not the store's)."""
        if self.broken or all(call.done() for call in calls):
            return
        if checks < MAX_LATE_CHECKS and self._readable():
            self._loop.call_soon(self._expire, calls, checks + 1)
            return
        self.close(RedisTimeoutError("the store did not answer in time"))

    def _readable(self) -> bool:
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            ready, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(ready)

    def data_received(self, data: bytes) -> None:
        self._replies.feed(data)
        while True:
            try:
                reply = self._replies.gets()
            except InvalidResponse as exc:
                self.close(RedisConnectionError(f"unreadable reply from the store: {exc}"))
                return
            if reply is False:
                return
            if not self._waiting:
                self.close(RedisConnectionError("a reply from the store that nobody asked for"))
                return
            waiter = self._waiting.popleft()
            if waiter.done():  # its caller stopped waiting
                continue
            if isinstance(reply, Exception):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError("connection to the store lost"))

    def close(self, error: Exception | None = None) -> None:
        """Close the connection; calls still waiting fail with ``error``."""
        self.broken = True
        self._unsent, self._unsent_calls = [], []
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(error or RedisConnectionError("connection closed"))
        # Closes the transport without waiting (its protocol is no longer redis-py's).
        self._conn._close()  # type: ignore[no-untyped-call]


class Server:
    """Script calls to one server, multiplexed on a few connections of the store's own.

        server = Server(client, connections=4)
        reply = await server.eval(script, keys, args)

    The generic ``execute_command`` path of redis-py (command packing, pool bookkeeping,
    retry wrapper) costs more CPU than the rest of a proxied request; the scripts are the
    store's whole hot path, so they are packed here and written, as they come, on
    ``connections`` connections that each carry any number of calls (Redis answers each
    connection's commands in order; it runs one script at a time anyway). A burst of
    requests thus opens no connection: the first call opens all of them. A call's timeout
    (the client's ``socket_timeout``) runs from the moment its command is written, so it
    measures the store, not the proxy's queueing. A connection that failed is dropped with
    every other one (after a restart or a failover they all point at the past), and a call
    that failed before its reply is tried once more on a fresh connection (safe: every
    script is idempotent by rid).
    """

    def __init__(self, client: Redis, *, connections: int = DEFAULT_CONNECTIONS) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.client = client
        self.connections = connections
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._timeout_s: float | None = float(timeout) if timeout else None
        self._pipes: list[_Pipe] = []
        self._opening = asyncio.Lock()
        self._connects = 0  # attempts to open the connections
        self._connect_error: BaseException | None = None  # of the last attempt

    @property
    def open_connections(self) -> int:
        return sum(1 for pipe in self._pipes if not pipe.broken)

    async def eval(self, script: Script, keys: list[str], args: Sequence[str | int]) -> Any:
        return await self.run(script, script.packed(keys, args))

    async def run(self, script: Script, packed: bytes) -> Any:
        """Send ``packed``, a call of ``script`` (``Script.packed``, ``Prepared.fill``)."""
        for attempt in range(2):
            pipe = self._ready() or await self._pipe()
            try:
                try:
                    return await pipe.call(packed)
                except NoScriptError:  # the server lost its script cache (restart, FLUSH)
                    return await pipe.call(script.full(packed))
            except RedisConnectionError:
                await self.drop()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def warm(self) -> None:
        """Open the connections now (the first call would)."""
        await self._pipe()

    async def drop(self) -> None:
        """Close every connection; calls waiting on them fail (and are tried again)."""
        pipes, self._pipes = self._pipes, []
        for pipe in pipes:
            pipe.close()

    def _ready(self) -> _Pipe | None:
        """``_pipe``'s choice when every connection is open (without a coroutine)."""
        best: _Pipe | None = None
        for pipe in self._pipes:
            if pipe.broken:
                return None
            if pipe.gathering:
                return pipe
            if best is None or pipe.pending < best.pending:
                best = pipe
        return best

    async def _pipe(self) -> _Pipe:
        """The connection with the fewest calls waiting (opening them all if none is).

        Callers that waited while another one failed to connect fail with it, without
        trying again each: a server that is down fails its calls at once."""
        live = [pipe for pipe in self._pipes if not pipe.broken]
        if len(live) != len(self._pipes):
            self._pipes = live
        if not live:
            ticket = self._connects
            async with self._opening:
                live = [pipe for pipe in self._pipes if not pipe.broken]
                if not live:
                    if self._connects != ticket and self._connect_error is not None:
                        raise RedisConnectionError("the store refused a connection just now")
                    self._connects += 1
                    try:
                        self._pipes = live = await self._open_all()
                    except (RedisError, OSError) as exc:
                        self._connect_error = exc
                        raise
                    self._connect_error = None
        # A connection already gathering this turn's commands takes one more: one write.
        return next((pipe for pipe in live if pipe.gathering), None) or min(live, key=_pending)

    async def _open_all(self) -> list[_Pipe]:
        opened = await asyncio.gather(
            *(self._open() for _ in range(self.connections)), return_exceptions=True
        )
        pipes = [pipe for pipe in opened if isinstance(pipe, _Pipe)]
        if not pipes:
            error = next(e for e in opened if isinstance(e, BaseException))
            raise error
        return pipes

    async def _open(self) -> _Pipe:
        conn: AbstractConnection = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        try:
            return _Pipe(conn, self._timeout_s)
        except BaseException:
            await conn.disconnect()
            raise


def _pending(pipe: _Pipe) -> int:
    return pipe.pending
