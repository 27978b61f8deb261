"""Budget, rate and token caps: what applies to a request, and what to say about it.

Pure decisions over config and counter states; the store does the atomic part.

    plan = plan_budget(settings, tenant, agent, amount_micros=hold, tokens=900, model=m, user=u)
    result = await store.reserve(rid, plan.counters, plan.amounts, ...)
    if not result.ok:
        raise rejection(plan, result)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from proxy.config import DEFAULT_AGENT, BudgetCap, RateCap, Settings, TokenCap
from proxy.counters import (
    NO_LIMITS,
    Amounts,
    Counter,
    CounterState,
    Limits,
    ReserveResult,
    Unit,
    fits,
)
from proxy.errors import (
    BudgetExceeded,
    CapExceeded,
    ConcurrencyLimitExceeded,
    RateLimitExceeded,
    TokenCapExceeded,
    TooManyAgents,
    TooManyUsers,
)
from proxy.pricing import (
    ModelPrice,
    ToolPrice,
    estimate_micros,
    micros_to_usd,
    tool_call_micros,
    usd_to_micros,
)
from proxy.windows import Window

__all__ = [
    "DEFAULT_AGENT",
    "BudgetPlan",
    "RateStatus",
    "hold_micros",
    "plan_budget",
    "rate_status",
    "refusal",
    "rejection",
    "status",
]
# A hold larger than the room a quick retry could free is hopeless within this many seconds.
RETRY_HORIZON_S = 60
# Retry-After when only other requests' holds stand in the way and the store did not say
# when their leases end.
HELD_RETRY_AFTER_S = 2
# Holds are clamped here so absurd token counts stay within the store's 64-bit counters
# (any real cap is far smaller, so such a request is refused as usual).
MAX_HOLD_MICROS = 2**53
DAY_S = 86_400  # agents are counted per UTC day
# Resolved plans remembered per settings (tenant, agent, model and user ids come from
# clients: past this many, the memo starts again).
MAX_REMEMBERED_PLANS = 4096


@dataclass(slots=True)
class BudgetPlan:
    """The counters a request must fit into, with the cap behind each, and its hold: one
    amount per unit (micro-USD, tokens, and the request itself)."""

    counters: tuple[Counter, ...]
    caps: tuple[BudgetCap | RateCap, ...]
    amounts: Amounts
    limits: Limits = NO_LIMITS  # distinct agents a day, requests in flight at once

    @property
    def amount_micros(self) -> int:
        return self.amounts.micros


@dataclass(frozen=True, slots=True)
class _Scope:
    """Where caps apply: the tenant (all None), or one agent, model cap or end user of it."""

    agent_id: str | None = None
    model_cap: str | None = None
    user_id: str | None = None


def plan_budget(
    settings: Settings,
    tenant_id: str,
    agent_id: str,
    *,
    amount_micros: int,
    tokens: int = 0,
    model: str | None = None,
    user: str | None = None,
    every_model_cap: bool = False,
) -> BudgetPlan:
    """Every cap that applies to a request, resolved in one call: the tenant's budget and
    rate caps, the (tenant, agent) caps, the caps of every model cap matching ``model``,
    and ``user``'s caps (``every_model_cap``: every model cap, whatever the model).
    ``tokens`` is the most the request can use (prompt + output).

    The resolution is remembered per (tenant, agent, model, user) with the settings."""
    memo = settings.derived
    key = ("plan", tenant_id, agent_id, model, user, every_model_cap)
    resolved: _Resolved | None = memo.get(key)
    if resolved is None:
        if len(memo) >= MAX_REMEMBERED_PLANS:
            memo.clear()
        resolved = memo[key] = _resolve(
            settings, tenant_id, agent_id, model, user, every_model_cap=every_model_cap
        )
    counters, caps, limits = resolved
    return BudgetPlan(
        counters=counters,
        caps=caps,
        amounts=Amounts(
            min(MAX_HOLD_MICROS, max(1, amount_micros)),
            min(MAX_HOLD_MICROS, max(0, tokens)),
            1,
        ),
        limits=limits,
    )


_Resolved = tuple[tuple[Counter, ...], tuple[BudgetCap | RateCap, ...], Limits]


def _resolve(
    settings: Settings,
    tenant_id: str,
    agent_id: str,
    model: str | None,
    user: str | None,
    *,
    every_model_cap: bool,
) -> _Resolved:
    pairs: list[tuple[Counter, BudgetCap | RateCap]] = []

    def add(scope: _Scope, budgets: tuple[BudgetCap, ...], rates: tuple[RateCap, ...]) -> None:
        for cap in budgets:
            limit = usd_to_micros(cap.hard_limit_usd)
            pairs.append((_counter(tenant_id, scope, cap.window, limit, Unit.USD), cap))
        for rate in rates:
            if rate.max_requests is not None:
                counter = _counter(tenant_id, scope, rate.window, rate.max_requests, Unit.REQUESTS)
                pairs.append((counter, rate))
            if rate.max_tokens is not None:
                counter = _counter(tenant_id, scope, rate.window, rate.max_tokens, Unit.TOKENS)
                pairs.append((counter, rate))

    caps = settings.cost_caps
    add(_Scope(), settings.tenant_budget_caps(tenant_id), settings.tenant_rate_caps(tenant_id))
    if caps.enabled:
        agent = _Scope(agent_id=agent_id)
        add(agent, caps.budget_caps_for(agent_id), caps.rate_caps_for(agent_id))
        if every_model_cap:
            model_caps = caps.model_caps
        else:
            model_caps = caps.model_caps_for(model) if model is not None else ()
        for model_cap in model_caps:
            add(_Scope(model_cap=model_cap.name), model_cap.budget_caps, model_cap.rate_caps)
        if user is not None and caps.user_caps is not None:
            add(_Scope(user_id=user), caps.user_caps.budget_caps, caps.user_caps.rate_caps)
    limits = Limits(
        max_agents=caps.max_agents_per_tenant,
        max_users=caps.max_users_per_tenant,
        max_concurrent=settings.concurrency_limits(tenant_id, agent_id),
    )
    return tuple(c for c, _ in pairs), tuple(cap for _, cap in pairs), limits


def _counter(tenant_id: str, scope: _Scope, window: Window, limit: int, unit: Unit) -> Counter:
    return Counter(
        tenant_id,
        scope.agent_id,
        window,
        limit,
        unit,
        model_cap=scope.model_cap,
        user_id=scope.user_id,
    )


def hold_micros(
    *,
    prompt_tokens: int,
    output_tokens: int,
    choices: int,
    price: ModelPrice,
    tool_calls: Mapping[str, int],
    tool_prices: Mapping[str, ToolPrice],
) -> int:
    """The most a request can cost: every prompt token at the full input price (whether it
    hits the cache is unknown until the upstream answers), its output limit for each of its
    ``choices`` at the output price, and each enabled hosted tool at its per-call price for
    as many calls as it may make. With hosted tools, each call can re-read the prompt (the
    tool's results come back as input), so the prompt is held once more per call.

    ``price`` is the highest service tier the request can land on."""
    calls = sum(tool_calls.values())
    return estimate_micros(
        prompt_tokens * (1 + calls), output_tokens * choices, price
    ) + tool_call_micros(tool_calls, tool_prices)


def hold_tokens(
    *, prompt_tokens: int, output_tokens: int, choices: int, tool_calls: Mapping[str, int]
) -> int:
    """The most tokens a request can use, counted as ``hold_micros`` counts their cost."""
    return prompt_tokens * (1 + sum(tool_calls.values())) + output_tokens * choices


def _scope(counter: Counter) -> str:
    kind, ident = counter.scope
    if kind == "tenant":
        return f"tenant '{counter.tenant_id}'"
    name = {"agent": "agent", "model": "model cap", "user": "user"}[kind]
    return f"{name} '{ident}' of tenant '{counter.tenant_id}'"


def _usd4(micros: int) -> str:
    return f"${micros_to_usd(micros):.4f}"


def _usd2(micros: int) -> str:
    """Cents, as the seed writes limits; more digits only when a limit has them."""
    usd = micros_to_usd(micros)
    cents = usd.quantize(Decimal("0.01"))
    return f"${cents}" if cents == usd else f"${usd.normalize():f}"


def too_many_in_flight(plan: BudgetPlan, result: ReserveResult) -> ConcurrencyLimitExceeded:
    """The 429 for a request over a limit of requests in flight at once."""
    tenant_limit, agent_limit = plan.limits.max_concurrent
    counter = plan.counters[0]
    agent = next((c.agent_id for c in plan.counters if c.agent_id is not None), None)
    if result.concurrency_limited == "tenant":
        scope, limit = f"tenant '{counter.tenant_id}'", tenant_limit
    else:
        scope, limit = f"agent '{agent}' of tenant '{counter.tenant_id}'", agent_limit
    return ConcurrencyLimitExceeded(
        f"Too many requests in flight for {scope}: the limit is {limit} at once.",
        retry_after_s=1,
        should_retry=True,
    )


def too_many_named(plan: BudgetPlan, result: ReserveResult) -> TooManyAgents | TooManyUsers:
    """The 429 for a request naming one agent (or end user) more than its tenant may name
    today: no retry helps before the next UTC day."""
    tomorrow = (int(result.now // DAY_S) + 1) * DAY_S
    tenant = plan.counters[0].tenant_id
    error: type[TooManyAgents | TooManyUsers]
    if result.too_many_users:
        error, text = (
            TooManyUsers,
            (
                f"already has {plan.limits.max_users} end users with caps today "
                "(cost_caps.max_users_per_tenant)."
            ),
        )
    else:
        error, text = (
            TooManyAgents,
            (
                f"already named {plan.limits.max_agents} agents today "
                "(cost_caps.max_agents_per_tenant); use one of them."
            ),
        )
    return error(
        f"Tenant '{tenant}' {text}",
        retry_after_s=math.ceil(tomorrow - result.now),
        should_retry=False,
    )


def refusal(plan: BudgetPlan, result: ReserveResult) -> CapExceeded:
    """The 429 for any reservation the store refused."""
    if result.too_many_agents or result.too_many_users:
        return too_many_named(plan, result)
    if result.concurrency_limited:
        return too_many_in_flight(plan, result)
    return rejection(plan, result)


def _exceeded_text(counter: Counter, state: CounterState, amount: int) -> str:
    if counter.unit is Unit.USD:
        return (
            f"{counter.window} budget cap exceeded for {_scope(counter)}: "
            f"{_usd4(state.spent)} spent + {_usd4(state.held)} held + "
            f"{_usd4(amount)} this request > {_usd2(counter.limit)} limit"
        )
    unit = counter.unit.value
    return (
        f"{counter.window} rate limit on {unit} exceeded for {_scope(counter)}: "
        f"{state.spent} {unit} used + {state.held} held + {amount} this request > "
        f"{counter.limit} limit"
    )


def rejection(plan: BudgetPlan, result: ReserveResult) -> BudgetExceeded | RateLimitExceeded:
    """The 429 for a reservation the store refused, naming every exceeded window:
    ``budget_exceeded`` when a budget is among them, else ``rate_limit_exceeded``."""
    parts: list[str] = []
    retry_after = 1
    hopeless = False
    units: set[Unit] = set()
    windows: list[str] = []
    for state in result.states:
        counter = state.counter
        amount = plan.amounts.of(counter.unit)
        if fits(state, amount):
            continue
        units.add(counter.unit)
        windows.append(window_label(counter))
        parts.append(_exceeded_text(counter, state, amount))
        if state.spent + amount <= counter.limit:
            # Only in-flight holds are in the way: they end when their requests do, and at
            # the latest when their leases run out.
            wait = min(_holds_end_in(state, result.now), state.period.resets_in(result.now))
        else:
            wait = state.period.resets_in(result.now)
            hopeless = hopeless or amount > counter.limit
        retry_after = max(retry_after, wait)
    if not parts:  # the store refused, yet every window has room: report the tightest
        parts.append("budget cap exceeded")
    should_retry = not hopeless and retry_after <= RETRY_HORIZON_S
    exc: BudgetExceeded | RateLimitExceeded
    if units and Unit.USD not in units:
        kind = "requests" if Unit.REQUESTS in units else "tokens"
        exc = RateLimitExceeded(
            "; ".join(parts), kind=kind, retry_after_s=retry_after, should_retry=should_retry
        )
    else:
        exc = BudgetExceeded("; ".join(parts), retry_after_s=retry_after, should_retry=should_retry)
    exc.windows = tuple(windows)
    return exc


def window_label(counter: Counter) -> str:
    """How a refusing window is named for the dashboard: "daily" (tenant-wide), "agent
    daily", "user daily", "model <cap> daily"; a rate window adds its unit ("minute
    (requests)")."""
    kind, ident = counter.scope
    label = {"tenant": "", "model": f"model {ident} "}.get(kind, f"{kind} ") + counter.window
    return label if counter.unit is Unit.USD else f"{label} ({counter.unit.value})"


def _holds_end_in(state: CounterState, now: float) -> int:
    """Seconds until the holds in ``state`` end (their latest lease expiry)."""
    if state.holds_end is None:
        return HELD_RETRY_AFTER_S
    return max(1, math.ceil(state.holds_end - now))


@dataclass(slots=True)
class BudgetStatus:
    """What the budget headers report: the window with the least room, and warnings."""

    window: str
    limit_micros: int
    remaining_micros: int
    warnings: tuple[str, ...]


def status(
    plan: BudgetPlan, states: tuple[CounterState, ...], *, charged_micros: int
) -> BudgetStatus | None:
    """Budget after this request is charged ``charged_micros`` (its hold is replaced).

    ``states`` are the counters as reserved (their ``held`` includes this request's hold).
    Warnings use the seed's texts: a soft cap passed, else 80 % of the hard cap reached.
    """
    if not states:
        return None
    tightest: tuple[int, CounterState] | None = None
    warnings: list[str] = []
    for state, cap in zip(states, plan.caps, strict=True):
        if not isinstance(cap, BudgetCap):
            continue
        spent = state.spent + charged_micros
        others_held = max(0, state.held - plan.amount_micros)
        limit = state.counter.limit
        remaining = max(0, limit - spent - others_held)
        if tightest is None or remaining < tightest[0]:
            tightest = (remaining, state)
        warning = _warning(cap, spent)
        if warning is not None:
            warnings.append(warning)
    if tightest is None:
        return None
    remaining, state = tightest
    return BudgetStatus(
        window=str(state.counter.window),
        limit_micros=state.counter.limit,
        remaining_micros=remaining,
        warnings=tuple(warnings),
    )


@dataclass(frozen=True, slots=True)
class RateStatus:
    """What the ``x-ratelimit-*`` headers report for one unit: its tightest rate cap."""

    limit: int
    remaining: int
    reset_s: float  # until that cap's window resets


def rate_status(
    plan: BudgetPlan, states: tuple[CounterState, ...], *, charged: Amounts, now: float
) -> dict[Unit, RateStatus]:
    """Per unit (requests, tokens), the rate counter with the least room once this request
    is charged ``charged`` (its hold replaced); ``states`` as reserved, at ``now``."""
    out: dict[Unit, RateStatus] = {}
    for state in states:
        unit = state.counter.unit
        if unit is Unit.USD:
            continue
        others_held = max(0, state.held - plan.amounts.of(unit))
        remaining = max(0, state.counter.limit - state.spent - others_held - charged.of(unit))
        best = out.get(unit)
        if best is None or remaining < best.remaining:
            out[unit] = RateStatus(state.counter.limit, remaining, max(0.0, state.period.end - now))
    return out


def _warning(cap: BudgetCap, spent_micros: int) -> str | None:
    soft_from, warn_from = cap.warn_from_micros
    if spent_micros < warn_from and (soft_from is None or spent_micros < soft_from):
        return None  # the usual case, on integers
    spent = micros_to_usd(spent_micros)
    if cap.soft_limit_usd is not None and spent >= cap.soft_limit_usd:
        return f"{cap.window} soft cap exceeded: ${spent:.4f} / ${cap.soft_limit_usd:.2f}"
    if spent >= cap.hard_limit_usd * Decimal("0.8"):
        pct = spent / cap.hard_limit_usd * 100
        return f"{cap.window} budget at {pct:.1f}%: ${spent:.4f} / ${cap.hard_limit_usd:.2f}"
    return None


@dataclass(slots=True)
class TokenDecision:
    """The output limit the request runs with, and whether the proxy had to set it."""

    output_limit: int | None
    inject: bool


def check_tokens(
    cap: TokenCap | None, *, prompt: int, output: int | None, choices: int = 1
) -> TokenDecision:
    """Apply a token cap to a request's prompt estimate and requested output limit.

    The output limit applies to each of the ``choices`` (``n``) the request asks for, so the
    completion and total caps are checked against ``output x choices``. Raises
    ``TokenCapExceeded``; a request that names no output limit gets the largest one the
    completion and total caps allow, so the cap holds.
    """
    if cap is None:
        return TokenDecision(output, inject=False)
    if cap.max_prompt_tokens is not None and prompt > cap.max_prompt_tokens:
        _reject(f"Prompt tokens ({prompt}) exceed cap ({cap.max_prompt_tokens})")
    if output is not None:
        completion = output * choices
        if cap.max_completion_tokens is not None and completion > cap.max_completion_tokens:
            _reject(f"Completion tokens ({completion}) exceed cap ({cap.max_completion_tokens})")
        if cap.max_total_tokens is not None and prompt + completion > cap.max_total_tokens:
            _reject(f"Total tokens ({prompt + completion}) exceed cap ({cap.max_total_tokens})")
        return TokenDecision(output, inject=False)
    allowed: list[int] = []
    if cap.max_completion_tokens is not None:
        allowed.append(cap.max_completion_tokens // choices)
    if cap.max_total_tokens is not None:
        allowed.append((cap.max_total_tokens - prompt) // choices)
    if not allowed:
        return TokenDecision(None, inject=False)
    limit = min(allowed)
    if limit < 1:
        _reject(
            f"Total tokens ({prompt} prompt + at least {choices} completion) exceed the "
            f"token cap (max_completion_tokens {cap.max_completion_tokens}, "
            f"max_total_tokens {cap.max_total_tokens})"
        )
    return TokenDecision(limit, inject=True)


def _reject(reason: str) -> None:
    # No wait makes a request smaller: retrying the same request cannot help.
    raise TokenCapExceeded(reason, retry_after_s=1, should_retry=False)
