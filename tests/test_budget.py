"""Budget planning, token caps, 429 wording and the budget status, over plain values."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.budget import (
    DEFAULT_AGENT,
    HELD_RETRY_AFTER_S,
    MAX_HOLD_MICROS,
    RETRY_HORIZON_S,
    BudgetPlan,
    RateStatus,
    TokenDecision,
    check_tokens,
    plan_budget,
    rate_status,
    rejection,
    status,
)
from proxy.config import BudgetCap, RateCap, Settings, TokenCap
from proxy.counters import Amounts, Counter, CounterState, ReserveResult, Unit
from proxy.errors import BudgetExceeded, RateLimitExceeded, TokenCapExceeded
from proxy.pricing import micros_to_usd
from proxy.windows import Period, Window
from tests.harness import settings_for

NOW = 1_715_768_400.0  # 2024-05-15 10:20:00 UTC
USD = 1_000_000  # micro-USD per dollar


def settings(**over: Any) -> Settings:
    return settings_for("http://upstream.invalid/v1", **over)


def cap(window: str, hard: str, soft: str | None = None) -> BudgetCap:
    return BudgetCap.model_validate(
        {"window": window, "hard_limit_usd": hard, "soft_limit_usd": soft}
    )


def state(
    counter: Counter, *, spent: int, held: int = 0, resets_in: int = 1800, now: float = NOW
) -> CounterState:
    """``counter`` in a period that ends ``resets_in`` seconds after ``now``."""
    return CounterState(counter, Period(int(now) - 600, int(now) + resets_in), spent, held)


def refused(plan: BudgetPlan, *states: CounterState) -> ReserveResult:
    return ReserveResult(False, NOW, states, plan.amounts)


HOURLY = Counter("acme", None, Window.HOURLY, 10 * USD)
AGENT_DAILY = Counter("acme", "bot", Window.DAILY, 100 * USD)


def plan_for(*counters: Counter, amount: int) -> BudgetPlan:
    caps = tuple(cap(c.window, str(Decimal(c.limit) / USD)) for c in counters)
    return BudgetPlan(counters=counters, caps=caps, amounts=Amounts(amount))


# --- plan_budget ---------------------------------------------------------------------------

TENANT_CAPS = {
    "tenants": [
        {
            "id": "acme",
            "api_keys": ["sk-acme"],
            "budget_caps": [
                {"window": "daily", "hard_limit_usd": 50},
                {"window": "monthly", "hard_limit_usd": "500.5"},
            ],
        }
    ]
}


def test_plan_lists_tenant_caps_first_then_agent_caps() -> None:
    plan = plan_budget(settings(**TENANT_CAPS), "acme", "bot", amount_micros=1234)
    assert plan.counters == (
        Counter("acme", None, Window.DAILY, 50 * USD),
        Counter("acme", None, Window.MONTHLY, 500_500_000),
        Counter("acme", "bot", Window.HOURLY, 10 * USD),
        Counter("acme", "bot", Window.DAILY, 100 * USD),
    )
    assert [
        (c.window, c.hard_limit_usd, c.soft_limit_usd)
        for c in plan.caps
        if isinstance(c, BudgetCap)
    ] == [
        (Window.DAILY, Decimal(50), None),
        (Window.MONTHLY, Decimal("500.5"), None),
        (Window.HOURLY, Decimal(10), Decimal(8)),
        (Window.DAILY, Decimal(100), None),
    ]
    assert plan.amount_micros == 1234


def test_disabled_cost_caps_drop_agent_caps_but_keep_tenant_caps() -> None:
    s = settings(**TENANT_CAPS, cost_caps={"enabled": False})
    plan = plan_budget(s, "acme", "bot", amount_micros=1)
    assert [c.agent_id for c in plan.counters] == [None, None]
    assert [c.window for c in plan.counters] == [Window.DAILY, Window.MONTHLY]
    assert len(plan.caps) == 2


def test_disabled_cost_caps_without_tenant_caps_plan_nothing() -> None:
    plan = plan_budget(settings(cost_caps={"enabled": False}), "acme", "bot", amount_micros=5)
    assert plan.counters == ()
    assert plan.caps == ()


def test_agent_override_replaces_the_default_caps() -> None:
    plan = plan_budget(settings(), "acme", "premium-agent", amount_micros=1)
    assert plan.counters == (Counter("acme", "premium-agent", Window.DAILY, 500 * USD),)
    assert plan.caps == (
        BudgetCap(window=Window.DAILY, hard_limit_usd=Decimal(500), soft_limit_usd=Decimal(400)),
    )


@pytest.mark.parametrize("agent", [DEFAULT_AGENT, "unknown-agent"])
def test_unknown_agent_gets_the_default_caps(agent: str) -> None:
    plan = plan_budget(settings(), "globex", agent, amount_micros=1)
    assert plan.counters == (
        Counter("globex", agent, Window.HOURLY, 10 * USD),
        Counter("globex", agent, Window.DAILY, 100 * USD),
    )


def test_agent_listed_only_for_its_token_cap_keeps_the_default_budget_caps() -> None:
    agents = [{"agent_id": "tok-only", "token_cap": {"max_prompt_tokens": 10}}]
    plan = plan_budget(settings(cost_caps={"agents": agents}), "acme", "tok-only", amount_micros=1)
    assert [c.window for c in plan.counters] == [Window.HOURLY, Window.DAILY]


def test_unconfigured_tenant_gets_only_agent_caps() -> None:
    plan = plan_budget(
        settings(**TENANT_CAPS), "key-0123456789abcdef01234567", "a", amount_micros=1
    )
    assert all(c.agent_id == "a" for c in plan.counters)
    assert [c.window for c in plan.counters] == [Window.HOURLY, Window.DAILY]


@pytest.mark.parametrize(
    ("amount", "held"),
    [
        (-5, 1),
        (0, 1),
        (1, 1),
        (987_654, 987_654),
        (MAX_HOLD_MICROS, MAX_HOLD_MICROS),
        (MAX_HOLD_MICROS + 1, MAX_HOLD_MICROS),
        (10**30, MAX_HOLD_MICROS),
    ],
)
def test_hold_is_clamped(amount: int, held: int) -> None:
    assert plan_budget(settings(), "acme", "bot", amount_micros=amount).amount_micros == held


def test_limits_are_exact_micros() -> None:
    s = settings(cost_caps={"default_budget_caps": [{"window": "hourly", "hard_limit_usd": "0.1"}]})
    assert plan_budget(s, "acme", "bot", amount_micros=1).counters[0].limit == 100_000


# --- check_tokens --------------------------------------------------------------------------

CAP = TokenCap(max_prompt_tokens=100, max_completion_tokens=50, max_total_tokens=120)


@pytest.mark.parametrize("output", [None, 1, 10**9])
def test_no_token_cap_leaves_the_request_alone(output: int | None) -> None:
    assert check_tokens(None, prompt=10**9, output=output, choices=7) == TokenDecision(
        output, inject=False
    )


def reject_reason(cap: TokenCap, *, prompt: int, output: int | None, choices: int = 1) -> str:
    with pytest.raises(TokenCapExceeded) as info:
        check_tokens(cap, prompt=prompt, output=output, choices=choices)
    exc = info.value
    assert exc.status == 429
    assert exc.code == "token_cap_exceeded"
    # No wait makes the same request fit.
    assert exc.headers == {"Retry-After": "1", "x-should-retry": "false"}
    return exc.message


def test_prompt_cap() -> None:
    assert check_tokens(CAP, prompt=100, output=10) == TokenDecision(10, inject=False)
    assert reject_reason(CAP, prompt=101, output=10) == "Prompt tokens (101) exceed cap (100)"
    # The prompt is checked even when the proxy would set the output limit.
    assert reject_reason(CAP, prompt=101, output=None) == "Prompt tokens (101) exceed cap (100)"


def test_completion_cap_counts_output_times_choices() -> None:
    assert check_tokens(CAP, prompt=1, output=50) == TokenDecision(50, inject=False)
    assert check_tokens(CAP, prompt=1, output=25, choices=2) == TokenDecision(25, inject=False)
    assert reject_reason(CAP, prompt=1, output=51) == "Completion tokens (51) exceed cap (50)"
    assert (
        reject_reason(CAP, prompt=1, output=26, choices=2)
        == "Completion tokens (52) exceed cap (50)"
    )


def test_total_cap_counts_prompt_plus_output_times_choices() -> None:
    assert check_tokens(CAP, prompt=80, output=40) == TokenDecision(40, inject=False)
    assert check_tokens(CAP, prompt=80, output=20, choices=2) == TokenDecision(20, inject=False)
    assert reject_reason(CAP, prompt=80, output=41) == "Total tokens (121) exceed cap (120)"
    assert (
        reject_reason(CAP, prompt=80, output=21, choices=2) == "Total tokens (122) exceed cap (120)"
    )


@pytest.mark.parametrize(
    ("prompt", "choices", "limit"),
    [
        (10, 1, 50),  # completion cap: 50; total: 110
        (90, 1, 30),  # completion: 50; total: 30
        (10, 2, 25),  # completion: 50 // 2; total: 110 // 2
        (90, 3, 10),  # completion: 50 // 3 = 16; total: 30 // 3
        (100, 7, 2),  # completion: 7; total: 20 // 7
    ],
)
def test_missing_output_limit_is_injected(prompt: int, choices: int, limit: int) -> None:
    decision = check_tokens(CAP, prompt=prompt, output=None, choices=choices)
    assert decision == TokenDecision(limit, inject=True)
    # What was injected fits every cap.
    assert check_tokens(CAP, prompt=prompt, output=limit, choices=choices).inject is False


def test_injection_with_one_output_cap() -> None:
    only_completion = TokenCap(max_completion_tokens=50)
    only_total = TokenCap(max_total_tokens=120)
    assert check_tokens(only_completion, prompt=10**6, output=None, choices=4) == TokenDecision(
        12, inject=True
    )
    assert check_tokens(only_total, prompt=100, output=None) == TokenDecision(20, inject=True)


def test_no_output_cap_means_no_injection() -> None:
    prompt_only = TokenCap(max_prompt_tokens=100)
    assert check_tokens(prompt_only, prompt=100, output=None, choices=3) == TokenDecision(
        None, inject=False
    )
    assert check_tokens(TokenCap(), prompt=10**6, output=10**6) == TokenDecision(
        10**6, inject=False
    )


def test_no_room_for_any_output_is_rejected() -> None:
    assert check_tokens(CAP, prompt=100, output=None, choices=20) == TokenDecision(1, inject=True)
    assert reject_reason(CAP, prompt=100, output=None, choices=21) == (
        "Total tokens (100 prompt + at least 21 completion) exceed the token cap "
        "(max_completion_tokens 50, max_total_tokens 120)"
    )
    total_only = TokenCap(max_total_tokens=120)
    assert reject_reason(total_only, prompt=120, output=None) == (
        "Total tokens (120 prompt + at least 1 completion) exceed the token cap "
        "(max_completion_tokens None, max_total_tokens 120)"
    )
    assert check_tokens(total_only, prompt=119, output=None) == TokenDecision(1, inject=True)
    completion_only = TokenCap(max_completion_tokens=3)
    reject_reason(completion_only, prompt=0, output=None, choices=4)
    assert check_tokens(completion_only, prompt=0, output=None, choices=3) == TokenDecision(
        1, inject=True
    )


# --- rejection -----------------------------------------------------------------------------


def test_rejection_names_window_scope_spend_hold_request_and_limit() -> None:
    plan = plan_for(HOURLY, AGENT_DAILY, amount=1_500_000)
    exc = rejection(
        plan,
        refused(
            plan,
            state(HOURLY, spent=9 * USD, held=250_000),
            state(AGENT_DAILY, spent=99_123_456, held=0, resets_in=5000),
        ),
    )
    assert isinstance(exc, BudgetExceeded)
    assert exc.status == 429
    assert exc.code == "budget_exceeded"
    assert exc.message == (
        "hourly budget cap exceeded for tenant 'acme': $9.0000 spent + $0.2500 held + "
        "$1.5000 this request > $10.00 limit; "
        "daily budget cap exceeded for agent 'bot' of tenant 'acme': $99.1235 spent + "
        "$0.0000 held + $1.5000 this request > $100.00 limit"
    )


def test_rejection_names_only_the_exceeded_windows() -> None:
    plan = plan_for(HOURLY, AGENT_DAILY, amount=USD)
    exc = rejection(
        plan,
        refused(
            plan,
            state(HOURLY, spent=9 * USD, held=0, resets_in=5),  # exactly fits: not exceeded
            state(AGENT_DAILY, spent=99_500_000, resets_in=40),
        ),
    )
    assert "hourly" not in exc.message
    assert exc.message.startswith("daily budget cap exceeded for agent 'bot'")
    # The window that fits does not shorten (or lengthen) the wait.
    assert exc.retry_after_s == 40
    assert exc.headers == {"Retry-After": "40", "x-should-retry": "true"}


@pytest.mark.parametrize(("hourly_reset", "daily_reset"), [(30, 50_000), (50_000, 30)])
def test_retry_after_is_the_longest_wait_over_exceeded_windows(
    hourly_reset: int, daily_reset: int
) -> None:
    plan = plan_for(HOURLY, AGENT_DAILY, amount=USD)
    exc = rejection(
        plan,
        refused(
            plan,
            state(HOURLY, spent=10 * USD, resets_in=hourly_reset),
            state(AGENT_DAILY, spent=100 * USD, resets_in=daily_reset),
        ),
    )
    assert exc.retry_after_s == 50_000
    assert exc.headers == {"Retry-After": "50000", "x-should-retry": "false"}


def test_holds_only_window_does_not_shorten_a_spent_window() -> None:
    plan = plan_for(HOURLY, AGENT_DAILY, amount=USD)
    exc = rejection(
        plan,
        refused(
            plan,
            state(HOURLY, spent=9_500_000, resets_in=50),
            state(AGENT_DAILY, spent=0, held=100 * USD, resets_in=50_000),
        ),
    )
    assert exc.retry_after_s == 50
    assert exc.headers["x-should-retry"] == "true"
    assert exc.message.count("budget cap exceeded") == 2


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    plan = plan_for(HOURLY, amount=USD)
    result = ReserveResult(
        False, NOW + 0.25, (state(HOURLY, spent=10 * USD, resets_in=20),), Amounts(USD)
    )
    assert rejection(plan, result).retry_after_s == 20  # 19.75 s left


def test_only_holds_in_the_way_give_a_short_retry() -> None:
    plan = plan_for(HOURLY, amount=USD)
    exc = rejection(plan, refused(plan, state(HOURLY, spent=5 * USD, held=5 * USD, resets_in=3000)))
    assert exc.retry_after_s == HELD_RETRY_AFTER_S
    assert exc.headers == {"Retry-After": str(HELD_RETRY_AFTER_S), "x-should-retry": "true"}
    assert "$5.0000 spent + $5.0000 held + $1.0000 this request > $10.00 limit" in exc.message


def test_holds_in_the_way_never_wait_past_the_period_end() -> None:
    plan = plan_for(HOURLY, amount=USD)
    exc = rejection(plan, refused(plan, state(HOURLY, spent=9 * USD, held=USD, resets_in=1)))
    assert exc.retry_after_s == 1
    assert exc.headers["x-should-retry"] == "true"


def test_holds_and_spend_in_the_way_wait_for_the_period_end() -> None:
    plan = plan_for(HOURLY, amount=USD)
    exc = rejection(
        plan, refused(plan, state(HOURLY, spent=9_500_000, held=10 * USD, resets_in=45))
    )
    assert exc.retry_after_s == 45
    assert exc.headers["x-should-retry"] == "true"


def test_request_larger_than_the_cap_says_do_not_retry() -> None:
    plan = plan_for(HOURLY, amount=10 * USD + 1)
    exc = rejection(plan, refused(plan, state(HOURLY, spent=0, resets_in=5)))
    assert exc.retry_after_s == 5
    assert exc.headers == {"Retry-After": "5", "x-should-retry": "false"}


@pytest.mark.parametrize(
    ("resets_in", "should_retry"),
    [(1, "true"), (RETRY_HORIZON_S, "true"), (RETRY_HORIZON_S + 1, "false"), (3600, "false")],
)
def test_windows_beyond_the_retry_horizon_say_do_not_retry(
    resets_in: int, should_retry: str
) -> None:
    plan = plan_for(HOURLY, amount=USD)
    exc = rejection(plan, refused(plan, state(HOURLY, spent=9_500_000, resets_in=resets_in)))
    assert exc.headers == {"Retry-After": str(resets_in), "x-should-retry": should_retry}


def test_refusal_with_room_everywhere_still_rejects() -> None:
    plan = plan_for(HOURLY, amount=USD)
    exc = rejection(plan, refused(plan, state(HOURLY, spent=0)))
    assert exc.message == "budget cap exceeded"
    assert exc.headers == {"Retry-After": "1", "x-should-retry": "true"}


# --- status --------------------------------------------------------------------------------


def seed_plan(amount: int, **over: Any) -> BudgetPlan:
    """The seed's default caps: hourly $10 (soft $8), daily $100."""
    return plan_budget(settings(**over), "acme", "bot", amount_micros=amount)


def test_status_without_states_is_none() -> None:
    assert status(seed_plan(USD), (), charged_micros=5) is None


def test_status_reports_the_tightest_window() -> None:
    plan = seed_plan(500_000)
    hourly, daily = plan.counters
    states = (
        state(hourly, spent=USD, held=500_000 + USD),
        state(daily, spent=95 * USD, held=500_000),
    )
    got = status(plan, states, charged_micros=300_000)
    assert got is not None
    assert got.window == "daily"
    assert got.limit_micros == 100 * USD
    assert got.remaining_micros == 100 * USD - 95_300_000


def test_remaining_excludes_own_hold_but_includes_others() -> None:
    plan = seed_plan(2 * USD)
    hourly, daily = plan.counters
    # 1 spent; 2 held by this request, 3 by others; this request is charged 0.5.
    states = (state(hourly, spent=USD, held=5 * USD), state(daily, spent=0, held=2 * USD))
    got = status(plan, states, charged_micros=500_000)
    assert got is not None
    assert got.window == "hourly"
    assert got.limit_micros == 10 * USD
    assert got.remaining_micros == 10 * USD - 1_500_000 - 3 * USD
    assert got.warnings == ()


def test_remaining_never_goes_negative() -> None:
    plan = seed_plan(USD)
    hourly, daily = plan.counters
    states = (state(hourly, spent=9 * USD, held=3 * USD), state(daily, spent=9 * USD, held=USD))
    got = status(plan, states, charged_micros=4 * USD)
    assert got is not None
    assert (got.window, got.remaining_micros) == ("hourly", 0)


def test_seed_soft_cap_warning_text() -> None:
    plan = seed_plan(USD)
    hourly, daily = plan.counters
    states = (state(hourly, spent=8 * USD, held=USD), state(daily, spent=8 * USD, held=USD))
    got = status(plan, states, charged_micros=500_000)
    assert got is not None
    # 85 % of the hard cap too: the soft cap takes precedence.
    assert got.warnings == ("hourly soft cap exceeded: $8.5000 / $8.00",)


def test_seed_80_percent_warning_text() -> None:
    no_soft = {"default_budget_caps": [{"window": "hourly", "hard_limit_usd": 10}]}
    plan = seed_plan(USD, cost_caps=no_soft)
    (hourly,) = plan.counters
    got = status(plan, (state(hourly, spent=8 * USD, held=USD),), charged_micros=500_000)
    assert got is not None
    assert got.warnings == ("hourly budget at 85.0%: $8.5000 / $10.00",)


@pytest.mark.parametrize(
    ("spent", "warning"),
    [
        (7_999_999, None),
        (8 * USD, "hourly budget at 80.0%: $8.0000 / $10.00"),
        (12 * USD, "hourly budget at 120.0%: $12.0000 / $10.00"),
    ],
)
def test_80_percent_threshold(spent: int, warning: str | None) -> None:
    no_soft = {"default_budget_caps": [{"window": "hourly", "hard_limit_usd": 10}]}
    plan = seed_plan(USD, cost_caps=no_soft)
    (hourly,) = plan.counters
    got = status(plan, (state(hourly, spent=0, held=USD),), charged_micros=spent)
    assert got is not None
    assert got.warnings == (() if warning is None else (warning,))


def test_soft_cap_threshold_is_inclusive() -> None:
    plan = seed_plan(USD)
    hourly, daily = plan.counters
    states = (state(hourly, spent=0, held=USD), state(daily, spent=0, held=USD))
    below = status(plan, states, charged_micros=7_999_999)
    at = status(plan, states, charged_micros=8 * USD)
    assert below is not None and at is not None
    assert below.warnings == ()
    assert at.warnings == ("hourly soft cap exceeded: $8.0000 / $8.00",)


def test_warnings_follow_plan_order() -> None:
    plan = plan_budget(settings(**TENANT_CAPS), "acme", "bot", amount_micros=USD)
    states = tuple(state(c, spent=0, held=USD) for c in plan.counters)
    got = status(plan, states, charged_micros=45 * USD)
    assert got is not None
    # Tenant daily $50 at 90 %, tenant monthly under 80 %, agent hourly past its soft cap,
    # agent daily at 45 %.
    assert got.warnings == (
        "daily budget at 90.0%: $45.0000 / $50.00",
        "hourly soft cap exceeded: $45.0000 / $8.00",
    )
    assert (got.window, got.remaining_micros) == ("hourly", 0)


# --- rate caps, model caps, end users ---------------------------------------------------------


def test_one_plan_resolves_every_kind_of_cap_in_order() -> None:
    s = settings(
        tenants=[{"id": "acme", "rate_caps": [{"window": "minute", "max_requests": 600}]}],
        cost_caps={
            "default_rate_caps": [{"window": "minute", "max_requests": 60, "max_tokens": 9000}],
            "model_caps": [
                {
                    "name": "frontier",
                    "models": ["gpt-4o*"],
                    "rate_caps": [{"window": "daily", "max_requests": 30}],
                },
                {
                    "name": "other",
                    "models": ["claude-*"],
                    "budget_caps": [{"window": "daily", "hard_limit_usd": 1}],
                },
            ],
            "user_caps": {"budget_caps": [{"window": "daily", "hard_limit_usd": 2}]},
        },
    )
    plan = plan_budget(s, "acme", "bot", amount_micros=5, tokens=700, model="gpt-4o", user="u1")
    assert [(c.scope, c.window.value, c.unit.value, c.limit) for c in plan.counters] == [
        (("tenant", "acme"), "minute", "requests", 600),
        (("agent", "bot"), "hourly", "usd", 10 * USD),
        (("agent", "bot"), "daily", "usd", 100 * USD),
        (("agent", "bot"), "minute", "requests", 60),
        (("agent", "bot"), "minute", "tokens", 9000),
        (("model", "frontier"), "daily", "requests", 30),
        (("user", "u1"), "daily", "usd", 2 * USD),
    ]
    assert plan.amounts == Amounts(5, 700, 1)
    # No model given, no user named: only the tenant's and the agent's caps.
    assert len(plan_budget(s, "acme", "bot", amount_micros=5).counters) == 5


def test_a_rate_rejection_names_the_unit_the_window_and_the_scope() -> None:
    requests = Counter("acme", None, Window.MINUTE, 3, Unit.REQUESTS, model_cap="frontier")
    plan = BudgetPlan(
        counters=(requests,),
        caps=(RateCap(window=Window.MINUTE, max_requests=3),),
        amounts=Amounts(10, 50, 1),
    )
    result = ReserveResult(False, NOW, (state(requests, spent=3, resets_in=20),), plan.amounts)
    exc = rejection(plan, result)
    assert isinstance(exc, RateLimitExceeded)
    assert exc.code == "rate_limit_exceeded" and exc.body()["error"]["type"] == "requests"
    assert exc.message == (
        "minute rate limit on requests exceeded for model cap 'frontier' of tenant 'acme': "
        "3 requests used + 0 held + 1 this request > 3 limit"
    )
    assert (exc.retry_after_s, exc.headers["x-should-retry"]) == (20, "true")


def test_a_budget_among_the_exceeded_windows_makes_it_budget_exceeded() -> None:
    tokens = Counter("acme", "bot", Window.DAILY, 100, Unit.TOKENS)
    plan = BudgetPlan(
        counters=(HOURLY, tokens),
        caps=(cap(Window.HOURLY, "10"), RateCap(window=Window.DAILY, max_tokens=100)),
        amounts=Amounts(USD, 50, 1),
    )
    states = (state(HOURLY, spent=10 * USD), state(tokens, spent=90))
    exc = rejection(plan, ReserveResult(False, NOW, states, plan.amounts))
    assert exc.code == "budget_exceeded" and "rate limit on tokens" in exc.message


def test_rate_status_reports_the_tightest_cap_of_each_unit_after_the_charge() -> None:
    loose = Counter("acme", None, Window.MINUTE, 600, Unit.REQUESTS)
    tight = Counter("acme", "bot", Window.DAILY, 5, Unit.REQUESTS)
    tokens = Counter("acme", "bot", Window.DAILY, 1000, Unit.TOKENS)
    plan = BudgetPlan(
        counters=(loose, tight, tokens),
        caps=(RateCap(window=Window.MINUTE, max_requests=600),) * 3,
        amounts=Amounts(1, 300, 1),
    )
    states = (
        state(loose, spent=10, held=1, resets_in=30),
        state(tight, spent=2, held=1, resets_in=3600),
        state(tokens, spent=100, held=300 + 200, resets_in=3600),
    )
    got = rate_status(plan, states, charged=Amounts(1, 40, 1), now=NOW)
    assert got[Unit.REQUESTS] == RateStatus(limit=5, remaining=2, reset_s=3600)
    # Tokens: 100 spent, 200 held by others, 40 charged to this request.
    assert got[Unit.TOKENS] == RateStatus(limit=1000, remaining=660, reset_s=3600)


@given(
    hard=st.decimals(min_value=Decimal("0.000001"), max_value=Decimal(10**9), places=6),
    soft_share=st.decimals(min_value=Decimal("0.01"), max_value=Decimal("0.99"), places=4),
)
def test_warning_thresholds_in_micros_match_the_usd_rule(
    hard: Decimal, soft_share: Decimal
) -> None:
    soft = (hard * soft_share).quantize(Decimal("1E-6"), rounding=ROUND_FLOOR)
    cap = BudgetCap(
        window=Window.DAILY, hard_limit_usd=hard, soft_limit_usd=soft if soft > 0 else None
    )
    soft_from, warn_from = cap.warn_from_micros
    for limit, first in ((cap.soft_limit_usd, soft_from), (hard * Decimal("0.8"), warn_from)):
        if limit is None:
            assert first is None
            continue
        assert first is not None
        assert micros_to_usd(first) >= limit > micros_to_usd(first - 1)
