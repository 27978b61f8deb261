"""Budget and token caps: what applies to a request, and what to say about it.

Pure decisions over config and counter states; the store does the atomic part.

    plan = plan_budget(settings, identity.tenant_id, identity.agent_id, amount_micros=hold)
    result = await store.reserve(rid, plan.counters, plan.amount_micros, ...)
    if not result.ok:
        raise rejection(plan, result)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from proxy.config import DEFAULT_AGENT, BudgetCap, Settings, TokenCap
from proxy.counters import NO_LIMITS, Counter, CounterState, Limits, ReserveResult
from proxy.errors import (
    BudgetExceeded,
    ConcurrencyLimitExceeded,
    TokenCapExceeded,
    TooManyAgents,
)
from proxy.pricing import (
    ModelPrice,
    ToolPrice,
    estimate_micros,
    micros_to_usd,
    tool_call_micros,
    usd_to_micros,
)

__all__ = ["DEFAULT_AGENT", "BudgetPlan", "hold_micros", "plan_budget", "rejection", "status"]
# A hold larger than the room a quick retry could free is hopeless within this many seconds.
RETRY_HORIZON_S = 60
# Retry-After when only other requests' holds stand in the way and the store did not say
# when their leases end.
HELD_RETRY_AFTER_S = 2
# Holds are clamped here so absurd token counts stay within the store's 64-bit counters
# (any real cap is far smaller, so such a request is refused as usual).
MAX_HOLD_MICROS = 2**53
DAY_S = 86_400  # agents are counted per UTC day


@dataclass(frozen=True, slots=True)
class BudgetPlan:
    """The counters a request must fit into, with the cap behind each, and its hold."""

    counters: tuple[Counter, ...]
    caps: tuple[BudgetCap, ...]
    amount_micros: int
    limits: Limits = NO_LIMITS  # distinct agents a day, requests in flight at once


def plan_budget(
    settings: Settings, tenant_id: str, agent_id: str, *, amount_micros: int
) -> BudgetPlan:
    """Every budget window that applies: the tenant's own caps, then the (tenant, agent) caps."""
    pairs: list[tuple[Counter, BudgetCap]] = [
        (Counter(tenant_id, None, cap.window, usd_to_micros(cap.hard_limit_usd)), cap)
        for cap in settings.tenant_budget_caps(tenant_id)
    ]
    if settings.cost_caps.enabled:
        pairs.extend(
            (Counter(tenant_id, agent_id, cap.window, usd_to_micros(cap.hard_limit_usd)), cap)
            for cap in settings.cost_caps.budget_caps_for(agent_id)
        )
    return BudgetPlan(
        counters=tuple(c for c, _ in pairs),
        caps=tuple(cap for _, cap in pairs),
        amount_micros=min(MAX_HOLD_MICROS, max(1, amount_micros)),
        limits=Limits(
            max_agents=settings.cost_caps.max_agents_per_tenant,
            max_concurrent=settings.concurrency_limits(tenant_id, agent_id),
        ),
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


def _scope(counter: Counter) -> str:
    if counter.agent_id is None:
        return f"tenant '{counter.tenant_id}'"
    return f"agent '{counter.agent_id}' of tenant '{counter.tenant_id}'"


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


def too_many_agents(plan: BudgetPlan, result: ReserveResult) -> TooManyAgents:
    """The 429 for a request naming one agent more than its tenant may name today."""
    tomorrow = (int(result.now // DAY_S) + 1) * DAY_S
    return TooManyAgents(
        f"Tenant '{plan.counters[0].tenant_id}' already named {plan.limits.max_agents} agents "
        "today (cost_caps.max_agents_per_tenant); use one of them.",
        retry_after_s=math.ceil(tomorrow - result.now),
        should_retry=False,
    )


def rejection(plan: BudgetPlan, result: ReserveResult) -> BudgetExceeded:
    """The 429 for a reservation the store refused, naming every exceeded window."""
    amount = plan.amount_micros
    parts: list[str] = []
    retry_after = 1
    hopeless = False
    for state in result.states:
        counter = state.counter
        if state.spent_micros + state.held_micros + amount <= counter.limit_micros:
            continue
        parts.append(
            f"{counter.window} budget cap exceeded for {_scope(counter)}: "
            f"{_usd4(state.spent_micros)} spent + {_usd4(state.held_micros)} held + "
            f"{_usd4(amount)} this request > {_usd2(counter.limit_micros)} limit"
        )
        if state.spent_micros + amount <= counter.limit_micros:
            # Only in-flight holds are in the way: they end when their requests do, and at
            # the latest when their leases run out.
            wait = min(_holds_end_in(state, result.now), state.period.resets_in(result.now))
        else:
            wait = state.period.resets_in(result.now)
            hopeless = hopeless or amount > counter.limit_micros
        retry_after = max(retry_after, wait)
    if not parts:  # the store refused, yet every window has room: report the tightest
        parts.append("budget cap exceeded")
    exc = BudgetExceeded(
        "; ".join(parts),
        retry_after_s=retry_after,
        should_retry=not hopeless and retry_after <= RETRY_HORIZON_S,
    )
    exc.windows = tuple(
        str(s.counter.window) if s.counter.agent_id is None else f"agent {s.counter.window}"
        for s in result.states
        if s.spent_micros + s.held_micros + amount > s.counter.limit_micros
    )
    return exc


def _holds_end_in(state: CounterState, now: float) -> int:
    """Seconds until the holds in ``state`` end (their latest lease expiry)."""
    if state.holds_end is None:
        return HELD_RETRY_AFTER_S
    return max(1, math.ceil(state.holds_end - now))


@dataclass(frozen=True, slots=True)
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
        spent = state.spent_micros + charged_micros
        others_held = max(0, state.held_micros - plan.amount_micros)
        limit = state.counter.limit_micros
        remaining = max(0, limit - spent - others_held)
        if tightest is None or remaining < tightest[0]:
            tightest = (remaining, state)
        warning = _warning(cap, spent)
        if warning is not None:
            warnings.append(warning)
    assert tightest is not None
    remaining, state = tightest
    return BudgetStatus(
        window=str(state.counter.window),
        limit_micros=state.counter.limit_micros,
        remaining_micros=remaining,
        warnings=tuple(warnings),
    )


def _warning(cap: BudgetCap, spent_micros: int) -> str | None:
    spent = micros_to_usd(spent_micros)
    if cap.soft_limit_usd is not None and spent >= cap.soft_limit_usd:
        return f"{cap.window} soft cap exceeded: ${spent:.4f} / ${cap.soft_limit_usd:.2f}"
    if spent >= cap.hard_limit_usd * Decimal("0.8"):
        pct = spent / cap.hard_limit_usd * 100
        return f"{cap.window} budget at {pct:.1f}%: ${spent:.4f} / ${cap.hard_limit_usd:.2f}"
    return None


@dataclass(frozen=True, slots=True)
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
