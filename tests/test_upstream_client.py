"""The upstream HTTP/1.1 client against servers that answer with scripted bytes."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamTooLarge
from proxy.upstream import HIGH_WATER, INFLATE_STEP, UpstreamClient, read_body, send

# (request, reader, writer) -> True to keep the connection for the next request
Answer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Scripted:
    """A TCP server that reads each request (head and Content-Length body) and answers it
    with what ``answer`` writes."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed = asyncio.Event()  # a connection ended (either side closed it)
        self.port = 0
        self._open: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.answer(request, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._open.pop(task, None)
            self.closed.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Scripted]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            open_tasks = list(self._open.items())
            for _, writer in open_tasks:  # ends each handler (a cancelled one is logged)
                writer.transport.abort()
            await asyncio.gather(*(task for task, _ in open_tasks))

    def upstream(self, **kwargs: object) -> UpstreamConfig:
        return UpstreamConfig.model_validate(
            {"name": "up", "base_url": f"http://127.0.0.1:{self.port}/v1", **kwargs}
        )


def reply(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answering(data: bytes, *, keep: bool = True) -> Answer:
    async def answer(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return answer


async def until(condition: Callable[[], bool]) -> None:
    """Wait, a loop turn at a time, until ``condition()`` holds (a test fails after 10 s
    instead of hanging)."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0)


async def fetch(
    client: UpstreamClient, up: UpstreamConfig, *, limit: int | None = None
) -> tuple[int, bytes]:
    async with (
        asyncio.timeout(10),
        await send(
            client, up, "chat/completions", method="POST", headers=[("X-A", "1")], body=b"{}"
        ) as resp,
    ):
        return resp.status, await read_body(resp, up, limit=limit)


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient()
    yield client
    await client.close()


async def test_requests_reuse_one_kept_alive_connection(client: UpstreamClient) -> None:
    async with Scripted(answering(reply(b'{"ok":1}'))).running() as server:
        up = server.upstream()
        for _ in range(5):
            assert await fetch(client, up) == (200, b'{"ok":1}')
    assert server.connections == 1 and client.opened == 1
    assert server.requests[0] == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Length: 2\r\nX-A: 1\r\n\r\n{}" % server.port
    )


async def test_a_chunked_body_is_read_whole(client: UpstreamClient) -> None:
    async def answer(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"hello ", b"chunked ", b"world"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    async with Scripted(answer).running() as server:
        up = server.upstream()
        assert await fetch(client, up) == (200, b"hello chunked world")
        assert await fetch(client, up) == (200, b"hello chunked world")
    assert server.connections == 1


async def test_a_body_that_ends_with_the_connection(client: UpstreamClient) -> None:
    async with Scripted(
        answering(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end", keep=False)
    ).running() as server:
        up = server.upstream()
        assert await fetch(client, up) == (200, b"to the end")
        assert await fetch(client, up) == (200, b"to the end")
    assert server.connections == 2 and client.opened == 2


@pytest.mark.parametrize(
    ("coding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_compressed_bodies_are_decompressed(
    client: UpstreamClient, coding: str, compress: Callable[[bytes], bytes]
) -> None:
    body = b'{"usage": {"prompt_tokens": 3}}' * 1000
    async with Scripted(
        answering(reply(compress(body), f"Content-Encoding: {coding}"))
    ).running() as server:
        assert await fetch(client, server.upstream()) == (200, body)


async def test_a_small_compressed_body_inflates_in_bounded_steps(client: UpstreamClient) -> None:
    bomb = gzip.compress(b"\0" * (8 * INFLATE_STEP))  # about 2 KB that inflate to 2 MB
    async with Scripted(answering(reply(bomb, "Content-Encoding: gzip"))).running() as server:
        up = server.upstream()
        async with await send(client, up, "x", method="POST", headers=[], body=b"") as resp:
            sizes = []
            while chunk := await resp.read_any():
                sizes.append(len(chunk))
        assert sum(sizes) == 8 * INFLATE_STEP and max(sizes) <= INFLATE_STEP
        with pytest.raises(UpstreamTooLarge):
            await fetch(client, up, limit=INFLATE_STEP)


@pytest.mark.parametrize(
    "data",
    [
        reply(b"x", "Content-Encoding: br"),
        reply(b"not gzip at all", "Content-Encoding: gzip"),
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then the connection ends
        b"HTTP/1.1 two hundred\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"",
    ],
    ids=[
        "unknown-coding",
        "corrupt-gzip",
        "cut-body",
        "bad-status",
        "not-http",
        "bad-chunk",
        "empty",
    ],
)
async def test_a_broken_response_is_an_upstream_error(client: UpstreamClient, data: bytes) -> None:
    async with Scripted(answering(data, keep=False)).running() as server:
        with pytest.raises(UpstreamError) as caught:
            await fetch(client, server.upstream())
    assert caught.value.sent and caught.value.status == 502
    assert "127.0.0.1" not in caught.value.message


async def test_an_interim_response_is_skipped(client: UpstreamClient) -> None:
    data = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + reply(b"final", "X-B: 2")
    async with Scripted(answering(data)).running() as server:
        up = server.upstream()
        async with await send(client, up, "x", method="POST", headers=[], body=b"") as resp:
            assert resp.status == 200 and "Link" not in resp.headers
            assert resp.headers["x-b"] == "2"
            assert await read_body(resp, up) == b"final"


async def test_headers_are_kept_in_order_with_repeats(client: UpstreamClient) -> None:
    data = reply(b"", "Set-Cookie: a=1", "X-Ratelimit-Remaining-Requests: 9", "Set-Cookie: b=2")
    async with Scripted(answering(data)).running() as server:
        up = server.upstream()
        async with await send(client, up, "x", method="GET", headers=[], body=None) as resp:
            assert resp.headers.getall("set-cookie") == ["a=1", "b=2"]
            assert resp.content_length == 0
    assert b"Content-Length" not in server.requests[0]  # a GET has no body


async def test_unreachable_upstream_was_not_sent(client: UpstreamClient) -> None:
    async with Scripted(answering(b"")).running() as server:
        up = server.upstream()
    with pytest.raises(UpstreamError) as caught:
        await fetch(client, up)
    assert not caught.value.sent


async def test_a_line_break_in_a_header_is_never_sent(client: UpstreamClient) -> None:
    async with Scripted(answering(reply(b"ok"))).running() as server:
        up = server.upstream()
        for name, value in (("X-A", "1\r\nX-Injected: 1"), ("X-A", "1\nX"), ("X\r\nB", "1")):
            with pytest.raises(UpstreamError) as caught:
                await send(client, up, "x", method="POST", headers=[(name, value)], body=b"")
            assert not caught.value.sent
        assert server.requests == [] and client.opened == 0


async def test_the_timeout_bounds_the_wait_for_headers(client: UpstreamClient) -> None:
    async def never(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        await reader.read()  # until the client closes the connection
        return False

    async with Scripted(never).running() as server:
        with pytest.raises(UpstreamTimeout) as caught:
            await fetch(client, server.upstream(timeout_s=0.05))
        await asyncio.wait_for(server.closed.wait(), 10)  # the connection was closed, not kept
    assert caught.value.sent and caught.value.status == 504


async def test_the_timeout_bounds_the_whole_body(client: UpstreamClient) -> None:
    async def trickle(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:  # a byte at a time, for ever: each read gets something
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async with Scripted(trickle).running() as server:
        with pytest.raises(UpstreamTimeout):
            await fetch(client, server.upstream(timeout_s=0.2))
        await asyncio.wait_for(server.closed.wait(), 10)


async def test_a_cancelled_request_closes_its_connection(client: UpstreamClient) -> None:
    answered = asyncio.Event()

    async def slow(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        answered.set()
        await reader.read()  # until the client closes the connection
        return False

    async with Scripted(slow).running() as server:
        task = asyncio.create_task(fetch(client, server.upstream()))
        await answered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed.wait(), 10)
    assert client.idle() == 0


async def test_a_response_released_unread_closes_its_connection(client: UpstreamClient) -> None:
    async with Scripted(answering(reply(b"x" * 100_000))).running() as server:
        up = server.upstream()
        async with await send(client, up, "x", method="POST", headers=[], body=b""):
            pass
        await asyncio.wait_for(server.closed.wait(), 10)
        assert await fetch(client, up) == (200, b"x" * 100_000)
    assert client.opened == 2


async def test_bytes_out_of_turn_retire_the_connection(client: UpstreamClient) -> None:
    async with Scripted(answering(reply(b"one") + b"HTTP/1.1 200 OK\r\n")).running() as server:
        up = server.upstream()
        assert await fetch(client, up) == (200, b"one")
        assert await fetch(client, up) == (200, b"one")
    assert client.opened == 2


async def test_a_connection_the_server_closed_is_not_reused(client: UpstreamClient) -> None:
    async with Scripted(answering(reply(b"ok"), keep=False)).running() as server:
        up = server.upstream()
        assert await fetch(client, up) == (200, b"ok")
        await asyncio.wait_for(server.closed.wait(), 10)
        await until(lambda: client.idle() == 0)  # the close arrives on a later read
        assert await fetch(client, up) == (200, b"ok")
    assert client.opened == 2


async def test_idle_connections_are_closed_after_the_keepalive_time() -> None:
    client = UpstreamClient(keepalive_s=0.05)
    try:
        async with Scripted(answering(reply(b"ok"))).running() as server:
            assert await fetch(client, server.upstream()) == (200, b"ok")
            assert client.idle() == 1
            await asyncio.wait_for(server.closed.wait(), 10)
            assert client.idle() == 0
    finally:
        await client.close()


async def test_a_reader_that_falls_behind_pauses_the_upstream(client: UpstreamClient) -> None:
    size = 32 * 1024 * 1024
    written = asyncio.Event()

    async def flood(
        request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()
        written.set()
        return True

    async with Scripted(flood).running() as server:
        up = server.upstream()
        async with await send(client, up, "x", method="POST", headers=[], body=b"") as resp:
            first = await resp.read_any()
            conn = resp._conn
            await until(lambda: conn._paused)
            assert conn._buffered <= 2 * HIGH_WATER and not written.is_set()
            total = len(first)
            while chunk := await resp.read_any():
                total += len(chunk)
            assert total == size
        await written.wait()


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_verifies_the_upstream(tmp_path: Path, aiohttp_server: AiohttpServer) -> None:
    cert, key = self_signed(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"over tls " + await request.read())

    app = web.Application()
    app.router.add_post("/v1/x", hello)
    server = await aiohttp_server(app, ssl=served)
    up = UpstreamConfig(name="up", base_url=f"https://localhost:{server.port}/v1")
    trusting = ssl.create_default_context(cafile=str(cert))
    client = UpstreamClient(tls=trusting)
    try:
        async with await send(client, up, "x", method="POST", headers=[], body=b"!") as resp:
            assert await read_body(resp, up) == b"over tls !"
    finally:
        await client.close()
    stranger = UpstreamClient()  # the system's trust store: the certificate is refused
    try:
        with pytest.raises(UpstreamError) as caught:
            await send(stranger, up, "x", method="POST", headers=[], body=b"!")
        assert not caught.value.sent
    finally:
        await stranger.close()


async def test_a_response_released_twice_leaves_the_next_one_alone(
    client: UpstreamClient,
) -> None:
    async with Scripted(answering(reply(b"ok"))).running() as server:
        up = server.upstream()
        first = await send(client, up, "x", method="POST", headers=[], body=b"")
        assert await read_body(first, up) == b"ok"
        first.release()
        second = await send(client, up, "x", method="POST", headers=[], body=b"")
        first.release()  # late: the connection serves the second request now
        first.close()
        assert await read_body(second, up) == b"ok"
        second.release()
        assert await fetch(client, up) == (200, b"ok")
    assert client.opened == 1
