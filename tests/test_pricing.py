from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from proxy import pricing
from proxy.pricing import (
    BUILTIN_PRICES,
    ModelPrice,
    PriceTable,
    cost_micros,
    estimate_micros,
    max_output_tokens,
    micros_to_usd,
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
