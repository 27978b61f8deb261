"""Which headers cross the proxy, and the budget headers it adds.

Hop-by-hop headers (RFC 9110 7.6.1) and any header named in ``Connection`` are dropped
both ways; credentials are replaced, never relayed; the body is re-framed by aiohttp.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from proxy.budget import BudgetStatus
from proxy.pricing import micros_to_usd

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers the proxy owns: credentials, framing, and what it negotiates itself.
# ("api-key" is Azure's spelling of a credential; cookies are never relayed.)
_REQUEST_OWNED = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
        # The proxy has read the whole body already (and answered any 100-continue itself).
        "expect",
    }
)
# With the operator's upstream key (mode keys) a client must not pick the organization or
# project it bills to, nor learn which ones the key belongs to.
OPERATOR_ACCOUNT = frozenset({"openai-organization", "openai-project"})
# Response headers that describe a body the proxy re-frames (it may decompress it), and
# cookies, which belong to the proxy's upstream session, not to the client.
_RESPONSE_OWNED = frozenset({"content-length", "content-encoding", "server", "date", "set-cookie"})


def _connection_named(headers: Iterable[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def _filter(
    items: Iterable[tuple[str, str]], drop: frozenset[str], extra: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    pairs = list(items)
    named = _connection_named(pairs)
    return [
        (name, value)
        for name, value in pairs
        if (low := name.lower()) not in HOP_BY_HOP
        and low not in drop
        and low not in extra
        and low not in named
    ]


def request_headers(
    items: Iterable[tuple[str, str]], *, api_key: str | None, drop: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Headers to send upstream: the client's, minus hop-by-hop and owned ones, plus the key."""
    out = _filter(items, _REQUEST_OWNED, frozenset(d.lower() for d in drop))
    out.append(("Accept-Encoding", "identity"))
    if api_key:
        out.append(("Authorization", f"Bearer {api_key}"))
    return out


def response_headers(
    items: Iterable[tuple[str, str]], *, drop: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Upstream response headers to relay to the client (never the upstream's own
    ``x-budget-*``: only this proxy's budget headers reach the client)."""
    return [
        (name, value)
        for name, value in _filter(items, _RESPONSE_OWNED, frozenset(d.lower() for d in drop))
        if not name.lower().startswith("x-budget-")
    ]


def _usd(micros: int) -> str:
    return f"{micros_to_usd(micros):.6f}"


def budget_headers(status: BudgetStatus | None) -> Mapping[str, str]:
    """``x-budget-*`` headers; empty when no budget cap applies to the request."""
    if status is None:
        return {}
    headers = {
        "x-budget-limit-usd": _usd(status.limit_micros),
        "x-budget-remaining-usd": _usd(status.remaining_micros),
        "x-budget-window": status.window,
    }
    if status.warnings:
        headers["x-budget-warning"] = "; ".join(status.warnings)
    return headers
