"""Which headers cross the proxy each way, and the budget headers it adds."""

from __future__ import annotations

import pytest

from proxy.budget import BudgetStatus, RateStatus
from proxy.counters import Unit
from proxy.headers import (
    HOP_BY_HOP,
    OPERATOR_ACCOUNT,
    budget_headers,
    duration,
    rate_limit_headers,
    request_headers,
    response_headers,
)

HOP = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Authenticate", "Basic"),
    ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "h2c"),
]


def names(pairs: list[tuple[str, str]]) -> list[str]:
    return [name for name, _ in pairs]


def test_hop_by_hop_set() -> None:
    assert {name.lower() for name, _ in HOP} == HOP_BY_HOP


# --- request -------------------------------------------------------------------------------


def test_request_keeps_end_to_end_headers_in_order_then_adds_its_own() -> None:
    items = [
        ("Content-Type", "application/json"),
        ("OpenAI-Beta", "assistants=v2"),
        ("User-Agent", "OpenAI/Python 1.40.0"),
        ("X-Custom", "1"),
        ("X-Custom", "2"),
        ("Accept", "text/event-stream"),
    ]
    assert request_headers(items, api_key="sk-upstream") == [
        *items,
        ("Accept-Encoding", "identity"),
        ("Authorization", "Bearer sk-upstream"),
    ]


def test_request_drops_hop_by_hop_headers() -> None:
    out = request_headers([*HOP, ("X-Keep", "yes")], api_key=None)
    assert out == [("X-Keep", "yes"), ("Accept-Encoding", "identity")]


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "X-Api-Key",
        "api-key",
        "Api-Key",
        "Cookie",
        "Host",
        "Content-Length",
        "Content-Encoding",
        "Accept-Encoding",
    ],
)
def test_request_owned_headers_are_never_relayed(name: str) -> None:
    out = request_headers([(name, "client-value"), ("X-Keep", "yes")], api_key="sk-upstream")
    assert ("X-Keep", "yes") in out
    assert all(value != "client-value" for _, value in out)


def test_client_credentials_are_replaced_by_the_injected_key() -> None:
    items = [
        ("Authorization", "Bearer sk-client"),
        ("x-api-key", "sk-client"),
        ("api-key", "sk-client"),
        ("Cookie", "session=abc"),
    ]
    out = request_headers(items, api_key="sk-upstream")
    assert out == [("Accept-Encoding", "identity"), ("Authorization", "Bearer sk-upstream")]


@pytest.mark.parametrize("api_key", [None, ""])
def test_no_upstream_key_means_no_authorization(api_key: str | None) -> None:
    out = request_headers([("Authorization", "Bearer sk-client")], api_key=api_key)
    assert out == [("Accept-Encoding", "identity")]


def test_request_drops_headers_named_in_connection() -> None:
    items = [
        ("Connection", "keep-alive, X-Trace-Id ,,  x-hop"),
        ("connection", "X-Second"),
        ("x-trace-id", "t"),
        ("X-HOP", "h"),
        ("X-Second", "s"),
        ("X-Keep", "k"),
    ]
    assert request_headers(items, api_key=None) == [
        ("X-Keep", "k"),
        ("Accept-Encoding", "identity"),
    ]


def test_request_drop_is_case_insensitive() -> None:
    items = [
        ("OpenAI-Organization", "org-client"),
        ("openai-project", "proj-client"),
        ("X-Internal", "1"),
        ("X-Keep", "k"),
    ]
    assert request_headers(items, api_key="k", drop=OPERATOR_ACCOUNT | {"X-INTERNAL"}) == [
        ("X-Keep", "k"),
        ("Accept-Encoding", "identity"),
        ("Authorization", "Bearer k"),
    ]
    # Without a drop list, the organization and project go through (passthrough mode).
    assert names(request_headers(items, api_key=None)) == [
        "OpenAI-Organization",
        "openai-project",
        "X-Internal",
        "X-Keep",
        "Accept-Encoding",
    ]


def test_request_drop_accepts_any_iterable() -> None:
    items = [("X-A", "1"), ("X-B", "2")]
    assert request_headers(items, api_key=None, drop=iter(["x-a"])) == [
        ("X-B", "2"),
        ("Accept-Encoding", "identity"),
    ]


# --- response ------------------------------------------------------------------------------


def test_response_keeps_end_to_end_headers_in_order() -> None:
    items = [
        ("Content-Type", "application/json"),
        ("x-request-id", "req_123"),
        ("openai-processing-ms", "42"),
        ("x-ratelimit-remaining-tokens", "999"),
        ("Cache-Control", "no-cache"),
    ]
    assert response_headers(items) == items


@pytest.mark.parametrize(
    "name",
    ["Content-Length", "content-encoding", "Set-Cookie", "set-cookie", "Server", "Date"],
)
def test_response_owned_headers_are_dropped(name: str) -> None:
    assert response_headers([(name, "v"), ("X-Keep", "k")]) == [("X-Keep", "k")]


def test_response_drops_hop_by_hop_and_connection_named_headers() -> None:
    items = [*HOP, ("Connection", "X-Upstream-Hop"), ("x-upstream-hop", "1"), ("X-Keep", "k")]
    assert response_headers(items) == [("X-Keep", "k")]


def test_response_extra_drop_is_case_insensitive() -> None:
    items = [("OpenAI-Organization", "org-op"), ("OPENAI-PROJECT", "proj-op"), ("X-Keep", "k")]
    assert response_headers(items, drop=OPERATOR_ACCOUNT) == [("X-Keep", "k")]
    assert response_headers(items, drop=["x-keep"]) == items[:2]


def test_response_adds_nothing() -> None:
    assert response_headers([]) == []


# --- budget headers ------------------------------------------------------------------------


def test_budget_headers_without_status_are_empty() -> None:
    assert budget_headers(None) == {}


def test_budget_headers_have_six_decimals() -> None:
    status = BudgetStatus(
        window="hourly", limit_micros=10_000_000, remaining_micros=1_234_567, warnings=()
    )
    assert budget_headers(status) == {
        "x-budget-limit-usd": "10.000000",
        "x-budget-remaining-usd": "1.234567",
        "x-budget-window": "hourly",
    }


def test_budget_headers_small_and_zero_amounts() -> None:
    status = BudgetStatus(window="monthly", limit_micros=1, remaining_micros=0, warnings=())
    got = budget_headers(status)
    assert got["x-budget-limit-usd"] == "0.000001"
    assert got["x-budget-remaining-usd"] == "0.000000"
    assert got["x-budget-window"] == "monthly"


def test_budget_warnings_are_joined() -> None:
    status = BudgetStatus(
        window="daily",
        limit_micros=100_000_000,
        remaining_micros=4_700_000,
        warnings=(
            "hourly soft cap exceeded: $8.5000 / $8.00",
            "daily budget at 95.3%: $95.3000 / $100.00",
        ),
    )
    assert budget_headers(status)["x-budget-warning"] == (
        "hourly soft cap exceeded: $8.5000 / $8.00; daily budget at 95.3%: $95.3000 / $100.00"
    )


def test_one_warning_is_sent_as_is() -> None:
    status = BudgetStatus(
        window="hourly",
        limit_micros=10_000_000,
        remaining_micros=1_500_000,
        warnings=("hourly budget at 85.0%: $8.5000 / $10.00",),
    )
    assert budget_headers(status)["x-budget-warning"] == "hourly budget at 85.0%: $8.5000 / $10.00"


def test_expect_never_goes_upstream() -> None:
    # The proxy read the whole body already; an upstream that never answers 100-continue
    # would leave the request hanging until the timeout.
    out = request_headers([("Expect", "100-continue"), ("Accept", "*/*")], api_key=None)
    assert ("Expect", "100-continue") not in out
    assert ("Accept", "*/*") in out


def test_upstream_budget_headers_are_not_relayed() -> None:
    items = [("x-budget-warning", "from another proxy"), ("x-request-id", "r1")]
    assert response_headers(items) == [("x-request-id", "r1")]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.12, "120ms"),
        (0.0004, "0ms"),
        (1, "1s"),
        (1.2, "2s"),
        (59.5, "1m0s"),
        (360, "6m0s"),
        (3723.4, "1h2m4s"),
        (86_400, "24h0m0s"),
    ],
)
def test_reset_durations_use_openais_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_rate_limit_headers_name_each_unit_its_cap_counts() -> None:
    statuses = {Unit.REQUESTS: RateStatus(limit=60, remaining=59, reset_s=42.5)}
    assert rate_limit_headers(statuses) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "43s",
    }
    assert rate_limit_headers({}) == {}


def test_upstream_rate_limit_headers_are_dropped_when_the_proxy_owns_them() -> None:
    items = [("x-ratelimit-remaining-tokens", "9"), ("x-request-id", "r")]
    assert response_headers(items, rate_limits=False) == [("x-request-id", "r")]
    assert response_headers(items) == items
