"""The listener's limits with real sockets: connections past ``server.max_connections``,
slow request heads, idle keep-alive connections, the open-files limit."""

from __future__ import annotations

import asyncio
import gc
import resource
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.config import ConfigError, parse_settings
from proxy.listener import (
    GC_YOUNG_THRESHOLD,
    SWITCH_INTERVAL_S,
    Limits,
    raise_open_files_limit,
    start,
    tune_interpreter,
)
from tests.fake_upstream import FakeUpstream
from tests.harness import settings_for
from tests.redis_server import free_port

Socket = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Serve = Callable[[Limits], Awaitable[int]]
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
_BODY = b'{"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}'
CHAT = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
    b"Authorization: Bearer sk-acme-test-key\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


@pytest.fixture
async def serve(upstream: FakeUpstream) -> AsyncIterator[Serve]:
    """Serve the real app behind the listener on a free loopback port."""
    runners: list[web.AppRunner] = []

    async def start_with(limits: Limits) -> int:
        port = free_port()
        app = create_app(settings_for(upstream.url))
        runners.append(
            await start(app, limits=limits, host="127.0.0.1", port=port, handle_signals=False)
        )
        return port

    yield start_with
    for runner in runners:
        await runner.cleanup()


async def connect(port: int) -> Socket:
    return await asyncio.open_connection("127.0.0.1", port)


async def health(sock: Socket) -> bytes:
    """One /healthz on a keep-alive connection: the status line."""
    reader, writer = sock
    writer.write(HEALTH)
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def closed(sock: Socket) -> bool:
    """True once the server closed the connection (waits for it)."""
    return await sock[0].read() == b""


def limits(max_connections: int = 3, header_s: float = 60, keepalive_s: float = 60) -> Limits:
    return Limits(
        max_connections=max_connections, header_timeout_s=header_s, keepalive_s=keepalive_s
    )


async def test_past_the_limit_a_new_connection_replaces_the_oldest_idle_one(serve: Serve) -> None:
    port = await serve(limits(max_connections=3))
    idle = [await connect(port) for _ in range(3)]
    for sock in idle:  # each served once, now waiting for its next request
        assert (await health(sock)).startswith(b"HTTP/1.1 200")
    checker = await connect(port)
    assert (await health(checker)).startswith(b"HTTP/1.1 200")
    assert await closed(idle[0])
    for sock in [*idle[1:], checker]:  # the others are still served
        assert (await health(sock)).startswith(b"HTTP/1.1 200")
    for _, writer in [*idle, checker]:
        writer.close()


async def test_past_the_limit_with_every_connection_busy_a_new_one_is_closed_at_once(
    serve: Serve, upstream: FakeUpstream
) -> None:
    port = await serve(limits(max_connections=3))
    upstream.gate = asyncio.Event()
    busy = [await connect(port) for _ in range(3)]
    for _, writer in busy:  # each in a request, held by the upstream
        writer.write(CHAT)
    while upstream.count < 3:
        upstream.arrived.clear()
        await upstream.arrived.wait()
    assert await closed(await connect(port))
    upstream.gate.set()  # the requests finish; their connections serve again
    for reader, _ in busy:
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    assert (await health(await connect(port))).startswith(b"HTTP/1.1 200")
    for _, writer in busy:
        writer.close()


async def test_a_request_head_sent_too_slowly_is_cut_and_the_proxy_serves_others(
    serve: Serve,
) -> None:
    port = await serve(limits(max_connections=2, header_s=0.2))
    slow = await connect(port)
    slow[1].write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n")  # and never the blank line
    assert await closed(slow)
    assert (await health(await connect(port))).startswith(b"HTTP/1.1 200")


async def test_a_keep_alive_connection_left_idle_is_closed(serve: Serve) -> None:
    port = await serve(limits(keepalive_s=0.2))
    sock = await connect(port)
    assert (await health(sock)).startswith(b"HTTP/1.1 200")
    assert await closed(sock)


async def test_a_request_slower_than_the_header_timeout_is_not_cut_once_its_head_arrived(
    serve: Serve, upstream: FakeUpstream
) -> None:
    port = await serve(limits(header_s=0.2))
    upstream.gate = asyncio.Event()
    reader, writer = await connect(port)
    writer.write(CHAT)
    await upstream.arrived.wait()
    await asyncio.sleep(0.3)  # the upstream takes longer than the header timeout
    upstream.gate.set()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard, 1024) - 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        assert raise_open_files_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_interpreter_is_tuned_for_serving() -> None:
    before, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        tune_interpreter()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        sys.setswitchinterval(interval)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("server", "max_connections", 0),
        ("server", "request_header_timeout_s", 0),
        ("server", "keepalive_timeout_s", -1),
        ("store", "max_connections", 0),
        ("store", "max_connections", 257),
    ],
)
def test_limits_out_of_range_are_refused_naming_the_field(
    section: str, field: str, value: int
) -> None:
    text = f"{section}: {{{field}: {value}}}\nupstreams: [{{name: up, base_url: 'http://h/v1'}}]\n"
    with pytest.raises(ConfigError) as info:
        parse_settings(text, source="caps.yaml", env={})
    assert any(f"{section}.{field}" in line for line in info.value.errors), info.value.errors


def test_the_limits_default_well_below_a_common_open_files_limit() -> None:
    settings = parse_settings(
        "upstreams: [{name: up, base_url: 'http://h/v1'}]\n", source="caps.yaml", env={}
    )
    assert settings.server.max_connections + 256 <= 4096
    assert settings.server.request_header_timeout_s == 10
    assert settings.store.max_connections == 4
