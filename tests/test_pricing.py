from __future__ import annotations

import doctest
import random
from decimal import ROUND_CEILING, Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy import pricing
from proxy.pricing import (
    BUILTIN_PRICES,
    BUILTIN_TOOL_PRICES,
    MAX_PER_MTOK,
    ModelPrice,
    PriceTable,
    TierPrice,
    ToolPrice,
    billed_output_tokens,
    charge_micros,
    cost_micros,
    estimate_micros,
    hold_price,
    max_output_tokens,
    micros_to_usd,
    tier_price,
    tool_call_micros,
    usd_to_micros,
)
from proxy.usage import Usage

REQUIRED_MODELS = [
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4o",
    "gpt-4o-mini",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "gpt-4-turbo",
    "gpt-4",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
]


def price(
    input_: str, output: str = "0", cached: str | None = None, max_out: int | None = None
) -> ModelPrice:
    return ModelPrice(
        input_per_mtok=Decimal(input_),
        cached_input_per_mtok=None if cached is None else Decimal(cached),
        output_per_mtok=Decimal(output),
        max_output_tokens=max_out,
    )


def usage(prompt: int = 0, cached: int = 0, completion: int = 0, reasoning: int = 0) -> Usage:
    return Usage(
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
    )


# --- the built-in table -------------------------------------------------------------


@pytest.mark.parametrize("model", REQUIRED_MODELS)
def test_builtin_table_prices_every_required_model(model: str) -> None:
    p = PriceTable().lookup(model)
    assert p is not None
    assert p.input_per_mtok > 0
    assert type(p.input_per_mtok) is Decimal
    assert type(p.output_per_mtok) is Decimal
    assert p.cached_input_per_mtok is None or type(p.cached_input_per_mtok) is Decimal


def test_builtin_table_is_decimal_and_sane() -> None:
    for model, p in BUILTIN_PRICES.items():
        for value in (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok):
            assert value is None or type(value) is Decimal, model
        if p.cached_input_per_mtok is not None:
            assert p.cached_input_per_mtok <= p.input_per_mtok, model
        if model.startswith("text-embedding"):
            assert p.output_per_mtok == 0
            assert p.max_output_tokens is None
        else:
            assert p.output_per_mtok >= p.input_per_mtok, model


def test_builtin_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        BUILTIN_PRICES["gpt-4o"] = price("0")  # type: ignore[index]


@pytest.mark.parametrize(
    ("model", "input_", "cached", "output", "max_out"),
    [
        ("gpt-5", "1.25", "0.125", "10", 128_000),
        ("gpt-5-mini", "0.25", "0.025", "2", 128_000),
        ("gpt-5-nano", "0.05", "0.005", "0.40", 128_000),
        ("gpt-4.1", "2", "0.5", "8", 32_768),
        ("gpt-4.1-mini", "0.4", "0.1", "1.6", 32_768),
        ("gpt-4.1-nano", "0.1", "0.025", "0.4", 32_768),
        ("gpt-4o", "2.5", "1.25", "10", 16_384),
        ("gpt-4o-mini", "0.15", "0.075", "0.6", 16_384),
        ("o1", "15", "7.5", "60", 100_000),
        ("o3", "2", "0.5", "8", 100_000),
        ("o3-mini", "1.1", "0.55", "4.4", 100_000),
        ("o4-mini", "1.1", "0.275", "4.4", 100_000),
        ("gpt-4-turbo", "10", None, "30", 4_096),
        ("gpt-4", "30", None, "60", 8_192),
        ("gpt-3.5-turbo", "0.5", None, "1.5", 4_096),
        ("text-embedding-3-small", "0.02", None, "0", None),
        ("text-embedding-3-large", "0.13", None, "0", None),
        ("text-embedding-ada-002", "0.1", None, "0", None),
    ],
)
def test_builtin_prices(
    model: str, input_: str, cached: str | None, output: str, max_out: int | None
) -> None:
    p = BUILTIN_PRICES[model]
    assert p.input_per_mtok == Decimal(input_)
    assert p.cached_input_per_mtok == (None if cached is None else Decimal(cached))
    assert p.output_per_mtok == Decimal(output)
    assert max_output_tokens(p) == max_out


# --- lookup -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "base"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o1-2024-12-17", "o1"),
        ("o1-preview", "o1"),
        ("o1-preview-2024-09-12", "o1"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-4-turbo-preview", "gpt-4-turbo"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
    ],
)
def test_dated_snapshot_resolves_to_its_base(model: str, base: str) -> None:
    assert model not in BUILTIN_PRICES
    assert PriceTable().lookup(model) == BUILTIN_PRICES[base]


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o-2024-05-13",  # launch snapshot, dearer than the gpt-4o alias
        "gpt-3.5-turbo-1106",
        "gpt-3.5-turbo-0613",
        "gpt-4-0125-preview",
    ],
)
def test_snapshots_priced_unlike_their_alias_are_listed(model: str) -> None:
    assert PriceTable().lookup(model) is BUILTIN_PRICES[model]


def test_launch_gpt_4o_snapshot_is_not_priced_as_the_alias() -> None:
    p = PriceTable().lookup("gpt-4o-2024-05-13")
    assert p is not None
    assert p.input_per_mtok == Decimal("5")
    assert p.output_per_mtok == Decimal("15")


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o-mini-x",  # no prefix matching: never falls to gpt-4o or gpt-4o-mini
        "gpt-4o-x",
        "gpt-4o2",
        "gpt-4ox-2024-08-06",
        "gpt-4o-realtime-preview",  # -preview strips to gpt-4o-realtime: unknown
        "gpt-4o-mini-search-preview",
        "gpt-4.5-preview",
        "gpt-3.5-turbo-16k",
        "gpt-4o-9999",  # not a month-day
        "gpt-4-0100",
        "gpt-4o-2024-08",
        "-2024-08-06",
        "-preview",
        "",
        "GPT-4O",
        "llama-3-70b",
        "my-model-2024-01-01",
    ],
)
def test_unknown_models_are_not_priced(model: str) -> None:
    assert PriceTable().lookup(model) is None


def test_unknown_model_is_none_not_free() -> None:
    table = PriceTable(overrides={})
    assert table.lookup("some-new-model") is None


def test_override_beats_builtin_for_the_same_name() -> None:
    mine = price("1", "2")
    table = PriceTable(overrides={"gpt-4o": mine})
    assert table.lookup("gpt-4o") is mine
    assert table.lookup("gpt-4o-mini") is BUILTIN_PRICES["gpt-4o-mini"]


def test_override_beats_builtin_in_the_base_name_fallback() -> None:
    mine = price("1", "2")
    table = PriceTable(overrides={"gpt-4o": mine})
    assert table.lookup("gpt-4o-2024-08-06") is mine


def test_exact_override_beats_override_of_its_base() -> None:
    base, dated = price("1"), price("3")
    table = PriceTable(overrides={"gpt-4o": base, "gpt-4o-2024-08-06": dated})
    assert table.lookup("gpt-4o-2024-08-06") is dated
    assert table.lookup("gpt-4o-2024-11-20") is base


def test_exact_builtin_beats_an_override_of_its_base() -> None:
    # Resolution order is exact override, exact built-in, then the base name.
    table = PriceTable(overrides={"gpt-4o": price("1")})
    assert table.lookup("gpt-4o-2024-05-13") is BUILTIN_PRICES["gpt-4o-2024-05-13"]


def test_override_adds_models_and_their_snapshots() -> None:
    mine = price("0.2", "0.6")
    table = PriceTable(overrides={"llama-3-70b": mine})
    assert table.lookup("llama-3-70b") is mine
    assert table.lookup("llama-3-70b-2025-01-01") is mine
    assert table.lookup("llama-3-70b-x") is None


def test_default_applies_only_to_unknown_models() -> None:
    fallback = price("9", "9")
    table = PriceTable(default=fallback)
    assert table.lookup("unknown") is fallback
    assert table.lookup("gpt-4o-2024-08-06") is BUILTIN_PRICES["gpt-4o"]


def test_table_copies_overrides() -> None:
    overrides = {"x": price("1")}
    table = PriceTable(overrides=overrides)
    overrides["y"] = price("2")
    assert table.lookup("y") is None


# --- cost arithmetic ----------------------------------------------------------------


def test_a_million_gpt_4o_input_tokens_cost_2_5_usd() -> None:
    p = PriceTable().lookup("gpt-4o")
    assert p is not None
    cost = cost_micros(usage(prompt=1_000_000), p)
    assert cost == 2_500_000
    assert type(cost) is int


def test_output_tokens_at_output_price() -> None:
    assert cost_micros(usage(completion=1_000_000), BUILTIN_PRICES["gpt-4o"]) == 10_000_000
    assert cost_micros(usage(completion=1), BUILTIN_PRICES["gpt-4o"]) == 10


def test_cached_tokens_at_cached_price() -> None:
    p = BUILTIN_PRICES["gpt-4o"]  # 2.50 input, 1.25 cached
    u = usage(prompt=1_000_000, cached=400_000)
    # 600_000 x 2.50 + 400_000 x 1.25 = 1_500_000 + 500_000
    assert cost_micros(u, p) == 2_000_000


def test_cached_tokens_without_a_cached_price_pay_full_input() -> None:
    p = price("3", "6")
    assert cost_micros(usage(prompt=1000, cached=1000), p) == 3000


def test_cached_above_prompt_never_discounts_more_than_the_prompt() -> None:
    p = price("2", "0", cached="1")
    assert cost_micros(usage(prompt=10, cached=50), p) == 10


def test_reasoning_tokens_are_not_charged_twice() -> None:
    p = price("0", "10")
    assert cost_micros(usage(completion=100, reasoning=80), p) == 1000


def test_full_usage_is_exact() -> None:
    p = BUILTIN_PRICES["gpt-5"]  # 1.25 / 0.125 / 10
    u = usage(prompt=12_345, cached=1_024, completion=6_789, reasoning=512)
    # (11_321 x 1.25) + (1_024 x 0.125) + (6_789 x 10) = 14_151.25 + 128 + 67_890
    assert cost_micros(u, p) == 82_170  # 82_169.25 rounded up


def test_one_token_rounds_up_to_at_least_one_micro() -> None:
    p = BUILTIN_PRICES["gpt-5-nano"]  # 0.05 input, 0.005 cached
    assert cost_micros(usage(prompt=1), p) == 1
    assert cost_micros(usage(prompt=1, cached=1), p) == 1
    assert cost_micros(usage(), p) == 0


def test_cost_rounds_up_not_to_nearest() -> None:
    p = price("0.001")
    assert cost_micros(usage(prompt=1), p) == 1  # 0.001 micro
    assert cost_micros(usage(prompt=1001), p) == 2  # 1.001 micro
    assert cost_micros(usage(prompt=1000), p) == 1  # exactly 1


def test_free_model_costs_zero() -> None:
    assert cost_micros(usage(prompt=10**9, completion=10**9), price("0")) == 0


def test_cost_has_no_binary_float_error() -> None:
    # 0.1 + 0.2 style sums are exact: 3 x 0.1 micro-USD x 10 tokens = 3 micro-USD.
    p = price("0.1", "0.2")
    assert cost_micros(usage(prompt=10, completion=10), p) == 3
    assert cost_micros(usage(prompt=10**12, completion=10**12), p) == 3 * 10**11


def test_large_counts_stay_exact() -> None:
    p = price("999.999999", "999.999999")
    n = 2**40
    assert cost_micros(usage(prompt=n, completion=n), p) == 2 * n * 999_999_999 // 10**6 + 1


def test_cost_rejects_invalid_counts() -> None:
    p = price("1")
    with pytest.raises(ValueError):
        cost_micros(usage(prompt=-1), p)
    with pytest.raises(ValueError):
        cost_micros(usage(prompt=1.5), p)  # type: ignore[arg-type]


def test_estimate_uses_full_input_price() -> None:
    p = BUILTIN_PRICES["gpt-4o"]
    hold = estimate_micros(1_000_000, 1_000_000, p)
    assert hold == 12_500_000
    assert type(hold) is int
    assert estimate_micros(1, 0, p) == 3  # 2.5 rounded up
    assert estimate_micros(0, 0, p) == 0


def test_estimate_is_at_least_the_cost() -> None:
    p = BUILTIN_PRICES["o4-mini"]
    for prompt, cached, out in [(1, 0, 1), (999, 500, 333), (123_457, 100_000, 9_999)]:
        actual = cost_micros(usage(prompt=prompt, cached=cached, completion=out), p)
        assert estimate_micros(prompt, out, p) >= actual


def test_estimate_rejects_invalid_counts() -> None:
    with pytest.raises(ValueError):
        estimate_micros(-1, 0, price("1"))
    with pytest.raises(ValueError):
        estimate_micros(0, True, price("1"))


# --- USD <-> micro-USD --------------------------------------------------------------


@pytest.mark.parametrize(
    ("usd", "micros"),
    [
        ("0", 0),
        ("1", 1_000_000),
        ("0.1", 100_000),
        ("12.345678", 12_345_678),
        ("0.0000019", 1),  # floors: a limit never rounds up
        ("0.0000009", 0),
        ("100.9999999", 100_999_999),
        ("1E+3", 1_000_000_000),
        ("123456789012345678901234567890.123456", 123456789012345678901234567890123456),
    ],
)
def test_usd_to_micros_floors_exactly(usd: str, micros: int) -> None:
    result = usd_to_micros(Decimal(usd))
    assert result == micros
    assert type(result) is int


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "sNaN"])
def test_usd_to_micros_rejects_non_finite(bad: str) -> None:
    with pytest.raises(ValueError):
        usd_to_micros(Decimal(bad))


@pytest.mark.parametrize(
    ("micros", "usd"),
    [
        (0, "0"),
        (1, "0.000001"),
        (2_500_000, "2.5"),
        (12_345_678, "12.345678"),
        (10**40 + 1, "10000000000000000000000000000000000.000001"),
        (-5, "-0.000005"),
    ],
)
def test_micros_to_usd_is_exact(micros: int, usd: str) -> None:
    result = micros_to_usd(micros)
    assert type(result) is Decimal
    assert result == Decimal(usd)
    assert usd_to_micros(result) == micros


def test_micros_to_usd_formats_cents() -> None:
    assert f"{micros_to_usd(1_234_567):.4f}" == "1.2346"
    assert str(micros_to_usd(2_500_000)) == "2.500000"


def test_model_price_stays_strict() -> None:
    with pytest.raises(ValidationError):
        ModelPrice(input_per_mtok=Decimal(-1))
    with pytest.raises(ValidationError):
        ModelPrice.model_validate({"input_per_mtok": "1", "bogus": 1})
    p = ModelPrice.model_validate({"input_per_mtok": "0.15", "output_per_mtok": 0.6})
    assert type(p.input_per_mtok) is Decimal
    assert max_output_tokens(p) is None


def test_snapshot_fallback_strips_a_bounded_number_of_suffixes() -> None:
    hostile = "gpt-4o" + "-0101" * 50
    assert len(pricing._base_names(hostile)) == pricing._MAX_SUFFIXES
    assert PriceTable().lookup(hostile) is None


# --- built-in tiers, reasoning and context sizes ----------------------------------------

REASONING_MODELS = [
    "o1",
    "o1-mini",
    "o1-pro",
    "o3",
    "o3-mini",
    "o3-pro",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-5-pro",
]


def test_reasoning_models_are_flagged_and_no_others() -> None:
    flagged = sorted(name for name, p in BUILTIN_PRICES.items() if p.reasoning)
    assert flagged == sorted(REASONING_MODELS)
    assert not BUILTIN_PRICES["gpt-5-chat-latest"].reasoning


@pytest.mark.parametrize(
    ("model", "context"),
    [
        ("gpt-5", 272_000),
        ("gpt-5-mini", 272_000),
        ("gpt-5-nano", 272_000),
        ("gpt-5-pro", 272_000),
        ("gpt-5-chat-latest", 128_000),
        ("gpt-4.1", 1_047_576),
        ("gpt-4.1-mini", 1_047_576),
        ("gpt-4.1-nano", 1_047_576),
        ("gpt-4o", 128_000),
        ("gpt-4o-mini", 128_000),
        ("o1", 200_000),
        ("o1-mini", 128_000),
        ("o3", 200_000),
        ("o4-mini", 200_000),
        ("gpt-4-turbo", 128_000),
        ("gpt-4", 8_192),
        ("gpt-3.5-turbo", 16_385),
        ("gpt-3.5-turbo-instruct", 4_096),
        ("davinci-002", 16_384),
        ("babbage-002", 16_384),
        ("text-embedding-3-small", 8_191),
    ],
)
def test_builtin_input_contexts(model: str, context: int) -> None:
    assert BUILTIN_PRICES[model].max_input_tokens == context


def test_every_builtin_model_states_its_input_context() -> None:
    for model, p in BUILTIN_PRICES.items():
        assert p.max_input_tokens is not None, model
        assert p.max_output_tokens is None or p.max_output_tokens <= 272_000, model


def mtok(p: ModelPrice) -> tuple[Decimal, Decimal | None, Decimal]:
    return (p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-5", ("2.50", "0.25", "20.00")),
        ("gpt-5-mini", ("0.45", "0.045", "3.60")),
        ("gpt-4.1", ("3.50", "0.875", "14.00")),
        ("gpt-4.1-mini", ("0.70", "0.175", "2.80")),
        ("gpt-4.1-nano", ("0.20", "0.05", "0.80")),
        ("gpt-4o", ("4.25", "2.125", "17.00")),
        ("gpt-4o-2024-05-13", ("8.75", None, "26.25")),
        ("gpt-4o-mini", ("0.25", "0.125", "1.00")),
        ("o3", ("3.50", "0.875", "14.00")),
        ("o4-mini", ("2.00", "0.50", "8.00")),
    ],
)
def test_builtin_priority_prices_are_openais(
    model: str, expected: tuple[str, str | None, str]
) -> None:
    i, c, o = expected
    priority = tier_price(BUILTIN_PRICES[model], "priority")
    assert mtok(priority) == (Decimal(i), None if c is None else Decimal(c), Decimal(o))


@pytest.mark.parametrize("model", ["gpt-5", "gpt-5-mini", "gpt-5-nano", "o3", "o4-mini"])
def test_builtin_flex_is_half_of_standard_rounded_up(model: str) -> None:
    standard, flex = BUILTIN_PRICES[model], tier_price(BUILTIN_PRICES[model], "flex")
    assert flex.input_per_mtok == standard.input_per_mtok / 2
    assert flex.output_per_mtok == standard.output_per_mtok / 2
    assert standard.cached_input_per_mtok is not None
    assert flex.cached_input_per_mtok is not None
    half = standard.cached_input_per_mtok / 2
    assert half <= flex.cached_input_per_mtok <= half + Decimal("0.001")


def test_no_builtin_tier_is_cheaper_than_flex_or_dearer_than_twice_standard() -> None:
    for model, p in BUILTIN_PRICES.items():
        priority, flex = tier_price(p, "priority"), tier_price(p, "flex")
        for tiered in (priority, flex):
            assert type(tiered.input_per_mtok) is Decimal, model
        assert priority.input_per_mtok >= p.input_per_mtok, model
        assert priority.output_per_mtok >= p.output_per_mtok, model
        assert priority.output_per_mtok <= 2 * p.output_per_mtok, model
        assert flex.input_per_mtok <= p.input_per_mtok, model
        assert flex.output_per_mtok <= p.output_per_mtok, model


def test_a_model_without_priority_prices_pays_twice_standard_at_priority() -> None:
    p = BUILTIN_PRICES["o1-pro"]
    assert p.priority is None and p.priority_multiplier is None
    priority = tier_price(p, "priority")
    assert mtok(priority) == (Decimal(300), None, Decimal(1200))  # above MAX_PER_MTOK: fine
    assert hold_price(p, "priority") == priority


def test_a_model_without_flex_prices_pays_standard_at_flex() -> None:
    p = BUILTIN_PRICES["gpt-4.1"]
    assert tier_price(p, "flex") is p
    assert mtok(hold_price(p, "flex")) == mtok(p)


# --- tier_price, hold_price -------------------------------------------------------------


def tiered(**fields: object) -> ModelPrice:
    return ModelPrice.model_validate(
        {"input_per_mtok": "1", "cached_input_per_mtok": "0.1", "output_per_mtok": "10", **fields}
    )


def test_standard_tiers_return_the_price_itself() -> None:
    p = tiered(priority={"input_per_mtok": "3", "output_per_mtok": "30"})
    for tier in (None, "", "auto", "default", "standard", "scale"):
        assert tier_price(p, tier) is p
        assert hold_price(p, tier) is p


def test_an_explicit_priority_price_wins_over_its_multiplier() -> None:
    p = tiered(
        priority={"input_per_mtok": "3", "cached_input_per_mtok": "0.3", "output_per_mtok": "30"},
        priority_multiplier="5",
    )
    assert mtok(tier_price(p, "priority")) == (Decimal(3), Decimal("0.3"), Decimal(30))


def test_a_priority_multiplier_scales_every_standard_price() -> None:
    p = tiered(priority_multiplier="1.75")
    assert mtok(tier_price(p, "priority")) == (Decimal("1.75"), Decimal("0.175"), Decimal("17.5"))


def test_a_flex_multiplier_scales_and_an_explicit_flex_price_wins() -> None:
    assert mtok(tier_price(tiered(flex_multiplier="0.5"), "flex")) == (
        Decimal("0.5"),
        Decimal("0.05"),
        Decimal(5),
    )
    p = tiered(flex={"input_per_mtok": "0.4", "output_per_mtok": "4"}, flex_multiplier="0.5")
    assert mtok(tier_price(p, "flex")) == (Decimal("0.4"), None, Decimal(4))


def test_a_tier_without_a_cached_price_charges_cached_input_at_its_input_price() -> None:
    p = tiered(priority={"input_per_mtok": "2", "output_per_mtok": "20"})
    u = Usage(
        prompt_tokens=1000,
        cached_tokens=1000,
        completion_tokens=0,
        reasoning_tokens=0,
        service_tier="priority",
    )
    assert charge_micros(u, p) == 2000


def test_a_tier_price_keeps_the_models_limits_but_no_tier_information() -> None:
    p = tiered(max_input_tokens=1000, max_output_tokens=10, reasoning=True, priority_multiplier="3")
    priority = tier_price(p, "priority")
    assert (priority.max_input_tokens, priority.max_output_tokens, priority.reasoning) == (
        1000,
        10,
        True,
    )
    assert priority.priority is None and priority.priority_multiplier is None
    assert priority.flex is None and priority.flex_multiplier is None


def test_an_unknown_reported_tier_is_charged_at_the_highest_tier_component_wise() -> None:
    p = tiered(
        priority={"input_per_mtok": "2", "output_per_mtok": "8"},  # cached: its input, 2
        flex_multiplier="3",  # 3 / 0.3 / 30
    )
    assert mtok(tier_price(p, "turbo")) == (Decimal(3), Decimal(2), Decimal(30))
    assert mtok(tier_price(p, "PRIORITY")) == (Decimal(3), Decimal(2), Decimal(30))


def test_a_requested_priority_tier_is_held_at_priority() -> None:
    p = BUILTIN_PRICES["gpt-4o"]
    assert mtok(hold_price(p, "priority")) == mtok(tier_price(p, "priority"))


def test_a_requested_flex_tier_is_held_at_the_dearer_of_flex_and_standard() -> None:
    p = BUILTIN_PRICES["o3"]
    assert mtok(hold_price(p, "flex")) == mtok(p)  # flex may be served at standard
    dear_flex = tiered(flex={"input_per_mtok": "0.5", "output_per_mtok": "20"})
    assert mtok(hold_price(dear_flex, "flex")) == (Decimal(1), Decimal("0.5"), Decimal(20))


@pytest.mark.parametrize("requested", ["turbo", 5, True, ["priority"], {"tier": "flex"}])
def test_an_unknown_requested_tier_is_held_at_the_highest_tier(requested: object) -> None:
    p = BUILTIN_PRICES["gpt-5"]
    assert mtok(hold_price(p, requested)) == (Decimal("2.50"), Decimal("0.25"), Decimal("20.00"))


# The tiers a response may report for each requested tier: a priority or flex request may
# be served at the standard tier instead.
SERVED: dict[str | None, list[str | None]] = {
    None: [None, "default"],
    "auto": ["default"],
    "default": ["default"],
    "priority": ["priority", "default"],
    "flex": ["flex", "default"],
    "made-up": ["made-up", "priority", "flex", "default"],
}


@pytest.mark.parametrize("model", sorted(BUILTIN_PRICES))
def test_the_hold_covers_the_charge_at_every_tier_the_request_can_land_on(model: str) -> None:
    rng = random.Random(model)
    p = BUILTIN_PRICES[model]
    for requested, served in SERVED.items():
        held_at = hold_price(p, requested)
        for tier in served:
            prompt, out = rng.randint(0, 300_000), rng.randint(0, 100_000)
            u = Usage(
                prompt_tokens=prompt,
                cached_tokens=rng.randint(0, prompt),
                completion_tokens=out,
                reasoning_tokens=rng.randint(0, out),
                service_tier=tier,
            )
            assert estimate_micros(prompt, out, held_at) >= charge_micros(u, p, {}), (
                requested,
                tier,
            )


def test_tier_prices_stay_strict() -> None:
    with pytest.raises(ValidationError):
        tiered(priority_multiplier="-1")
    with pytest.raises(ValidationError):
        tiered(flex_multiplier="11")
    with pytest.raises(ValidationError):
        tiered(priority={"input_per_mtok": "1", "bogus": 1})
    with pytest.raises(ValidationError):
        tiered(flex={"input_per_mtok": "-1"})
    with pytest.raises(ValidationError):
        tiered(max_input_tokens=0)
    with pytest.raises(ValidationError):
        TierPrice(input_per_mtok=Decimal(1001))
    frozen = TierPrice(input_per_mtok=Decimal(1))
    with pytest.raises(ValidationError):
        frozen.input_per_mtok = Decimal(0)
    p = tiered(priority={"input_per_mtok": "1.5"}, flex_multiplier=0.5)
    assert p.priority is not None
    assert type(p.priority.input_per_mtok) is Decimal
    assert type(p.flex_multiplier) is Decimal


# --- reasoning tokens -------------------------------------------------------------------


def test_reasoning_beyond_completion_is_billed_on_top() -> None:
    # A server that reports more reasoning than completion tokens counts them apart.
    u = usage(completion=100, reasoning=300)
    assert billed_output_tokens(u) == 400
    assert cost_micros(u, price("0", "10")) == 4000


def test_reasoning_within_completion_is_not_billed_again() -> None:
    assert billed_output_tokens(usage(completion=100, reasoning=100)) == 100
    assert billed_output_tokens(usage(completion=100, reasoning=0)) == 100


def test_cost_rejects_invalid_reasoning_counts() -> None:
    with pytest.raises(ValueError):
        cost_micros(usage(completion=1, reasoning=-1), price("1"))


# --- hosted tools -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "usd"),
    [
        ("web_search", "0.025"),
        ("web_search_preview", "0.025"),
        ("file_search", "0.0025"),
        ("code_interpreter", "0.03"),
        ("code_interpreter_4g", "0.12"),
        ("code_interpreter_16g", "0.48"),
        ("code_interpreter_64g", "1.92"),
    ],
)
def test_builtin_tool_prices(tool: str, usd: str) -> None:
    assert BUILTIN_TOOL_PRICES[tool].per_call_usd == Decimal(usd)
    assert type(BUILTIN_TOOL_PRICES[tool].per_call_usd) is Decimal


def test_builtin_tool_prices_are_read_only() -> None:
    with pytest.raises(TypeError):
        BUILTIN_TOOL_PRICES["web_search"] = ToolPrice(per_call_usd=Decimal(0))  # type: ignore[index]
    with pytest.raises(TypeError):
        PriceTable().tool_prices["web_search"] = ToolPrice(per_call_usd=Decimal(0))  # type: ignore[index]


def test_tool_calls_cost_their_per_call_price_exactly() -> None:
    prices = {
        "a": ToolPrice(per_call_usd=Decimal("0.0025")),
        "b": ToolPrice(per_call_usd=Decimal(1)),
    }
    cost = tool_call_micros({"a": 3, "b": 2}, prices)
    assert cost == 2_007_500
    assert type(cost) is int
    assert tool_call_micros({}, prices) == 0
    assert tool_call_micros({"a": 0}, prices) == 0


def test_a_fraction_of_a_micro_rounds_up() -> None:
    prices = {"a": ToolPrice(per_call_usd=Decimal("0.0000001"))}
    assert tool_call_micros({"a": 1}, prices) == 1
    assert tool_call_micros({"a": 10}, prices) == 1
    assert tool_call_micros({"a": 11}, prices) == 2


def test_an_unpriced_hosted_tool_call_costs_the_dearest_known_price() -> None:
    prices = {"a": ToolPrice(per_call_usd=Decimal("0.01")), "b": ToolPrice(per_call_usd=Decimal(2))}
    assert tool_call_micros({"image_generation": 2}, prices) == 4_000_000
    assert tool_call_micros({"image_generation": 0}, prices) == 0
    # with no prices at all, the built-in table's dearest
    assert tool_call_micros({"x": 1}, {}) == 1_920_000
    assert "image_generation" not in BUILTIN_TOOL_PRICES
    assert tool_call_micros({"image_generation": 1}, BUILTIN_TOOL_PRICES) == 1_920_000


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_tool_call_counts_must_be_non_negative_ints(bad: object) -> None:
    with pytest.raises(ValueError):
        tool_call_micros({"web_search": bad}, BUILTIN_TOOL_PRICES)  # type: ignore[dict-item]


def test_tool_prices_stay_strict() -> None:
    with pytest.raises(ValidationError):
        ToolPrice(per_call_usd=Decimal(-1))
    with pytest.raises(ValidationError):
        ToolPrice.model_validate({"per_call_usd": "1", "per_token": 1})
    assert type(ToolPrice.model_validate({"per_call_usd": 0.03}).per_call_usd) is Decimal


def test_tool_overrides_replace_builtins_and_add_tools() -> None:
    mine = ToolPrice(per_call_usd=Decimal("0.01"))
    image = ToolPrice(per_call_usd=Decimal("0.30"))
    table = PriceTable(tools={"web_search": mine, "image_generation": image})
    assert table.tool_prices["web_search"] is mine
    assert table.tool_prices["image_generation"] is image
    assert table.tool_prices["file_search"] is BUILTIN_TOOL_PRICES["file_search"]
    assert PriceTable().tool_prices == BUILTIN_TOOL_PRICES


def test_table_copies_tool_overrides() -> None:
    tools = {"x": ToolPrice(per_call_usd=Decimal(1))}
    table = PriceTable(tools=tools)
    tools["y"] = ToolPrice(per_call_usd=Decimal(2))
    assert "y" not in table.tool_prices


@pytest.mark.parametrize(
    ("memory", "usd"), [(None, "0.03"), ("1g", "0.03"), ("4g", "0.12"), ("64g", "1.92")]
)
def test_code_interpreter_is_priced_for_the_container_asked_for(
    memory: str | None, usd: str
) -> None:
    prices = PriceTable().tool_prices_for(container_memory=memory)
    assert prices["code_interpreter"].per_call_usd == Decimal(usd)
    assert prices["web_search"] is BUILTIN_TOOL_PRICES["web_search"]


def test_an_unknown_container_size_is_priced_as_the_dearest_container() -> None:
    table = PriceTable(tools={"code_interpreter_256g": ToolPrice(per_call_usd=Decimal(8))})
    prices = table.tool_prices_for(container_memory="1t")
    assert prices["code_interpreter"].per_call_usd == Decimal(8)


def test_container_size_overrides_are_used() -> None:
    mine = ToolPrice(per_call_usd=Decimal("0.10"))
    table = PriceTable(tools={"code_interpreter_4g": mine})
    assert table.tool_prices_for(container_memory="4g")["code_interpreter"] is mine


# --- charge_micros ----------------------------------------------------------------------


def charged(tier: str | None = None, tools: tuple[tuple[str, int], ...] = ()) -> Usage:
    return Usage(
        prompt_tokens=1_000_000,
        cached_tokens=0,
        completion_tokens=1_000_000,
        reasoning_tokens=0,
        service_tier=tier,
        tool_calls=tools,
    )


@pytest.mark.parametrize(
    ("tier", "micros"),
    [
        (None, 12_500_000),
        ("default", 12_500_000),
        ("priority", 21_250_000),
        ("flex", 12_500_000),
        ("something-new", 21_250_000),
    ],
)
def test_a_charge_prices_tokens_at_the_tier_that_served_them(tier: str | None, micros: int) -> None:
    assert charge_micros(charged(tier), BUILTIN_PRICES["gpt-4o"]) == micros


def test_a_flex_charge_is_half_on_a_flex_model() -> None:
    assert charge_micros(charged("flex"), BUILTIN_PRICES["o3"]) == 5_000_000
    assert charge_micros(charged("default"), BUILTIN_PRICES["o3"]) == 10_000_000


def test_a_charge_adds_hosted_tool_calls() -> None:
    u = charged("default", (("file_search", 4), ("web_search", 2)))
    # 12.5 USD of tokens + 4 x 0.0025 + 2 x 0.025
    assert charge_micros(u, BUILTIN_PRICES["gpt-4o"]) == 12_560_000
    mine = {"web_search": ToolPrice(per_call_usd=Decimal("0.01"))}
    # file_search is unpriced in ``mine``: it costs the dearest price there
    assert charge_micros(u, BUILTIN_PRICES["gpt-4o"], mine) == 12_560_000


def test_a_charge_covers_tool_calls_the_response_did_not_list() -> None:
    p = BUILTIN_PRICES["gpt-4o"]
    u = charged("default", (("web_search", 3),))
    floor = {"web_search": 1, "code_interpreter": 1}
    assert charge_micros(u, p, None, min_tool_calls=floor) == 12_500_000 + 75_000 + 30_000
    assert charge_micros(charged(), p, None, min_tool_calls=floor) == 12_500_000 + 25_000 + 30_000


def test_pricing_docstring_examples_run() -> None:
    assert doctest.testmod(pricing).failed == 0


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_usd_text_is_the_exact_decimal(micros: int) -> None:
    assert pricing.usd_text(micros) == str(pricing.micros_to_usd(micros))
    assert pricing.usd_text(micros) == f"{pricing.micros_to_usd(micros):.6f}"


@given(st.decimals(min_value=0, max_value=Decimal(10**12), places=12))
def test_usd_to_micros_up_is_the_least_micros_at_or_above(usd: Decimal) -> None:
    up = pricing.usd_to_micros_up(usd)
    assert pricing.micros_to_usd(up) >= usd > pricing.micros_to_usd(up - 1)


_PRICES = st.decimals(min_value=0, max_value=MAX_PER_MTOK, places=6, allow_nan=False)
_TOKENS = st.integers(min_value=0, max_value=2**53)


def _decimal_ceil(total: Decimal) -> int:
    return int(total.to_integral_value(rounding=ROUND_CEILING))


@given(_PRICES, _PRICES, st.one_of(st.none(), _PRICES), _TOKENS, _TOKENS, _TOKENS, _TOKENS)
def test_token_costs_in_integers_are_the_exact_decimal_sums_rounded_up(
    input_: Decimal,
    output: Decimal,
    cached_price: Decimal | None,
    prompt: int,
    cached: int,
    completion: int,
    reasoning: int,
) -> None:
    price = ModelPrice(
        input_per_mtok=input_, output_per_mtok=output, cached_input_per_mtok=cached_price
    )
    with localcontext() as ctx:
        ctx.prec = 200
        assert estimate_micros(prompt, completion, price) == _decimal_ceil(
            prompt * input_ + completion * output
        )
        usage = Usage(
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=completion,
            reasoning_tokens=reasoning,
        )
        hit = min(cached, prompt)
        billed = completion + reasoning if reasoning > completion else completion
        expected = (
            (prompt - hit) * input_
            + hit * (input_ if cached_price is None else cached_price)
            + billed * output
        )
        assert cost_micros(usage, price) == _decimal_ceil(expected)
