"""The spend API under ``/api/v1/``: what a tenant has spent, and which caps apply to it.

    GET /api/v1/costs/current?agent_id=bot   tenant key, or admin token + tenant_id=
    GET /api/v1/caps?agent_id=bot            tenant key, or admin token + tenant_id=
    GET /api/v1/tenants                      admin token only
    GET /api/v1/costs/history?granularity=hour   tenant key, or admin token (+ tenant_id=)
    GET /api/v1/rejections                   tenant key, or admin token (+ tenant_id=)
    GET /api/v1/scopes?limit=20              tenant key, or admin token + tenant_id=
    GET /api/v1/openapi.json                 no credentials

Callers authenticate like proxied calls (``Authorization: Bearer`` or ``x-api-key`` with a
tenant's proxy key) and read only their own tenant; ``Authorization: Bearer
<auth.admin_token>`` reads any tenant (no admin token configured: no admin access), and
every configured tenant at once where ``tenant_id`` is optional.
Nothing here is ever forwarded upstream.

Money is written as JSON numbers with exactly six decimals, straight from the exact
``Decimal`` (never through a float). Each tenant read is one ``store.snapshot``;
``resets_in_secs`` uses this host's clock (display only: the store decides with its own).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from proxy.auth import AGENT_ID, bearer_key
from proxy.budget import DEFAULT_AGENT, plan_budget
from proxy.config import (
    ID_PATTERN,
    MAX_MODEL_CHARS,
    BudgetCap,
    ModelCap,
    RateCap,
    Settings,
    TokenCap,
)
from proxy.counters import SEEN_LIMIT_MAX, SEEN_READ_MAX, CounterState, SeenToday, Store
from proxy.errors import CAP_CODES, BadRequest, Forbidden
from proxy.history import DAYS_KEPT, HOURS_KEPT, REJECTIONS_KEPT, Rejection, SpendHistory
from proxy.pricing import micros_to_usd, usd_to_micros
from proxy.state import LEDGER, RUNTIME, Runtime
from proxy.windows import Window, period_of

PREFIX = "/api/v1"
TENANT_ID = re.compile(ID_PATTERN)
PCT_PLACES = Decimal("0.0001")
SCOPES_LIMIT = 20  # agents (end users) listed by /scopes unless limit= says otherwise


# --- access ------------------------------------------------------------------------------


def is_admin(settings: Settings, headers: Mapping[str, str]) -> bool:
    """Whether the request carries the admin token (compared in constant time)."""
    token, key = settings.auth.admin_token, bearer_key(headers)
    if token is None or key is None:
        return False
    # Header bytes that are not UTF-8 arrive as surrogates: hash them as the bytes they were.
    given = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(given, hashlib.sha256(token.get_secret_value().encode()).digest())


def readable_tenant(rt: Runtime, request: web.Request) -> str:
    """The tenant this request may read: its own, or ``tenant_id=`` for the admin."""
    wanted = request.query.get("tenant_id")
    if is_admin(rt.settings, request.headers):
        if wanted is None:
            raise BadRequest("tenant_id is required with the admin token.", param="tenant_id")
        if TENANT_ID.fullmatch(wanted) is None:
            raise BadRequest(
                "Invalid tenant_id: use 1-64 characters of letters, digits and . _ -",
                param="tenant_id",
            )
        return wanted
    own = rt.auth.authenticate(request.headers).tenant_id  # 401 for a missing or unknown key
    if wanted is not None and wanted != own:
        raise Forbidden("A tenant key may only read its own tenant.", param="tenant_id")
    return own


def readable_tenants(rt: Runtime, request: web.Request) -> list[str]:
    """``readable_tenant``, except that the admin without ``tenant_id`` reads every
    configured tenant."""
    if "tenant_id" not in request.query and is_admin(rt.settings, request.headers):
        return [t.id for t in rt.settings.tenants]
    return [readable_tenant(rt, request)]


def requested_agent(request: web.Request) -> str:
    agent = request.query.get("agent_id", DEFAULT_AGENT)
    if AGENT_ID.fullmatch(agent) is None:
        raise BadRequest(
            "Invalid agent_id: use 1-128 characters of letters, digits and . _ : @ / -",
            param="agent_id",
        )
    return agent


def requested_user(request: web.Request) -> str | None:
    user = request.query.get("user_id")
    if user is not None and AGENT_ID.fullmatch(user) is None:
        raise BadRequest(
            "Invalid user_id: use 1-128 characters of letters, digits and . _ : @ / -",
            param="user_id",
        )
    return user


def requested_limit(request: web.Request) -> int:
    text = request.query.get("limit", str(SCOPES_LIMIT))
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= SEEN_LIMIT_MAX):
        raise BadRequest(f"limit must be an integer from 1 to {SEEN_LIMIT_MAX}.", param="limit")
    return int(text)


# --- rendering ---------------------------------------------------------------------------


def encode(value: object) -> str:
    """JSON text in which a ``Decimal`` is an exact number (``json`` has no such option)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)


def json_response(body: dict[str, Any]) -> web.Response:
    return web.Response(text=encode(body), content_type="application/json")


def usd(value: Decimal | None) -> Decimal | None:
    """A configured USD amount with six decimals, as the store counts it."""
    return None if value is None else micros_to_usd(usd_to_micros(value))


def window_spend(state: CounterState, cap: BudgetCap, now: float) -> dict[str, Any]:
    limit, period = state.counter.limit, state.period
    pct = Decimal(state.spent * 100) / limit if limit else Decimal(0)
    return {
        "window": state.counter.window.value,
        "current_spend_usd": micros_to_usd(state.spent),
        "hard_limit_usd": micros_to_usd(limit),
        "soft_limit_usd": usd(cap.soft_limit_usd),
        "utilization_pct": pct.quantize(PCT_PLACES, rounding=ROUND_HALF_UP),
        "resets_in_secs": min(period.resets_in(now), period.end - period.start),
        "held_usd": micros_to_usd(state.held),
    }


def rate_window(state: CounterState, now: float) -> dict[str, Any]:
    counter, period = state.counter, state.period
    kind, ident = counter.scope
    pct = Decimal(state.spent * 100) / counter.limit if counter.limit else Decimal(0)
    return {
        "scope": kind,
        "scope_id": ident,
        "window": counter.window.value,
        "unit": counter.unit.value,
        "used": state.spent,
        "held": state.held,
        "limit": counter.limit,
        "utilization_pct": pct.quantize(PCT_PLACES, rounding=ROUND_HALF_UP),
        "resets_in_secs": min(period.resets_in(now), period.end - period.start),
    }


async def snapshot(
    settings: Settings, store: Store, tenant_id: str, agent_id: str, user_id: str | None = None
) -> dict[str, Any]:
    """A tenant's windows of every kind (its own, the agent's, each model cap's, the end
    user's), read in one store round trip, and its requests in flight."""
    plan = plan_budget(
        settings, tenant_id, agent_id, amount_micros=0, user=user_id, every_model_cap=True
    )
    states = await store.snapshot(plan.counters, tz=settings.tz) if plan.counters else ()
    tenant_limit, agent_limit = settings.concurrency_limits(tenant_id, agent_id)
    in_flight = (0, 0)
    if tenant_limit is not None or agent_limit is not None:
        in_flight = await store.in_flight(tenant_id, agent_id)
    now = time.time()
    windows: dict[str, list[dict[str, Any]]] = {
        "agent": [],
        "tenant": [],
        "model": [],
        "user": [],
        "rate": [],
    }
    for state, cap in zip(states, plan.caps, strict=True):
        if not isinstance(cap, BudgetCap):
            windows["rate"].append(rate_window(state, now))
            continue
        kind, ident = state.counter.scope
        spend = window_spend(state, cap, now)
        if kind == "model":
            spend = {"model_cap": ident, **spend}
        windows[kind].append(spend)
    # Every request holds the same amount in each of its agent's windows at once, so
    # the largest window hold is what the agent has in flight (not their sum).
    held = max(
        (s.held for s in states if s.counter.agent_id is not None and s.counter.unit == "usd"),
        default=None,
    )
    return {
        "tenant_id": tenant_id,
        "agent_id": agent_id,
        "windows": windows["agent"],
        "held_usd": None if held is None else micros_to_usd(held),
        "tenant_windows": windows["tenant"],
        "model_cap_windows": windows["model"],
        "user_id": user_id,
        "user_windows": windows["user"],
        "rate_windows": windows["rate"],
        "concurrency": {
            "tenant": {"limit": tenant_limit, "in_flight": in_flight[0]},
            "agent": {"limit": agent_limit, "in_flight": in_flight[1]},
        },
    }


GRANULARITIES = ("hour", "day")


def bucket_starts(granularity: str, now: float, tz: ZoneInfo) -> list[int]:
    """The starts of the buckets a history covers, oldest first, the current one last:
    the last ``HOURS_KEPT`` local hours or ``DAYS_KEPT`` local days."""
    if granularity == "hour":
        current = period_of(Window.HOURLY, now, tz).start
        return [current - 3600 * i for i in reversed(range(HOURS_KEPT))]
    starts = [period_of(Window.DAILY, now, tz).start]
    while len(starts) < DAYS_KEPT:
        starts.append(period_of(Window.DAILY, starts[-1] - 1, tz).start)
    return starts[::-1]


def history_series(
    tenant_id: str,
    history: SpendHistory,
    starts: list[int],
    granularity: str,
    *,
    today: int,
    month: int,
) -> dict[str, Any]:
    """One tenant's spend per bucket (aligned with ``starts``), today and this month
    (``today``, ``month``: the starts of the local day and month)."""
    points = dict(history.hours if granularity == "hour" else history.days)
    days = dict(history.days)
    return {
        "tenant_id": tenant_id,
        "spend_usd": [micros_to_usd(points.get(start, 0)) for start in starts],
        "total_usd": micros_to_usd(sum(points.get(start, 0) for start in starts)),
        "today_usd": micros_to_usd(days.get(today, 0)),
        "month_usd": micros_to_usd(sum(m for s, m in days.items() if s >= month)),
    }


def rejection_entry(tenant_id: str, rejection: Rejection) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "time": rejection.time,
        "agent_id": rejection.agent,
        "model": rejection.model,
        "code": rejection.code,
        "windows": list(rejection.windows),
    }


def seen_scopes(tenant_id: str, seen: SeenToday) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "utc_day": datetime.fromtimestamp(seen.day, UTC).date().isoformat(),
        "agents": list(seen.agents),
        "agents_total": seen.agents_total,
        "users": list(seen.users),
        "users_total": seen.users_total,
    }


def budget_cap(cap: BudgetCap) -> dict[str, Any]:
    return {
        "window": cap.window.value,
        "hard_limit_usd": usd(cap.hard_limit_usd),
        "soft_limit_usd": usd(cap.soft_limit_usd),
    }


def rate_cap(cap: RateCap) -> dict[str, Any]:
    return {
        "window": cap.window.value,
        "max_requests": cap.max_requests,
        "max_tokens": cap.max_tokens,
    }


def model_cap(cap: ModelCap, model: str | None) -> dict[str, Any]:
    return {
        "name": cap.name,
        "models": list(cap.models),
        "applies": None if model is None else cap.matches(model),
        "budget_caps": [budget_cap(c) for c in cap.budget_caps],
        "rate_caps": [rate_cap(c) for c in cap.rate_caps],
    }


# --- handlers ----------------------------------------------------------------------------


async def costs_current(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/costs/current``: spend, limits and holds in every window that applies."""
    rt: Runtime = request.app[RUNTIME].current
    tenant_id = readable_tenant(rt, request)
    agent_id = requested_agent(request)
    user_id = requested_user(request)
    store = request.app[LEDGER].store
    return json_response(await snapshot(rt.settings, store, tenant_id, agent_id, user_id))


async def tenants(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/tenants``: every configured tenant, at a glance (admin only)."""
    rt: Runtime = request.app[RUNTIME].current
    if not is_admin(rt.settings, request.headers):
        rt.auth.authenticate(request.headers)  # 401 for a missing or unknown key
        raise Forbidden("Listing tenants requires the admin token.")
    store = request.app[LEDGER].store
    # One snapshot per tenant: a snapshot reads one tenant's keys (one Cluster slot).
    listed = [await snapshot(rt.settings, store, t.id, DEFAULT_AGENT) for t in rt.settings.tenants]
    agents = sorted(rt.settings.cost_caps.agent_ids) if rt.settings.cost_caps.enabled else []
    return json_response({"tenants": listed, "agents": agents})


async def costs_history(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/costs/history``: settled spend per hour (48 h) or per day (90 days)."""
    rt: Runtime = request.app[RUNTIME].current
    granularity = request.query.get("granularity", "hour")
    if granularity not in GRANULARITIES:
        raise BadRequest("granularity must be 'hour' or 'day'.", param="granularity")
    tenant_ids = readable_tenants(rt, request)
    store = request.app[LEDGER].store
    tz = rt.settings.tz
    now = time.time()
    starts = bucket_starts(granularity, now, tz)
    today = period_of(Window.DAILY, now, tz).start
    month = period_of(Window.MONTHLY, now, tz).start
    series = [
        history_series(t, await store.history(t), starts, granularity, today=today, month=month)
        for t in tenant_ids
    ]
    return json_response(
        {
            "granularity": granularity,
            "time_zone": tz.key,
            "bucket_starts": starts,
            "series": series,
        }
    )


async def rejections(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/rejections``: the latest requests refused by a cap, newest first."""
    rt: Runtime = request.app[RUNTIME].current
    tenant_ids = readable_tenants(rt, request)
    store = request.app[LEDGER].store
    found = [(t, r) for t in tenant_ids for r in await store.rejections(t)]
    found.sort(key=lambda item: item[1].time, reverse=True)
    return json_response(
        {"rejections": [rejection_entry(t, r) for t, r in found[:REJECTIONS_KEPT]]}
    )


async def scopes(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/scopes``: the agents and end users a tenant named this UTC day."""
    rt: Runtime = request.app[RUNTIME].current
    tenant_id = readable_tenant(rt, request)
    limit = requested_limit(request)
    store = request.app[LEDGER].store
    return json_response(seen_scopes(tenant_id, await store.seen_today(tenant_id, limit=limit)))


async def caps(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/caps``: the caps that apply to (tenant, agent) after resolution."""
    rt: Runtime = request.app[RUNTIME].current
    tenant_id = readable_tenant(rt, request)
    agent_id = requested_agent(request)
    cost_caps = rt.settings.cost_caps
    tenant = rt.settings.tenant(tenant_id)
    override = next((a for a in cost_caps.agents if a.agent_id == agent_id), None)

    def source(overridden: bool) -> str:
        if not cost_caps.enabled:
            return "disabled"
        return "override" if overridden else "default"

    enabled, token = cost_caps.enabled, cost_caps.token_cap_for(agent_id)
    model = request.query.get("model")
    if model is not None and not 0 < len(model) <= MAX_MODEL_CHARS:
        raise BadRequest(f"model must be 1-{MAX_MODEL_CHARS} characters.", param="model")
    users = cost_caps.user_caps if enabled else None
    tenant_flight, agent_flight = rt.settings.concurrency_limits(tenant_id, agent_id)
    return json_response(
        {
            "tenant_id": tenant_id,
            "agent_id": agent_id,
            "tenant_configured": tenant is not None,
            "cost_caps_enabled": enabled,
            "enforce": cost_caps.enforce,
            "tenant_budget_caps": [
                budget_cap(c) for c in rt.settings.tenant_budget_caps(tenant_id)
            ],
            "agent_budget_caps": (
                [budget_cap(c) for c in cost_caps.budget_caps_for(agent_id)] if enabled else []
            ),
            "agent_budget_caps_source": source(override is not None and bool(override.budget_caps)),
            "token_cap": token.model_dump() if enabled and token is not None else None,
            "token_cap_source": source(override is not None and override.token_cap is not None),
            "tenant_rate_caps": [rate_cap(c) for c in rt.settings.tenant_rate_caps(tenant_id)],
            "agent_rate_caps": (
                [rate_cap(c) for c in cost_caps.rate_caps_for(agent_id)] if enabled else []
            ),
            "agent_rate_caps_source": source(override is not None and bool(override.rate_caps)),
            "max_concurrent_requests": {"tenant": tenant_flight, "agent": agent_flight},
            "model": model,
            "model_caps": [model_cap(c, model) for c in cost_caps.model_caps] if enabled else [],
            "user_caps": None
            if users is None
            else {
                "source": users.source,
                "budget_caps": [budget_cap(c) for c in users.budget_caps],
                "rate_caps": [rate_cap(c) for c in users.rate_caps],
                "max_users_per_tenant": cost_caps.max_users_per_tenant,
            },
        }
    )


async def openapi(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/openapi.json``: this API, described."""
    return web.json_response(OPENAPI)


def routes() -> list[web.RouteDef]:
    """The spend API's routes."""
    return [
        web.get(f"{PREFIX}/costs/current", costs_current),
        web.get(f"{PREFIX}/caps", caps),
        web.get(f"{PREFIX}/tenants", tenants),
        web.get(f"{PREFIX}/costs/history", costs_history),
        web.get(f"{PREFIX}/rejections", rejections),
        web.get(f"{PREFIX}/scopes", scopes),
        web.get(f"{PREFIX}/openapi.json", openapi),
    ]


# --- OpenAPI 3.1 -------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(properties), "properties": properties}


def _strings(description: str) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}, "description": description}


def _query(name: str, description: str, **schema: str) -> dict[str, Any]:
    schema = {"type": "string", **schema}
    return {"name": name, "in": "query", "description": description, "schema": schema}


def _get(summary: str, schema: str, params: list[Any], errors: dict[str, str]) -> Any:
    content = {"application/json": {"schema": _ref(schema)}}
    failures = {
        code: {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
        for code, text in errors.items()
    }
    responses = {"200": {"description": "OK", "content": content}, **failures}
    return {"get": {"summary": summary, "parameters": params, "responses": responses}}


_USD = {"type": "number", "description": "USD, an exact decimal with six places"}
_USD_OR_NULL = {**_USD, "type": ["number", "null"]}
_TOKENS = {"type": ["integer", "null"], "minimum": 1}
_WINDOW = {"type": "string", "enum": [w.value for w in Window]}
_SOURCE = {"type": "string", "enum": ["override", "default", "disabled"]}
_WINDOW_SPEND: dict[str, Any] = {
    "window": _WINDOW,
    "current_spend_usd": _USD,
    "hard_limit_usd": _USD,
    "soft_limit_usd": _USD_OR_NULL,
    "utilization_pct": {"type": "number"},
    "resets_in_secs": {"type": "integer", "minimum": 1},
    "held_usd": _USD,
}
_USER = _query("user_id", "An end user, for its windows", pattern=f"^{AGENT_ID.pattern}$")
_MODEL = _query("model", "A model: which model caps apply to it")
_AGENT = _query(
    "agent_id",
    "As the agent header names it",
    pattern=f"^{AGENT_ID.pattern}$",
    default=DEFAULT_AGENT,
)
_TENANT = _query("tenant_id", "Required with the admin token; a key: its own", pattern=ID_PATTERN)
_TENANT_OPTIONAL = _query(
    "tenant_id",
    "With the admin token: one tenant (absent: every configured tenant); a key: its own",
    pattern=ID_PATTERN,
)
_GRANULARITY = {
    "name": "granularity",
    "in": "query",
    "description": "hour: the last 48 local hours; day: the last 90 local days",
    "schema": {"type": "string", "enum": list(GRANULARITIES), "default": "hour"},
}
_LIMIT = {
    "name": "limit",
    "in": "query",
    "description": "How many agents, and how many end users, to list at most",
    "schema": {
        "type": "integer",
        "minimum": 1,
        "maximum": SEEN_LIMIT_MAX,
        "default": SCOPES_LIMIT,
    },
}
_READ_ERRORS = {
    "400": "Invalid agent_id or tenant_id, or no tenant_id with the admin token",
    "401": "Missing or unknown key",
    "403": "A tenant key asked for another tenant",
}
_STORE_ERROR = {"503": "The spend store is unavailable"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "capproxy spend API",
        "version": "1",
        "description": "Spend and caps per tenant and agent. Money is a JSON number written "
        "with exactly six decimals from the exact amount (parse it as a decimal to keep it "
        "exact). utilization_pct is spend / hard limit x 100, rounded to 4 places; held "
        "amounts (in-flight reservations) are reported apart. resets_in_secs is display-grade "
        "(proxy host clock). Errors use the OpenAI error body.",
    },
    "security": [{"bearer": []}, {"apiKey": []}],
    "paths": {
        f"{PREFIX}/costs/current": _get(
            "A tenant's current spend, requests and tokens per window, and its requests in flight",
            "SpendSnapshot",
            [_AGENT, _TENANT, _USER],
            {**_READ_ERRORS, **_STORE_ERROR},
        ),
        f"{PREFIX}/caps": _get(
            "The caps that apply to a tenant and agent (and model), after resolution",
            "Caps",
            [_AGENT, _TENANT, _MODEL],
            _READ_ERRORS,
        ),
        f"{PREFIX}/tenants": _get(
            "Every configured tenant's windows and its _default agent's (admin token)",
            "TenantList",
            [],
            {"401": "Missing or unknown key", "403": "Not the admin token", **_STORE_ERROR},
        ),
        f"{PREFIX}/costs/history": _get(
            "Settled spend per local hour (the last 48) or day (the last 90), per tenant; "
            "the admin token without tenant_id: every configured tenant",
            "SpendHistory",
            [_GRANULARITY, _TENANT_OPTIONAL],
            {**_READ_ERRORS, **_STORE_ERROR},
        ),
        f"{PREFIX}/rejections": _get(
            "The latest requests refused by a cap (429), newest first: the last 100 per "
            "tenant; the admin token without tenant_id: the newest 100 of every tenant",
            "RejectionList",
            [_TENANT_OPTIONAL],
            {**_READ_ERRORS, **_STORE_ERROR},
        ),
        f"{PREFIX}/scopes": _get(
            "The agents and the end users a tenant named this UTC day, for their windows "
            "with costs/current?agent_id= and ?user_id=",
            "Scopes",
            [_TENANT, _LIMIT],
            {
                **_READ_ERRORS,
                "400": "Invalid tenant_id or limit, or no tenant_id with the admin token",
                **_STORE_ERROR,
            },
        ),
        f"{PREFIX}/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {"description": "This document", "content": {"application/json": {}}}
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Key or admin token"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        },
        "schemas": {
            "WindowSpend": _object(**_WINDOW_SPEND),
            "ModelCapSpend": {
                **_object(model_cap={"type": "string"}, **_WINDOW_SPEND),
                "description": "A model cap's budget window (the tenant's requests for its models)",
            },
            "RateWindow": _object(
                scope={"type": "string", "enum": ["tenant", "agent", "model", "user"]},
                scope_id={"type": "string", "description": "tenant, agent, model cap or user"},
                window=_WINDOW,
                unit={"type": "string", "enum": ["requests", "tokens"]},
                used={"type": "integer"},
                held={"type": "integer", "description": "Held by requests in flight"},
                limit={"type": "integer"},
                utilization_pct={"type": "number"},
                resets_in_secs={"type": "integer", "minimum": 1},
            ),
            "InFlight": _object(
                limit={"type": ["integer", "null"]},
                in_flight={"type": "integer", "description": "0 without a limit"},
            ),
            "SpendSnapshot": _object(
                tenant_id={"type": "string"},
                agent_id={"type": "string"},
                windows={"type": "array", "items": _ref("WindowSpend")},
                held_usd={
                    **_USD_OR_NULL,
                    "description": "In flight for the agent: the largest agent-window hold "
                    "(each request holds in every window); null without agent windows",
                },
                tenant_windows={"type": "array", "items": _ref("WindowSpend")},
                model_cap_windows={"type": "array", "items": _ref("ModelCapSpend")},
                user_id={"type": ["string", "null"]},
                user_windows={
                    "type": "array",
                    "items": _ref("WindowSpend"),
                    "description": "The budget windows of user_id (empty without it)",
                },
                rate_windows={"type": "array", "items": _ref("RateWindow")},
                concurrency=_object(tenant=_ref("InFlight"), agent=_ref("InFlight")),
            ),
            "TenantList": _object(
                tenants={"type": "array", "items": _ref("SpendSnapshot")},
                agents=_strings(
                    "The agents the caps file lists with caps of their own "
                    "(cost_caps.agents): each tenant's are read with costs/current; the "
                    "agents a tenant named today: scopes"
                ),
            ),
            "TenantHistory": _object(
                tenant_id={"type": "string"},
                spend_usd={
                    "type": "array",
                    "items": _USD,
                    "description": "Settled in each bucket, aligned with bucket_starts",
                },
                total_usd=_USD,
                today_usd={**_USD, "description": "Settled this local day"},
                month_usd={**_USD, "description": "Settled this local month"},
            ),
            "SpendHistory": _object(
                granularity={"type": "string", "enum": list(GRANULARITIES)},
                time_zone={"type": "string", "description": "The caps file's time_zone"},
                bucket_starts={
                    "type": "array",
                    "items": {"type": "integer"},
                    "description": "Each bucket's start (epoch seconds), oldest first; the "
                    "last is the current hour or day",
                },
                series={"type": "array", "items": _ref("TenantHistory")},
            ),
            "Rejection": _object(
                tenant_id={"type": "string"},
                time={"type": "number", "description": "Epoch seconds"},
                agent_id={"type": "string"},
                model={"type": "string"},
                code={
                    "type": "string",
                    "description": f"The 429's error code ({', '.join(sorted(CAP_CODES))})",
                },
                windows=_strings(
                    "The windows that refused it: 'daily' (tenant-wide), "
                    "'agent daily', 'user daily', 'model <cap> daily', and for a rate cap "
                    "with its unit, as 'minute (requests)'; empty for other caps"
                ),
            ),
            "RejectionList": _object(rejections={"type": "array", "items": _ref("Rejection")}),
            "Scopes": {
                **_object(
                    tenant_id={"type": "string"},
                    utc_day={"type": "string", "format": "date", "description": "The UTC day"},
                    agents=_strings(
                        "The first agents in byte order (at most limit): those "
                        "whose requests held in an agent counter of theirs, unless every such "
                        "request that day cost nothing"
                    ),
                    agents_total={"type": "integer", "description": "How many in all"},
                    users=_strings(
                        "The first end users in byte order (at most limit): "
                        "those with user counters (cost_caps.user_caps)"
                    ),
                    users_total={"type": "integer", "description": "How many in all"},
                ),
                "description": f"Past {SEEN_READ_MAX:,} agents (end users) in a day, "
                f"the first of a sample of {SEEN_READ_MAX:,} of them",
            },
            "BudgetCap": _object(window=_WINDOW, hard_limit_usd=_USD, soft_limit_usd=_USD_OR_NULL),
            "TokenCap": _object(**dict.fromkeys(TokenCap.model_fields, _TOKENS)),
            "RateCap": _object(
                window=_WINDOW,
                max_requests={"type": ["integer", "null"]},
                max_tokens={"type": ["integer", "null"]},
            ),
            "ModelCap": _object(
                name={"type": "string"},
                models={"type": "array", "items": {"type": "string"}},
                applies={
                    "type": ["boolean", "null"],
                    "description": "Whether it applies to the model asked for (null: none)",
                },
                budget_caps={"type": "array", "items": _ref("BudgetCap")},
                rate_caps={"type": "array", "items": _ref("RateCap")},
            ),
            "UserCaps": _object(
                source={"type": "string", "description": "body.user or header:<Name>"},
                budget_caps={"type": "array", "items": _ref("BudgetCap")},
                rate_caps={"type": "array", "items": _ref("RateCap")},
                max_users_per_tenant={"type": "integer"},
            ),
            "Caps": _object(
                tenant_id={"type": "string"},
                agent_id={"type": "string"},
                tenant_configured={"type": "boolean"},
                cost_caps_enabled={"type": "boolean"},
                enforce={"type": "boolean", "description": "false: shadow mode"},
                tenant_budget_caps={"type": "array", "items": _ref("BudgetCap")},
                agent_budget_caps={"type": "array", "items": _ref("BudgetCap")},
                agent_budget_caps_source=_SOURCE,
                token_cap={"oneOf": [_ref("TokenCap"), {"type": "null"}]},
                token_cap_source=_SOURCE,
                tenant_rate_caps={"type": "array", "items": _ref("RateCap")},
                agent_rate_caps={"type": "array", "items": _ref("RateCap")},
                agent_rate_caps_source=_SOURCE,
                max_concurrent_requests=_object(
                    tenant={"type": ["integer", "null"]}, agent={"type": ["integer", "null"]}
                ),
                model={"type": ["string", "null"], "description": "The model asked about"},
                model_caps={"type": "array", "items": _ref("ModelCap")},
                user_caps={"oneOf": [_ref("UserCaps"), {"type": "null"}]},
            ),
            "Error": _object(
                error=_object(
                    message={"type": "string"},
                    type={"type": "string"},
                    code={"type": "string"},
                    param={"type": ["string", "null"]},
                )
            ),
        },
    },
}
