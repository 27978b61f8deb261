"""The one release-or-charge rule, for every way a request can end."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

import pytest

from proxy.charge import Bill, Ending, Tariff, amount_due
from proxy.pricing import ModelPrice, ToolPrice
from proxy.usage import Usage

PRICE = ModelPrice(input_per_mtok=Decimal(1), output_per_mtok=Decimal(2))
REASONING = PRICE.model_copy(update={"reasoning": True})
HOLD = 50_000
USAGE = Usage(prompt_tokens=100, cached_tokens=0, completion_tokens=300, reasoning_tokens=0)


def tariff(
    price: ModelPrice = PRICE,
    *,
    tool_prices: Mapping[str, ToolPrice] | None = None,
    min_tool_calls: Mapping[str, int] | None = None,
    tools_enabled: bool = False,
) -> Tariff:
    return Tariff(
        price=price,
        hold_price=price,
        tool_prices=tool_prices,
        min_tool_calls=min_tool_calls,
        prompt_tokens=100,
        tools_enabled=tools_enabled,
    )


@pytest.mark.parametrize("ending", [Ending.NOT_SENT, Ending.REFUSED])
def test_a_request_the_upstream_never_billed_is_released(ending: Ending) -> None:
    assert amount_due(Bill(ending=ending, usage=USAGE), tariff(), hold_micros=HOLD) == 0


@pytest.mark.parametrize("ending", [Ending.ANSWERED, Ending.STREAM_COMPLETE, Ending.CUT])
def test_reported_usage_is_charged_whatever_the_ending(ending: Ending) -> None:
    assert amount_due(Bill(ending=ending, usage=USAGE), tariff(), hold_micros=HOLD) == 700


def test_usage_is_charged_at_the_tier_the_response_reports() -> None:
    usage = Usage(
        prompt_tokens=100,
        cached_tokens=0,
        completion_tokens=300,
        reasoning_tokens=0,
        service_tier="priority",
    )
    bill = Bill(ending=Ending.ANSWERED, usage=usage)
    assert amount_due(bill, tariff(), hold_micros=HOLD) == 1400


def test_tool_calls_billed_without_being_listed_are_charged() -> None:
    prices = {"web_search": ToolPrice(per_call_usd=Decimal("0.01"))}
    bill = Bill(ending=Ending.ANSWERED, usage=USAGE)
    due = amount_due(
        bill, tariff(tool_prices=prices, min_tool_calls={"web_search": 1}), hold_micros=HOLD
    )
    assert due == 700 + 10_000


def test_a_normal_stream_end_without_usage_charges_the_counted_output() -> None:
    bill = Bill(ending=Ending.STREAM_COMPLETE, counted_output=30)
    assert amount_due(bill, tariff(), hold_micros=HOLD) == 100 + 30 * 2


@pytest.mark.parametrize(
    ("price", "tools"), [(REASONING, False), (PRICE, True)], ids=["reasoning", "hosted-tools"]
)
def test_hidden_output_makes_a_normal_stream_end_without_usage_charge_the_hold(
    price: ModelPrice, tools: bool
) -> None:
    bill = Bill(ending=Ending.STREAM_COMPLETE, counted_output=30)
    assert amount_due(bill, tariff(price, tools_enabled=tools), hold_micros=HOLD) == HOLD


@pytest.mark.parametrize("ending", [Ending.ANSWERED, Ending.CUT])
def test_any_other_ending_without_usage_charges_the_hold(ending: Ending) -> None:
    bill = Bill(ending=ending, counted_output=30)
    assert amount_due(bill, tariff(), hold_micros=HOLD) == HOLD


def test_a_bill_left_as_it_started_charges_the_hold() -> None:
    # An error of the proxy's own before anything was recorded on the bill.
    assert amount_due(Bill(), tariff(), hold_micros=HOLD) == HOLD
