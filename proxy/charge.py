"""What a request is charged, for every way it can end: the one place that decides
"release or charge".

    bill = Bill(ending=Ending.ANSWERED, usage=usage)
    due = amounts_due(bill, tariff, held=plan.amounts)   # micro-USD, tokens, requests
    await hold.commit(due)

The rule, in the order it is applied:

* the request never reached the upstream, or the upstream refused it (non-2xx): 0, the
  hold is released;
* the upstream reported usage: that usage priced (at the tier the response reports, plus
  hosted tool calls), whatever the hold was;
* a stream that ended normally (``[DONE]`` / ``response.completed`` seen) without usage,
  for a model that bills no hidden reasoning and used no hosted tool: the prompt held plus
  the output counted from the relayed text;
* anything else (cut, timed out, client gone without drain, an error of the proxy's own,
  cancelled): the whole hold, since the upstream may have billed up to it.

Tokens follow the same rule (usage: prompt + completion tokens, counting reasoning where
it is billed beyond the completion). The request itself counts once it was sent: a
request the upstream refused still reached it.

Sans-IO: no aiohttp, no store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from proxy.counters import Amounts
from proxy.price_files import SizeTier, price_at_prompt_size
from proxy.pricing import ModelPrice, ToolPrice, charge_micros, estimate_micros
from proxy.usage import Usage


class Ending(StrEnum):
    """How a metered request ended, as far as billing goes."""

    NOT_SENT = "not_sent"  # the upstream never got it (no connection)
    REFUSED = "refused"  # the upstream answered non-2xx: nothing billed
    ANSWERED = "answered"  # a 2xx answer (or stream) was read to its end
    STREAM_COMPLETE = "stream_complete"  # a stream ended with [DONE] / response.completed
    CUT = "cut"  # anything else after the request went out


NOTHING_DUE = (Ending.NOT_SENT, Ending.REFUSED)  # the endings the upstream bills nothing for


@dataclass(kw_only=True, slots=True)
class Bill:
    """What is known about a request's cost when it ends; filled in by the handler."""

    ending: Ending = Ending.CUT
    usage: Usage | None = None
    counted_output: int | None = None  # output tokens counted from a stream's text
    # The amounts last worked out for it, with what they were worked out from.
    due: tuple[Ending, Usage | None, int | None, Amounts] | None = None


@dataclass(kw_only=True, slots=True)
class Tariff:
    """How a request is priced: its model's price (standard tier; the response's tier is
    applied to usage), the price it was held at, and the hosted tools it enabled."""

    price: ModelPrice
    hold_price: ModelPrice
    tool_prices: Mapping[str, ToolPrice] | None = None
    # Hosted tool calls billed whether or not the response itemises them.
    min_tool_calls: Mapping[str, int] | None = None
    # Prices by prompt size (a price-file entry's ``*_above_<N>k_tokens``).
    size_tiers: tuple[SizeTier, ...] = ()
    prompt_tokens: int = 0  # as held
    tools_enabled: bool = False


def amount_due(bill: Bill, tariff: Tariff, *, hold_micros: int) -> int:
    """The micro-USD to commit for ``bill``: 0 releases the hold."""
    if bill.ending in NOTHING_DUE:
        return 0
    if bill.usage is not None:
        price = price_at_prompt_size(tariff.price, tariff.size_tiers, bill.usage.prompt_tokens)
        return charge_micros(
            bill.usage, price, tariff.tool_prices, min_tool_calls=tariff.min_tool_calls
        )
    if (
        bill.ending is Ending.STREAM_COMPLETE
        and bill.counted_output is not None
        and not tariff.price.reasoning
        and not tariff.tools_enabled
    ):
        return estimate_micros(tariff.prompt_tokens, bill.counted_output, tariff.hold_price)
    return hold_micros


def amounts_due(bill: Bill, tariff: Tariff, *, held: Amounts) -> Amounts:
    """What to commit for ``bill`` in every unit (``held``: what the request holds)."""
    micros = amount_due(bill, tariff, hold_micros=held.micros)
    if bill.ending is Ending.NOT_SENT:
        return Amounts(micros, 0, 0)
    return Amounts(micros, tokens_due(bill, tariff, held_tokens=held.tokens), held.requests)


def tokens_due(bill: Bill, tariff: Tariff, *, held_tokens: int) -> int:
    """The tokens to commit for ``bill``, by the same rule as the money."""
    if bill.ending in NOTHING_DUE:
        return 0
    usage = bill.usage
    if usage is not None:
        return usage.prompt_tokens + max(usage.completion_tokens, usage.reasoning_tokens)
    if (
        bill.ending is Ending.STREAM_COMPLETE
        and bill.counted_output is not None
        and not tariff.price.reasoning
        and not tariff.tools_enabled
    ):
        return tariff.prompt_tokens + bill.counted_output
    return held_tokens
