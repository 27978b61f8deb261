"""Relaying a metered SSE stream: bytes go through unchanged, a tap reads a copy.

    tap = StreamTap(Endpoint.CHAT, strip_usage_chunk=True)
    end = await relay_stream(upstream_resp, client_resp, tap)
    usage = tap.usage            # the last usage seen, or None
    text = tap.text()            # generated text, to count when usage never came

Frames are written as soon as they are complete, byte for byte; the only frame ever
held back is the usage-only chat chunk that the proxy itself asked for (when the client
did not), so the client's stream is what it would have been without the proxy.
``StreamResponse.write`` waits for the client to drain, and the next upstream read waits
for that, so a slow client slows the upstream read instead of filling memory.
"""

from __future__ import annotations

import json
from enum import StrEnum

import aiohttp
from aiohttp import web

from proxy.endpoints import Endpoint
from proxy.sse import Frame, SSEDecoder
from proxy.usage import Usage, extract_stream_usage, is_usage_only_chunk, stream_text

# An upstream event larger than this (still unterminated) ends the stream.
MAX_EVENT_BYTES = 4 * 1024 * 1024


class StreamEnd(StrEnum):
    """How a relayed stream ended."""

    COMPLETE = "complete"  # the upstream ended its stream
    UPSTREAM_BROKEN = "upstream_broken"  # the upstream connection failed or timed out
    CLIENT_GONE = "client_gone"  # the client went away; the upstream read was stopped
    EVENT_TOO_LARGE = "event_too_large"


class StreamTap:
    """Sans-IO: reads usage and generated text from frames, and picks the bytes to relay."""

    def __init__(self, endpoint: Endpoint, *, strip_usage_chunk: bool) -> None:
        self.endpoint = endpoint
        self.strip_usage_chunk = strip_usage_chunk
        self.usage: Usage | None = None
        self.events = 0
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
        if event is None:
            return True
        data = event.data
        if not data or data == "[DONE]" or data[0] != "{":
            return True
        self.events += 1
        try:
            parsed = json.loads(data)
        except ValueError:
            return True
        if not isinstance(parsed, dict):
            return True
        text = stream_text(self.endpoint, parsed)
        if text:
            self._texts.append(text)
        if "usage" in data or "response" in parsed:
            usage = extract_stream_usage(self.endpoint, parsed)
            if usage is not None:
                self.usage = usage  # some servers repeat usage: the last one wins
                if self.strip_usage_chunk and is_usage_only_chunk(parsed):
                    return False
        return True

    def text(self) -> str:
        return "".join(self._texts)


async def relay_stream(
    upstream: aiohttp.ClientResponse,
    client: web.StreamResponse,
    tap: StreamTap,
    *,
    max_event_bytes: int = MAX_EVENT_BYTES,
) -> StreamEnd:
    """Copy the upstream's SSE body to the prepared client response, through ``tap``."""
    decoder = SSEDecoder()
    try:
        async for chunk in upstream.content.iter_any():
            frames = decoder.feed(chunk)
            if frames:
                out = tap.select(frames)
                if out:
                    try:
                        await client.write(out[0] if len(out) == 1 else b"".join(out))
                    except (ConnectionError, RuntimeError):
                        return StreamEnd.CLIENT_GONE
            if decoder.buffered > max_event_bytes:
                return StreamEnd.EVENT_TOO_LARGE
    except (aiohttp.ClientError, TimeoutError):
        return StreamEnd.UPSTREAM_BROKEN
    frames, leftover = decoder.flush()
    out = tap.select(frames)
    if leftover:
        out.append(leftover)  # an unterminated last event: pass on what arrived
    if out:
        try:
            await client.write(b"".join(out))
        except (ConnectionError, RuntimeError):
            return StreamEnd.CLIENT_GONE
    return StreamEnd.COMPLETE
