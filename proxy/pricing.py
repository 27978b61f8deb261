"""Model prices (USD per 1M tokens) and exact cost arithmetic in integer micro-USD.

    >>> table = PriceTable()
    >>> price = table.lookup("gpt-4o-2024-08-06")  # a dated snapshot prices as "gpt-4o"
    >>> cost_micros(Usage(prompt_tokens=1_000_000, cached_tokens=0,
    ...                   completion_tokens=0, reasoning_tokens=0), price)
    2500000

A price is USD per 1M tokens, so ``tokens x price`` is micro-USD exactly. Sums are done
over exact fractions (``Decimal`` -> ``Fraction``), never floats; the store counts whole
micro-USD. Charges round up (a call is never under-charged) and limits round down (a
limit never grows), so rounding always errs towards spending less than the cap allows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal, Inexact, InvalidOperation
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict, Field

from proxy.usage import Usage

MAX_PER_MTOK = Decimal(1000)
MICROS_PER_USD = 1_000_000


class ModelPrice(BaseModel):
    """USD per 1M tokens for one model (the ``pricing.models`` entries of the caps file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok: Decimal = Field(ge=0, le=MAX_PER_MTOK)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0, le=MAX_PER_MTOK)
    output_per_mtok: Decimal = Field(default=Decimal(0), ge=0, le=MAX_PER_MTOK)
    max_output_tokens: int | None = Field(default=None, gt=0)


def _price(
    input_: str, cached: str | None, output: str, max_output: int | None = None
) -> ModelPrice:
    return ModelPrice(
        input_per_mtok=Decimal(input_),
        cached_input_per_mtok=None if cached is None else Decimal(cached),
        output_per_mtok=Decimal(output),
        max_output_tokens=max_output,
    )


# OpenAI standard-tier list prices, USD per 1M tokens: input, cached input, output,
# and the model's max output tokens. As of 2025-08 (the GPT-5 launch price list on
# openai.com/api/pricing and platform.openai.com/docs/pricing, including its "legacy
# models" table). Batch, flex and priority tiers are not modelled. Operators override
# any entry (or add models) with ``pricing.models`` in the caps file.
#
# Snapshots priced differently from their alias are listed explicitly, so that the
# snapshot -> alias fallback in ``PriceTable.lookup`` never under-prices them.
BUILTIN_PRICES: Mapping[str, ModelPrice] = MappingProxyType(
    {
        # GPT-5 family
        "gpt-5": _price("1.25", "0.125", "10.00", 128_000),
        "gpt-5-mini": _price("0.25", "0.025", "2.00", 128_000),
        "gpt-5-nano": _price("0.05", "0.005", "0.40", 128_000),
        "gpt-5-chat-latest": _price("1.25", "0.125", "10.00", 16_384),
        "gpt-5-pro": _price("15.00", None, "120.00", 272_000),
        # GPT-4.1 family
        "gpt-4.1": _price("2.00", "0.50", "8.00", 32_768),
        "gpt-4.1-mini": _price("0.40", "0.10", "1.60", 32_768),
        "gpt-4.1-nano": _price("0.10", "0.025", "0.40", 32_768),
        # GPT-4o family
        "gpt-4o": _price("2.50", "1.25", "10.00", 16_384),
        "gpt-4o-2024-05-13": _price("5.00", None, "15.00", 4_096),
        "gpt-4o-mini": _price("0.15", "0.075", "0.60", 16_384),
        # o-series reasoning models
        "o1": _price("15.00", "7.50", "60.00", 100_000),
        "o3": _price("2.00", "0.50", "8.00", 100_000),
        "o3-mini": _price("1.10", "0.55", "4.40", 100_000),
        "o1-mini": _price("1.10", "0.55", "4.40", 65_536),
        "o1-pro": _price("150.00", None, "600.00", 100_000),
        "o3-pro": _price("20.00", None, "80.00", 100_000),
        "o4-mini": _price("1.10", "0.275", "4.40", 100_000),
        # Legacy chat models
        "gpt-4-turbo": _price("10.00", None, "30.00", 4_096),
        "gpt-4-0125-preview": _price("10.00", None, "30.00", 4_096),
        "gpt-4-1106-preview": _price("10.00", None, "30.00", 4_096),
        "gpt-4": _price("30.00", None, "60.00", 8_192),
        "gpt-3.5-turbo": _price("0.50", None, "1.50", 4_096),
        "gpt-3.5-turbo-1106": _price("1.00", None, "2.00", 4_096),
        "gpt-3.5-turbo-0613": _price("1.50", None, "2.00", 4_096),
        # Legacy completions models
        "gpt-3.5-turbo-instruct": _price("1.50", None, "2.00", 4_096),
        "davinci-002": _price("2.00", None, "2.00"),
        "babbage-002": _price("0.40", None, "0.40"),
        # Embeddings (input only)
        "text-embedding-3-small": _price("0.02", None, "0"),
        "text-embedding-3-large": _price("0.13", None, "0"),
        "text-embedding-ada-002": _price("0.10", None, "0"),
    }
)

# One snapshot suffix: "-2024-08-06", "-0613" (a month-day) or "-preview".
_SNAPSHOT_SUFFIX = re.compile(
    r"-(?:\d{4}-\d{2}-\d{2}|(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])|preview)$"
)


# Real snapshot names carry at most two suffixes ("-0125-preview"); stopping early keeps a
# hostile name from costing more than a few regex scans.
_MAX_SUFFIXES = 3


def _base_names(model: str) -> list[str]:
    """The names a snapshot falls back to, nearest first (``gpt-4-0125-preview`` ->
    ``gpt-4-0125``, ``gpt-4``). Only whole trailing suffixes are stripped, never an
    arbitrary prefix match, so ``gpt-4o-mini-x`` never resolves to ``gpt-4o``."""
    names: list[str] = []
    for _ in range(_MAX_SUFFIXES):
        base = _SNAPSHOT_SUFFIX.sub("", model, count=1)
        if base == model or not base:
            break
        names.append(base)
        model = base
    return names


class PriceTable:
    """Resolves a request's ``model`` to its price.

        table = PriceTable(overrides=settings.pricing.models)
        price = table.lookup(body["model"])
        if price is None:
            raise ModelNotPriced(...)  # an unknown model is never free

    Order: exact override, exact built-in, then the snapshot's base name (override,
    then built-in, nearest base first), then ``default``, else ``None``.
    """

    def __init__(
        self,
        *,
        overrides: Mapping[str, ModelPrice] | None = None,
        default: ModelPrice | None = None,
    ) -> None:
        self._overrides: Mapping[str, ModelPrice] = dict(overrides or {})
        self._default = default

    def lookup(self, model: str) -> ModelPrice | None:
        """The price of ``model``, or ``None`` if it is not priced (never ``$0``)."""
        for name in (model, *_base_names(model)):
            price = self._overrides.get(name)
            if price is None:
                price = BUILTIN_PRICES.get(name)
            if price is not None:
                return price
        return self._default


# Token counts stay below 2**40 and prices below 1000 with few decimals: 60 significant
# digits hold every product and sum here exactly, so nothing is rounded but the final ceil.
_EXACT = Context(prec=60, rounding=ROUND_CEILING, traps=[InvalidOperation, Inexact])


def _exact(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError(f"not a finite amount: {value}")
    return value


def _ceil(total: Decimal) -> int:
    return int(total.to_integral_value(rounding=ROUND_CEILING))


def _check_tokens(**counts: int) -> None:
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be a non-negative int, got {count!r}")


def cost_micros(usage: Usage, price: ModelPrice) -> int:
    """What ``usage`` costs at ``price``, in whole micro-USD, rounded up.

    Uncached prompt tokens pay the input price, cached ones the cached price (the input
    price when the model has none), and every completion token (reasoning included) the
    output price. Rounding up means a call is never under-charged; a priced call that
    used any token costs at least 1 micro-USD.
    """
    _check_tokens(
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=usage.cached_tokens,
        completion_tokens=usage.completion_tokens,
    )
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    input_price = _exact(price.input_per_mtok)
    cached_price = (
        input_price if price.cached_input_per_mtok is None else _exact(price.cached_input_per_mtok)
    )
    mul, add = _EXACT.multiply, _EXACT.add
    total = add(
        add(mul(usage.prompt_tokens - cached, input_price), mul(cached, cached_price)),
        mul(usage.completion_tokens, _exact(price.output_per_mtok)),
    )
    return _ceil(total)


def estimate_micros(prompt_tokens: int, output_tokens: int, price: ModelPrice) -> int:
    """The hold for a request, in whole micro-USD, rounded up.

    Every prompt token is held at the full input price (whether the prompt will hit
    the cache is unknown until the upstream answers) and ``output_tokens`` at the
    output price.
    """
    _check_tokens(prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    total = _EXACT.add(
        _EXACT.multiply(prompt_tokens, _exact(price.input_per_mtok)),
        _EXACT.multiply(output_tokens, _exact(price.output_per_mtok)),
    )
    return _ceil(total)


def usd_to_micros(usd: Decimal) -> int:
    """A USD limit in whole micro-USD, rounded down (a limit never rounds up).

    Computed over the exact value of ``usd``, so ``Decimal("0.1")`` is exactly 100000.
    """
    return int(_EXACT.multiply(_exact(usd), MICROS_PER_USD).to_integral_value(ROUND_FLOOR))


def micros_to_usd(micros: int) -> Decimal:
    """Whole micro-USD as an exact ``Decimal`` with six decimal places."""
    # The string constructor is exact: no context precision or rounding applies.
    return Decimal(f"{int(micros)}E-6")


def max_output_tokens(price: ModelPrice) -> int | None:
    """The model's output-token ceiling, if the price entry states one."""
    return price.max_output_tokens
