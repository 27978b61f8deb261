"""The script connections under load: a burst multiplexed on a few connections, timeouts
that measure the store, cancellations that leave a connection in step."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.app import new_event_loop
from proxy.redis_scripts import OPEN, QUIET_CONNECT, Prepared, Script, Server
from proxy.redis_store import RedisStore
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import auth, chat, settings_for
from tests.redis_server import RedisServer

ECHO = Script("return ARGV[1]")
BURST = 1_000


async def connections_received(admin: Redis) -> int:
    stats = await admin.info("stats")
    return int(stats["total_connections_received"])


class Stall:
    """The Redis asleep (DEBUG SLEEP 1); ``woken()`` waits for its answer, sent on waking."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def woken(self) -> None:
        assert await self.reader.readline() == b"+OK\r\n"
        self.writer.close()


async def stall(server: RedisServer) -> Stall:
    """Put the Redis to sleep for a second (DEBUG SLEEP) and return once it sleeps."""
    reader, sleeper = await asyncio.open_connection("127.0.0.1", server.port)
    sleeper.write(b"DEBUG SLEEP 1\r\n")
    await sleeper.drain()
    probe_reader, probe = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(200):
            probe.write(b"PING\r\n")
            try:
                await asyncio.wait_for(probe_reader.readline(), 0.05)
            except TimeoutError:
                return Stall(reader, sleeper)
        raise AssertionError("DEBUG SLEEP did not stall the test Redis")
    finally:
        probe.close()


@pytest.fixture
async def server(redis_server: RedisServer) -> AsyncIterator[Server]:
    client = Redis.from_url(redis_server.url, socket_timeout=0.25, **QUIET_CONNECT)
    try:
        yield Server(client, connections=4)
    finally:
        await client.aclose()


async def test_a_thousand_concurrent_calls_share_the_four_connections_opened_first(
    redis_server: RedisServer, server: Server
) -> None:
    admin = Redis.from_url(redis_server.url)
    before = await connections_received(admin)
    replies = await asyncio.gather(*(server.eval(ECHO, [], [i]) for i in range(BURST)))
    assert replies == [str(i).encode() for i in range(BURST)]
    assert await connections_received(admin) - before == 4
    await admin.aclose()
    assert server.open_connections == 4
    await server.drop()


async def test_a_cancelled_call_leaves_the_connection_in_step(
    redis_server: RedisServer, server: Server
) -> None:
    await server.warm()
    sleeper = await stall(redis_server)
    slow = asyncio.create_task(server.eval(ECHO, [], ["cancelled"]))
    await asyncio.sleep(0)  # written, waiting for its reply
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    await sleeper.woken()
    # Every connection still answers each call with its own reply.
    replies = await asyncio.gather(*(server.eval(ECHO, [], [i]) for i in range(40)))
    assert replies == [str(i).encode() for i in range(40)]
    await server.drop()


async def test_a_reply_later_than_the_timeout_fails_the_call_and_the_next_one_works(
    redis_server: RedisServer, server: Server
) -> None:
    await server.warm()
    sleeper = await stall(redis_server)
    with pytest.raises(RedisTimeoutError):
        await server.eval(ECHO, [], ["late"])
    await sleeper.woken()
    assert await server.eval(ECHO, [], ["next"]) == b"next"
    await server.drop()


async def test_a_busy_event_loop_is_not_taken_for_a_slow_store(server: Server) -> None:
    await server.warm()
    call = asyncio.create_task(server.eval(ECHO, [], ["on time"]))
    await asyncio.sleep(0)  # the command is written
    time.sleep(0.5)  # the proxy's loop is busy past the 0.25 s timeout; Redis answered
    assert await call == b"on time"
    await server.drop()


def test_on_uvloop_too_a_busy_event_loop_is_not_taken_for_a_slow_store(
    redis_server: RedisServer,
) -> None:
    # The same on uvloop (capproxy serve's loop), whose loop orders timers and I/O its own way.
    async def scenario() -> bytes:
        client = Redis.from_url(redis_server.url, socket_timeout=0.25, **QUIET_CONNECT)
        server = Server(client, connections=1)
        try:
            await server.warm()
            call = asyncio.create_task(server.eval(ECHO, [], ["on time"]))
            await asyncio.sleep(0)
            time.sleep(0.5)
            reply: bytes = await call
            await server.drop()
            return reply
        finally:
            await client.aclose()

    loop = new_event_loop("uvloop")
    assert type(loop).__module__.startswith("uvloop")
    try:
        assert loop.run_until_complete(scenario()) == b"on time"
    finally:
        loop.close()


async def _app_on_pool(
    redis_server: RedisServer,
    upstream: FakeUpstream,
    make_client: MakeClient,
    *,
    timeout_s: float,
    **settings: Any,
) -> tuple[TestClient[web.Request, web.Application], RedisStore]:
    """The app on a store of 4 script connections, with an hourly cap of $1000."""
    store = RedisStore.from_url(redis_server.url, timeout_s=timeout_s, max_connections=4)
    caps = {"default_budget_caps": [{"window": "hourly", "hard_limit_usd": 1000}]}
    client = await make_client(settings_for(upstream.url, cost_caps=caps, **settings), store=store)
    return client, store


async def test_a_burst_of_a_thousand_streams_gets_no_store_error(
    redis_server: RedisServer, upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client, _ = await _app_on_pool(
        redis_server,
        upstream,
        make_client,
        timeout_s=0.25,
        # The load generator, the proxy and the upstream share this test's one event loop.
        upstreams=[
            {
                "name": "fake",
                "base_url": upstream.url,
                "api_key": "sk-upstream-secret",
                "models": ["*"],
                "timeout_s": 60,
                "connect_timeout_s": 60,
            }
        ],
    )
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def stream() -> str:
            body = chat(stream=True, max_tokens=20)
            url = client.make_url("/v1/chat/completions")
            async with session.post(url, json=body, headers=auth()) as resp:
                data = await resp.read()
                if resp.status != 200:
                    return f"{resp.status} {data[:80]!r}"
                return "ok" if data.endswith(b"data: [DONE]\n\n") else "cut"

        outcomes = Counter(await asyncio.gather(*(stream() for _ in range(BURST))))
    assert outcomes == {"ok": BURST}
    assert upstream.count == BURST


async def test_the_first_requests_of_a_new_tenant_register_it_on_one_connection(
    redis_server: RedisServer, upstream: FakeUpstream, make_client: MakeClient
) -> None:
    client, store = await _app_on_pool(redis_server, upstream, make_client, timeout_s=2.0)
    admin = Redis.from_url(redis_server.url, **QUIET_CONNECT)
    try:
        await store.ping()  # the script connections, opened at start
        before = await connections_received(admin)
        statuses = await asyncio.gather(
            *(
                client.post("/v1/chat/completions", json=chat(max_tokens=5), headers=auth())
                for _ in range(50)
            )
        )
        assert [r.status for r in statuses] == [200] * 50
        # The new tenant's registration is written once, on one connection of the pool
        # (plus the admin's own INFO): not one per concurrent first request.
        assert await connections_received(admin) - before <= 2
    finally:
        await admin.aclose()


# --- prepared calls ------------------------------------------------------------------

_ITEM = st.one_of(
    st.text(max_size=12), st.integers(min_value=-(10**18), max_value=10**18), st.just("")
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(_ITEM, st.booleans()), max_size=8),
    st.lists(st.tuples(_ITEM, st.booleans()), max_size=12),
)
def test_a_prepared_call_packs_as_the_script_would(
    keys: list[tuple[Any, bool]], args: list[tuple[Any, bool]]
) -> None:
    script = Script("return redis.call('GET', KEYS[1])")
    call = Prepared(
        script,
        [OPEN if hole else str(item) for item, hole in keys],
        [OPEN if hole else item for item, hole in args],
    )
    values = [str(item) for item, hole in keys if hole] + [item for item, hole in args if hole]
    packed = call.fill(values)
    assert packed == script.packed([str(item) for item, _ in keys], [item for item, _ in args])
    full = script.packed([str(item) for item, _ in keys], [item for item, _ in args], full=True)
    assert script.full(packed) == full
    with pytest.raises(ValueError, match="open items"):
        call.fill([*values, "one too many"])


async def test_a_server_that_lost_its_scripts_runs_a_prepared_call_in_full(
    redis_server: RedisServer, server: Server
) -> None:
    call = Prepared(ECHO, [], [OPEN])
    assert await server.run(ECHO, call.fill(["first"])) == b"first"
    admin = Redis.from_url(redis_server.url)
    try:
        await admin.script_flush()
    finally:
        await admin.aclose()
    assert await server.run(ECHO, call.fill(["after the flush"])) == b"after the flush"


class _Recorder:
    """A transport that notes how many commands each write carries."""

    def __init__(self, transport: Any, writes: list[int]) -> None:
        self._transport, self._writes = transport, writes

    def write(self, data: bytes) -> None:
        self._writes.append(data.count(b"EVALSHA"))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def test_a_call_on_an_idle_connection_is_written_at_once_the_next_ones_together(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Redis.from_url(redis_server.url, socket_timeout=1.0, **QUIET_CONNECT)
    server = Server(client, connections=1)
    try:
        await server.warm()
        await server.eval(ECHO, [], ["load"])  # the script is known from here on
        writes: list[int] = []
        (pipe,) = server._pipes
        monkeypatch.setattr(pipe, "_transport", _Recorder(pipe._transport, writes))
        first = asyncio.create_task(server.eval(ECHO, [], ["first"]))
        await asyncio.sleep(0)
        assert writes == [1]  # written in its own step, not on the loop's next turn
        rest = [asyncio.create_task(server.eval(ECHO, [], [i])) for i in range(5)]
        assert await asyncio.gather(first, *rest) == [
            b"first",
            *(str(i).encode() for i in range(5)),
        ]
        assert writes == [1, 5]  # made while one was in flight: gathered into one write
    finally:
        await server.drop()
        await client.aclose()
