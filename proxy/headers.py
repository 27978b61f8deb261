"""Which headers cross the proxy, and the budget headers it adds.

Hop-by-hop headers (RFC 9110 7.6.1) and any header named in ``Connection`` are dropped
both ways; credentials are replaced, never relayed; the body is re-framed by aiohttp.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from proxy.budget import BudgetStatus, RateStatus
from proxy.counters import Unit
from proxy.pricing import usd_text

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
# OpenAI's rate-limit headers: from the upstream they describe the operator's account;
# the proxy sends its own for the tenant's rate caps.
RATE_LIMIT_PREFIX = "x-ratelimit-"
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
    items: Iterable[tuple[str, str]], *, drop: Iterable[str] = (), rate_limits: bool = True
) -> list[tuple[str, str]]:
    """Upstream response headers to relay to the client (never the upstream's own
    ``x-budget-*``: only this proxy's budget headers reach the client; nor its
    ``x-ratelimit-*`` unless ``rate_limits``)."""
    owned = ("x-budget-",) if rate_limits else ("x-budget-", RATE_LIMIT_PREFIX)
    return [
        (name, value)
        for name, value in _filter(items, _RESPONSE_OWNED, frozenset(d.lower() for d in drop))
        if not name.lower().startswith(owned)
    ]


def _usd(micros: int) -> str:
    return usd_text(micros)


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


def duration(seconds: float) -> str:
    """OpenAI's reset format (Go durations): ``120ms``, ``1s``, ``6m0s``, ``1h2m3s``.

    >>> duration(0.12), duration(1), duration(360), duration(3723.4)
    ('120ms', '1s', '6m0s', '1h2m4s')
    """
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = int(-(-seconds // 1))  # up: the window has reset by then
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_limit_headers(statuses: Mapping[Unit, RateStatus]) -> Mapping[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the tightest rate cap
    of each unit; empty for a unit no rate cap counts."""
    out: dict[str, str] = {}
    for unit, status in statuses.items():
        out[f"x-ratelimit-limit-{unit.value}"] = str(status.limit)
        out[f"x-ratelimit-remaining-{unit.value}"] = str(status.remaining)
        out[f"x-ratelimit-reset-{unit.value}"] = duration(status.reset_s)
    return out
