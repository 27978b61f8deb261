"""Lua scripts and the connections that carry them: the Redis store's hot path.

    script = Script(lua("reserve.lua", with_lib=True))
    server = Server(Redis(host="127.0.0.1", port=6379, **QUIET_CONNECT))
    reply = await server.eval(script, keys, args)   # EVALSHA, EVAL when the server lost it

The scripts are package files (``proxy/lua/*.lua``); ``lib.lua`` holds the functions
the writing scripts share. Calls are packed straight into RESP and sent on connections
of the store's own (see ``Server``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

# With redis_store.py, the only modules that talk to Redis.
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

__all__ = ["MAX_IDLE_CONNECTIONS", "QUIET_CONNECT", "Script", "Server", "lua", "server_options"]

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


# Connections kept open for the scripts between calls (more are opened under a burst).
MAX_IDLE_CONNECTIONS = 32


class Script:
    """A Lua script and its SHA1, packed straight into RESP."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest().encode()

    def packed(self, keys: list[str], args: Sequence[str | int], *, full: bool = False) -> bytes:
        parts: list[bytes] = [b"EVAL", self.source] if full else [b"EVALSHA", self.sha]
        parts.append(str(len(keys)).encode())
        parts.extend(k.encode() for k in keys)
        parts.extend(str(a).encode() for a in args)
        out = [b"*%d\r\n" % len(parts)]
        for part in parts:
            out.append(b"$%d\r\n%s\r\n" % (len(part), part))
        return b"".join(out)


async def _call(
    conn: AbstractConnection, script: Script, keys: list[str], args: Sequence[str | int]
) -> Any:
    try:
        await conn.send_packed_command(script.packed(keys, args), check_health=False)
        return await conn.read_response()
    except NoScriptError:  # the server lost its script cache (restart, SCRIPT FLUSH)
        await conn.send_packed_command(script.packed(keys, args, full=True), check_health=False)
        return await conn.read_response()


class Server:
    """Script calls to one server, on connections of this store's own.

    The generic ``execute_command`` path of redis-py (command packing, pool bookkeeping,
    retry wrapper) costs more CPU than the rest of a proxied request; the scripts are the
    store's whole hot path, so they are packed here and sent on connections kept in a
    short list. A connection that failed is dropped with every idle one (after a restart
    or a failover they all point at the past), and a call that failed before its reply is
    tried once more on a fresh connection (safe: every script is idempotent by rid).
    """

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._idle: list[AbstractConnection] = []  # last used first

    async def eval(self, script: Script, keys: list[str], args: Sequence[str | int]) -> Any:
        for attempt in range(2):
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                reply = await _call(conn, script, keys, args)
            except RedisConnectionError:
                await conn.disconnect()
                await self.drop()
                if attempt:
                    raise
                continue
            except BaseException:
                # A timeout or cancellation mid-reply leaves the connection out of step.
                await conn.disconnect()
                raise
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
            else:  # a burst is over: keep a bounded set open
                await conn.disconnect()
            return reply
        raise AssertionError("unreachable")

    async def drop(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()

    async def _connect(self) -> AbstractConnection:
        conn: AbstractConnection = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        return conn
