"""The stream tap, without a server: which frames go on, what usage and text it saw; and
the sink that writes the relayed bytes to a real client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import new_event_loop
from proxy.endpoints import Endpoint
from proxy.relay import StreamTap, _fits, _Sink
from proxy.sse import SSEDecoder
from proxy.usage import Usage


def frame(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
CHUNKS = [
    b": keep-alive\n\n",
    frame({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
    frame({"choices": [{"index": 0, "delta": {"content": "Hel"}}], "usage": None}),
    frame({"choices": [{"index": 0, "delta": {"content": "lo"}}], "usage": None}),
    frame({"choices": [], "usage": USAGE}),
    b"data: [DONE]\n\n",
]


def run(tap: StreamTap, chunks: list[bytes]) -> bytes:
    decoder = SSEDecoder()
    out: list[bytes] = []
    for chunk in chunks:
        out += tap.select(decoder.feed(chunk))
    frames, leftover = decoder.flush()
    out += tap.select(frames)
    return b"".join(out) + leftover


def test_strips_only_the_usage_chunk_it_asked_for() -> None:
    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=True)
    out = run(tap, CHUNKS)
    assert out == b"".join(c for i, c in enumerate(CHUNKS) if i != 4)
    assert tap.usage == Usage(7, 0, 3, 0)
    assert tap.text() == "Hello"


def test_keeps_the_usage_chunk_the_client_asked_for() -> None:
    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=False)
    assert run(tap, CHUNKS) == b"".join(CHUNKS)
    assert tap.usage == Usage(7, 0, 3, 0)


def test_any_split_gives_the_same_bytes() -> None:
    whole = b"".join(CHUNKS)
    expected = b"".join(c for i, c in enumerate(CHUNKS) if i != 4)
    for cut in range(1, len(whole)):
        tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=True)
        assert run(tap, [whole[:cut], whole[cut:]]) == expected
        assert tap.usage is not None


def test_usage_on_every_chunk_last_wins_and_nothing_is_stripped() -> None:
    chunks = [
        frame(
            {"choices": [{"delta": {"content": "a"}}], "usage": {**USAGE, "completion_tokens": 1}}
        ),
        frame(
            {"choices": [{"delta": {"content": "b"}}], "usage": {**USAGE, "completion_tokens": 2}}
        ),
    ]
    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=True)
    assert run(tap, chunks) == b"".join(chunks)
    assert tap.usage is not None and tap.usage.completion_tokens == 2


def test_vllm_usage_chunk_with_null_choices_is_stripped() -> None:
    chunks = [
        frame({"choices": [{"delta": {"content": "a"}}]}),
        frame({"choices": None, "usage": USAGE}),
    ]
    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=True)
    assert run(tap, chunks) == chunks[0]
    assert tap.usage == Usage(7, 0, 3, 0)


def test_responses_usage_comes_from_response_completed() -> None:
    usage = {"input_tokens": 5, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 2}}
    events = [
        b"event: response.created\ndata: "
        + json.dumps({"type": "response.created", "response": {"usage": None}}).encode()
        + b"\n\n",
        b"event: response.output_text.delta\ndata: "
        + json.dumps({"type": "response.output_text.delta", "delta": "Hi"}).encode()
        + b"\n\n",
        b"event: response.completed\ndata: "
        + json.dumps({"type": "response.completed", "response": {"usage": usage}}).encode()
        + b"\n\n",
    ]
    tap = StreamTap(Endpoint.RESPONSES, strip_usage_chunk=False)
    assert run(tap, events) == b"".join(events)
    assert tap.usage == Usage(5, 2, 9, 0)
    assert tap.text() == "Hi"


def test_junk_events_pass_through_untouched() -> None:
    chunks = [b"data: {not json\n\n", b"data: [1,2]\n\n", b"event: x\n\n", b"data: plain\n\n"]
    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=True)
    assert run(tap, chunks) == b"".join(chunks)
    assert tap.usage is None
    assert tap.text() == ""


def test_unterminated_last_event_is_passed_on() -> None:
    chunks = [frame({"choices": [{"delta": {"content": "a"}}]}), b'data: {"choices": [{"del']
    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=True)
    assert run(tap, chunks) == b"".join(chunks)
    assert tap.text() == "a"


def _fits_on(loop: asyncio.AbstractEventLoop) -> tuple[bool, bool, bool]:
    """On ``loop``, whether a small write, a write past the high-water mark, and a write
    on a closed transport count as fitting the client's buffer."""

    async def scenario() -> tuple[bool, bool, bool]:
        accepted: asyncio.Future[asyncio.StreamWriter] = loop.create_future()

        def on_client(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer)

        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, client = await asyncio.open_connection("127.0.0.1", port)
        writer = await accepted
        transport = writer.transport
        high = transport.get_write_buffer_limits()[1]
        small, large = _fits(transport, 10), _fits(transport, high + 1)
        writer.close()
        closed = _fits(transport, 10)
        client.close()
        server.close()
        await server.wait_closed()
        return small, large, closed

    try:
        return loop.run_until_complete(scenario())
    finally:
        loop.close()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_write_that_fits_the_client_buffer_is_told_apart_on_either_loop(kind: str) -> None:
    # A write that fits arms no timer; uvloop's transports are not asyncio's classes, so the
    # check must not depend on them.
    assert _fits_on(new_event_loop(kind)) == (True, False, False)


def chunk(**fields: object) -> bytes:
    return b"data: " + orjson.dumps({"object": "chat.completion.chunk", **fields}) + b"\n\n"


def test_the_last_valid_service_tier_of_a_stream_is_billed() -> None:
    delta = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3}}
    chunks = [
        chunk(service_tier="default", **delta),
        chunk(service_tier="default", **delta),  # repeated: read once
        chunk(service_tier="priority", **delta),
        chunk(service_tier=7, **delta),  # not a tier: the last one stands
        chunk(service_tier=7, **usage),
    ]
    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=False)
    run(tap, chunks)
    billed = tap.billed_usage()
    assert billed is not None and billed.service_tier == "priority"
    assert tap.text() == "xxxx"


def test_a_delta_with_more_than_content_is_read_whole() -> None:
    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=False)
    run(
        tap,
        [
            chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": "a"}}]),
            chunk(choices=[{"index": 0, "delta": {"content": "b", "refusal": None}}]),
            chunk(choices=[{"delta": {"content": "c", "reasoning_content": "r", "role": "x"}}]),
            chunk(choices=[{"delta": {"content": "d"}}, {"delta": {"content": "e"}}]),
        ],
    )
    assert tap.text() == "abcrde"


PIECES = [b"data: one\n\n", b"data: " + b"x" * 70_000 + b"\n\n", b"", b"data: [DONE]\n\n"]


async def _sink_server(compress: bool = False) -> tuple[TestServer, list[bool]]:
    """A server whose response is written through a ``_Sink``; the list gets, after each
    write, whether the sink writes directly."""
    direct: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        if compress:
            out.enable_compression()
        await out.prepare(request)
        sink = _Sink(out, 5.0, request.transport, request.writer)
        for piece in PIECES:
            if piece:
                sent = sink.send(piece)
                assert sent is not False
                assert sent or await sink.write(piece)
            direct.append(sink._direct is not None)
        return out

    app = web.Application()
    app.router.add_get("/", handler)
    server = TestServer(app)
    await server.start_server()
    return server, direct


async def test_a_chunked_response_is_written_directly_after_its_first_write() -> None:
    server, direct = await _sink_server()
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await reader.read()
        writer.close()
    finally:
        await server.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert direct == [True, True, True, True]
    # Exactly the pieces, each its own chunk, and the body's end.
    expected = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in PIECES if p) + b"0\r\n\r\n"
    assert body == expected


async def test_an_http_1_0_response_is_written_by_aiohttp() -> None:
    # No chunked encoding in HTTP/1.0: the body ends with the connection.
    server, direct = await _sink_server()
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        head, _, body = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
    finally:
        await server.close()
    assert b"chunked" not in head
    assert direct == [False, False, False, False]
    assert body == b"".join(PIECES)


async def test_a_compressed_response_is_written_by_aiohttp() -> None:
    server, direct = await _sink_server(compress=True)
    try:
        async with aiohttp.ClientSession() as session, session.get(server.make_url("/")) as resp:
            assert resp.headers["Content-Encoding"] in ("gzip", "deflate")
            body = await resp.read()
    finally:
        await server.close()
    assert direct == [False, False, False, False]
    assert body == b"".join(PIECES)
