"""Sending a request to the configured upstream over the app's one pooled session.

    async with send(session, upstream, "chat/completions", method="POST",
                    headers=hdrs, body=raw) as resp:
        data = await read_body(resp)

The URL and key come only from the caps file; redirects are never followed;
``aiohttp`` errors become ``UpstreamError`` (502) and timeouts ``UpstreamTimeout`` (504),
with ``sent=False`` only when the request never reached the upstream (no connection).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiohttp

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamTooLarge


def new_session(*, limit: int = 0) -> aiohttp.ClientSession:
    """The app's upstream session: pooled keep-alive connections, no cookies, no env proxies."""
    connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=60, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        trust_env=False,
        skip_auto_headers=("User-Agent",),
    )


def url_for(upstream: UpstreamConfig, path: str) -> str:
    return f"{upstream.base_url}/{path}"


def timeout_for(upstream: UpstreamConfig) -> aiohttp.ClientTimeout:
    """The upstream's timeouts (made once per upstream config: configs are frozen)."""
    return _timeouts(upstream.timeout_s, upstream.connect_timeout_s)


@functools.lru_cache(maxsize=64)
def _timeouts(timeout_s: float, connect_timeout_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=timeout_s, sock_connect=connect_timeout_s, sock_read=timeout_s
    )


@asynccontextmanager
async def send(
    session: aiohttp.ClientSession,
    upstream: UpstreamConfig,
    path: str,
    *,
    method: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """Open the upstream response; errors while opening it are translated."""
    try:
        resp = await session.request(
            method,
            url_for(upstream, path),
            headers=list(headers),
            data=body,
            allow_redirects=False,
            timeout=timeout_for(upstream),
        )
    except aiohttp.ConnectionTimeoutError as exc:
        raise UpstreamTimeout(f"Upstream '{upstream.name}' timed out", sent=False) from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamError(f"Upstream '{upstream.name}' is unreachable", sent=False) from exc
    except TimeoutError as exc:
        raise UpstreamTimeout(f"Upstream '{upstream.name}' timed out", sent=True) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"Upstream '{upstream.name}' broke off", sent=True) from exc
    try:
        yield resp
    finally:
        resp.release()


async def read_body(
    resp: aiohttp.ClientResponse, upstream: UpstreamConfig, *, limit: int | None = None
) -> bytes:
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
    try:
        if length is not None:  # known and within the limit: one read
            return await resp.read()
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if limit is not None and size > limit:
                raise too_large()
            chunks.append(chunk)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"Upstream '{upstream.name}' timed out") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"Upstream '{upstream.name}' broke off its response") from exc
    return b"".join(chunks)
