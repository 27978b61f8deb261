"""Relaying a metered SSE stream: bytes go through unchanged, a tap reads a copy.

    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=True)
    end = await relay_stream(upstream_resp, client_resp, tap, write_timeout_s=60, drain=True)
    usage = tap.billed_usage()   # the last usage seen (with the tier and hosted tool calls
                                 # the stream reported), or None
    tap.finished                 # [DONE] / response.completed seen
    text = tap.text()            # generated text, to count when usage never came

Frames are written as soon as they are complete, byte for byte; the only frame ever
held back is the usage-only chat chunk that the proxy itself asked for (when the client
did not), so the client's stream is what it would have been without the proxy.
A write that takes the client's socket buffer past its high-water mark waits for it to
drain, and the next upstream read waits for that, so a slow client slows the upstream read
instead of filling memory; a client that reads nothing for ``write_timeout_s`` is treated
as gone. Once the response's head is out, the chunks of a chunked response are framed here
and handed to the transport directly (a write per event through aiohttp's writer costs
two coroutines and its bookkeeping). When the client is gone and
``drain`` is set, the upstream is read to its end (through the tap, nothing written) so
that its usage still arrives; the upstream's own timeout bounds that.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from enum import StrEnum
from typing import cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.endpoints import Endpoint
from proxy.sse import Frame, SSEDecoder
from proxy.upstream import Response, ResponseBroken
from proxy.usage import (
    Usage,
    extract_stream_usage,
    is_usage_only_chunk,
    read_object,
    stream_service_tier,
    stream_text,
    stream_tool_calls,
)

# An upstream event larger than this (still unterminated) ends the stream.
MAX_EVENT_BYTES = 4 * 1024 * 1024


class StreamEnd(StrEnum):
    """How a relayed stream ended."""

    COMPLETE = "complete"  # the upstream ended its stream
    UPSTREAM_BROKEN = "upstream_broken"  # the upstream connection failed or timed out
    CLIENT_GONE = "client_gone"  # the client went away or stalled (drained, if asked)
    EVENT_TOO_LARGE = "event_too_large"


class StreamTap:
    """Sans-IO: reads usage and generated text from frames, and picks the bytes to relay."""

    def __init__(self, endpoint: Endpoint, *, strip_usage_chunk: bool) -> None:
        self.endpoint = endpoint
        self.strip_usage_chunk = strip_usage_chunk
        self.usage: Usage | None = None
        self.events = 0
        self.finished = False  # the stream's own ending ([DONE], response.completed) seen
        self.service_tier: str | None = None
        self._tier_seen: object = None  # the last raw service_tier value read
        self._tool_calls: Counter[str] = Counter()
        self._texts: list[str] = []

    def select(self, frames: list[Frame]) -> list[bytes]:
        """The raw bytes of ``frames`` to send on, in order."""
        out: list[bytes] = []
        for frame in frames:
            if self._observe(frame):
                out.append(frame.raw)
        return out

    def _observe(self, frame: Frame) -> bool:
        event = frame.event
        return True if event is None else self.observe(event.data)

    def observe(self, data: str) -> bool:
        """Read one event's data; whether the frame that carried it goes on."""
        if data == "[DONE]":
            self.finished = True
            return True
        if not data or data[0] != "{":
            return True
        self.events += 1
        parsed = read_object(data)
        if parsed is None:
            return True
        text = stream_text(self.endpoint, parsed)
        if text:
            self._texts.append(text)
        if "service_tier" in parsed and (
            self.endpoint is Endpoint.RESPONSES or parsed["service_tier"] != self._tier_seen
        ):
            # Chat chunks repeat it on every chunk: read again only when it changes.
            self._tier_seen = parsed["service_tier"]
            self.service_tier = stream_service_tier(self.endpoint, parsed) or self.service_tier
        if "item" in parsed:
            tool = stream_tool_calls(self.endpoint, parsed)
            if tool is not None:
                self._tool_calls[tool] += 1
        if parsed.get("type") == "response.completed":
            self.finished = True
        if "usage" in data or "response" in parsed:
            usage = extract_stream_usage(self.endpoint, parsed)
            if usage is not None:
                self.usage = usage  # some servers repeat usage: the last one wins
                if self.strip_usage_chunk and is_usage_only_chunk(parsed):
                    return False
        return True

    def text(self) -> str:
        return "".join(self._texts)

    def billed_usage(self) -> Usage | None:
        """The usage to bill: the last one seen, at the service tier the stream reported,
        with at least the hosted tool calls the stream's items showed."""
        usage = self.usage
        if usage is None:
            return None
        calls = Counter(dict(usage.tool_calls))
        for name, count in self._tool_calls.items():
            calls[name] = max(calls[name], count)
        return dataclasses.replace(
            usage,
            service_tier=usage.service_tier or self.service_tier,
            tool_calls=tuple(sorted(calls.items())),
        )


def _fits(transport: asyncio.BaseTransport | None, size: int) -> bool:
    """Whether ``size`` more bytes fit under the transport's high-water mark: then the
    write cannot wait on the client (the protocol pauses only above it)."""
    # Duck-typed: uvloop's transports have these methods but are not asyncio's classes.
    buffered = getattr(transport, "get_write_buffer_size", None)
    limits = getattr(transport, "get_write_buffer_limits", None)
    if buffered is None or limits is None or transport is None or transport.is_closing():
        return False
    high: int = limits()[1]
    return bool(buffered() + size <= high)


async def _write(
    client: web.StreamResponse,
    data: bytes,
    timeout_s: float,
    transport: asyncio.BaseTransport | None = None,
) -> bool:
    """Send ``data``; False when the client is gone or read nothing for ``timeout_s``.

    The timeout is armed only when the write may wait for the client (its socket buffer
    is full): a timer per write costs more than the write."""
    try:
        if _fits(transport, len(data)):
            await client.write(data)
        else:
            async with asyncio.timeout(timeout_s):
                await client.write(data)
    except (ConnectionError, RuntimeError, TimeoutError):
        return False
    return True


async def relay_stream(
    upstream: Response,
    client: web.StreamResponse,
    tap: StreamTap,
    *,
    write_timeout_s: float,
    drain: bool,
    client_gone: bool = False,
    transport: asyncio.BaseTransport | None = None,
    writer: AbstractStreamWriter | None = None,
    max_event_bytes: int = MAX_EVENT_BYTES,
) -> StreamEnd:
    """Copy the upstream's SSE body to the prepared client response, through ``tap``
    (``client_gone``: the client left before the response could start; only drain)."""
    decoder = SSEDecoder()
    sink = _Sink(client, write_timeout_s, transport, writer)
    gone = client_gone
    try:
        while chunk := await upstream.read_any():
            lone = decoder.lone_data(chunk)
            if lone is not None:  # one event, the chunk its frame: no frame objects
                out = [chunk] if tap.observe(lone) else []
            else:
                frames = decoder.feed(chunk)
                out = tap.select(frames) if frames else []
            if out and not gone:
                data = out[0] if len(out) == 1 else b"".join(out)
                sent = sink.send(data)
                if sent is None:
                    sent = await sink.write(data)
                gone = not sent
                if gone and not drain:
                    return StreamEnd.CLIENT_GONE
            if decoder.buffered > max_event_bytes:
                return StreamEnd.EVENT_TOO_LARGE
    except (ResponseBroken, OSError, TimeoutError):
        return StreamEnd.UPSTREAM_BROKEN
    frames, leftover = decoder.flush()
    out = tap.select(frames)
    if leftover:
        out.append(leftover)  # an unterminated last event: pass on what arrived
    if out and not gone:
        data = b"".join(out)
        sent = sink.send(data)
        gone = not (await sink.write(data) if sent is None else sent)
    return StreamEnd.CLIENT_GONE if gone else StreamEnd.COMPLETE


class _Sink:
    """Writes relayed bytes to the prepared client response.

    The first write goes through aiohttp (it sends the head, if still held). After it, if
    the response is chunked and not compressed, each write is framed as a chunk here and
    handed to the transport at once (``send``, no coroutine), unless the transport's
    buffer is past its high-water mark: then ``write`` waits for it to drain (the protocol
    is paused), for at most ``timeout_s``, first. aiohttp's ``write_eof`` ends the chunked
    body as usual."""

    __slots__ = ("_client", "_direct", "_high", "_timeout_s", "_transport", "_writer")

    def __init__(
        self,
        client: web.StreamResponse,
        timeout_s: float,
        transport: asyncio.BaseTransport | None,
        writer: AbstractStreamWriter | None,
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._transport = transport
        self._writer = writer
        self._direct: asyncio.WriteTransport | None = None
        self._high = 0

    def send(self, data: bytes) -> bool | None:
        """Send ``data`` now if it goes directly and the client's buffer has room: True
        when sent, False when the client is gone; None: await ``write(data)``."""
        transport = self._direct
        if transport is None or transport.get_write_buffer_size() > self._high:
            return None
        if transport.is_closing():
            return False
        transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        return True

    async def write(self, data: bytes) -> bool:
        """Send ``data``, waiting for the client's buffer to drain first if it must; False
        when the client is gone or read nothing for the timeout."""
        transport = self._direct
        if transport is None:
            if not await _write(self._client, data, self._timeout_s, self._transport):
                return False
            self._go_direct()
            return True
        assert self._writer is not None  # set whenever _direct is
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._writer.drain()
        except (ConnectionError, RuntimeError, TimeoutError):
            return False
        if transport.is_closing():
            return False
        transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        return True

    def _go_direct(self) -> None:
        """Write directly from now on, if this response and transport allow it."""
        client, transport = self._client, self._transport
        if (
            self._writer is None
            or transport is None
            or client.compression
            or client.headers.get("Transfer-Encoding") != "chunked"
            # Duck-typed: uvloop's transports are not asyncio's classes.
            or not hasattr(transport, "get_write_buffer_limits")
            or not hasattr(transport, "get_write_buffer_size")
        ):
            return
        direct = cast(asyncio.WriteTransport, transport)
        self._high = direct.get_write_buffer_limits()[1]
        self._direct = direct
